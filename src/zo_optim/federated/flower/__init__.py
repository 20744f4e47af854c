"""Flower engine: a :class:`ZOStrategy` (ServerApp side) and :func:`make_client_app` (ClientApp side).

Flower (``flwr>=1.42``, extra ``zo-optim[flower]``) moves the messages of the scalar-only protocol;
our :class:`~zo_optim.federated.Server` and :class:`~zo_optim.federated.FederatedWrapper` do the
rest, exactly as in :func:`~zo_optim.federated.simulate`. Every message carries one
``ConfigRecord`` (key ``"zo"``) holding :func:`~zo_optim.federated.encode`'s flat dict: uint64
ints, strings and packed little-endian float32 ``bytes``. No ``ArrayRecord`` is ever sent —
weights never travel, only round numbers and τ·P scalars (and, for a client older than the log,
a snapshot as ``bytes``).

Message types: ``"query"`` (handshake: the client answers with its :class:`Hello`), ``"train"``
(a round's :class:`Task`), ``"query.sync"`` (a catch-up-only task at the end of the run).

Modules: ``records`` (protocol messages in and out of Flower records, wire byte counts),
``strategy`` (:class:`ZOStrategy`) with ``messaging`` (its message traffic) and ``identity`` (client ids
bound to secrets), ``server_app``
(:func:`make_server_app`), ``client_app`` (:func:`make_client_app` and the client's state).

Flower facts this engine is built around (verified on Flower 1.42; ``docs/federated.md``, section
*Flower*, has the full list):

* SuperNodes register late: :meth:`ZOStrategy.start` waits for ``min_nodes`` and sends a
  handshake query before round 1, which also absorbs the ClientApp workers' start-up (4–9 s)
  and checks the RNG contract, algorithm, P, τ, configuration digest and initial weights of every node.
  Nodes that appear later are handshaken when they appear.
* A node never gets a second message while one is outstanding (in simulation a node can be
  handed two messages at once and the Context write-back is last-writer-wins): the server
  never samples a client that owes a reply, and is only told it owes nothing once the reply,
  an error reply or the message's TTL arrives.
* Rounds close at a deadline (``round_timeout``); replies that arrive later are logged and
  dropped by the :class:`Server`, never applied.
* ``HttpGrid.send_and_receive`` sleeps 3 s between pulls, so the strategy drives
  ``push_messages``/``pull_messages`` itself (``poll_interval``).
* In deployment each message may run in a fresh ``flwr-clientapp`` process: a client keeps its
  position, counters, weights and optimizer state in ``context.state`` (or a node-local
  ``cache_dir``), never only in memory; an in-process cache is used only while it provably
  holds the state ``context.state`` describes (a token written with each state).
* Without SuperNode authentication a restarted SuperNode registers a new random node id, and a killed
  one stays listed as online until its heartbeat deadline (~60 s): a client's identity is its client id
  bound to a secret it keeps (:mod:`.identity`), and a client whose node is not listed is not sampled.
* ``ConfigRecord.count_bytes()`` fails on empty lists and on empty ``str``/``bytes`` values: our
  records hold no lists, and the wire bytes are counted by its rule here.
"""

from __future__ import annotations

# Checked here, before any submodule: a re-import after a failed one finds the submodules that did load
# in sys.modules, so only this check is sure to run again.
try:
    import flwr.app
    import flwr.clientapp
    import flwr.serverapp.strategy  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'zo_optim.federated.flower needs Flower (flwr>=1.42): pip install "zo-optim[flower]"'
    ) from e

from ._environment import flower_environment
from .client_app import make_client_app
from .records import RECORD_KEY
from .server_app import make_server_app
from .strategy import ZOStrategy

__all__ = ["RECORD_KEY", "ZOStrategy", "flower_environment", "make_client_app", "make_server_app"]
