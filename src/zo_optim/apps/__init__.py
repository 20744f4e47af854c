"""The applications of the library: the commands and tasks built on zo-optim, not part of its API.

* :mod:`~zo_optim.apps.demo` (``zo-optim demo``) and :mod:`~zo_optim.apps.demo_lora` (its ``--train lora`` path);
* :mod:`~zo_optim.apps.federated` (``zo-optim federated``) and :mod:`~zo_optim.apps.tweets`, the federated
  tweet task it, ``zo-optim bench federated`` and the Flower example run;
* :mod:`~zo_optim.apps.step_memory`, the one-step peak-memory probe the demo starts in fresh processes
  (``python -m zo_optim.apps.step_memory``);
* :mod:`~zo_optim.apps.assets`, the loaders of the packaged model and tweets;
* :mod:`~zo_optim.apps.common`, the helpers they share.

The library rooms (``rng``, ``ops``, ``optim``, ``federated``, ``integrations``) never import this package.
"""
