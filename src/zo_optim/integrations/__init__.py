"""Integrations of the zo-optim optimizers with training frameworks.

* :mod:`zo_optim.integrations.hf` — ``transformers.Trainer`` (and TRL's trainers on top of it),
  PEFT and ``torchrun``; needs the ``hf`` extra (``pip install "zo-optim[hf]"``).

Nothing is imported here, so ``import zo_optim.integrations`` never pulls in transformers.
"""
