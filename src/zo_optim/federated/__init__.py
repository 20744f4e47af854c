"""Federated zeroth-order training that exchanges only seeds' round numbers and float32 scalars.

A round r is (r, τ seeds ``rng.round_seed(server_seed, r, k)``, k = 1..τ, and τ·P aggregated
float32 scalars per stream). Every participant that applied the same rounds holds
bit-identical weights and optimizer state. The core is transport-free; engines move its
messages (``encode``/``decode`` give flat dicts of int/float/str/bytes).

Core (stable public names)::

    from zo_optim.federated import (
        FederatedWrapper,   # client: FederatedWrapper(opt, local_steps=τ, client_id=c, model=m)
        Server,             # coordinator: Server(opt, clients=M, clients_per_round=m, local_steps=τ, ...)
        Replica,            # model + optimizer applying log entries exactly (server and clients have one)
        RoundLog,           # bounded log with absolute indices + snapshots
        Hello, Welcome, Task, Reply, RoundEntry, Snapshot,   # messages (frozen dataclasses)
        encode, decode, payload_bytes, pack_scalars, unpack_scalars, ProtocolError, GapError,
    )

    # handshake (once per client): refuses another protocol, RNG contract, algorithm, P, τ or configuration
    client.welcome(server.handshake(client.hello()))
    # one round
    tasks = server.open_round()                       # {client_id: Task}
    for cid, task in tasks.items():
        reply = clients[cid].handle(task, closure)    # closure(step) -> loss on the client's batch `step`
        receipt = server.receive(reply)               # validated; receipt.retry: a new Task after a gap
    record = server.close_round()                     # aggregate, apply on the server replica, log, record
    # a client not sampled catches up later from the entries (or a snapshot) its next task carries;
    # server.sync_task(cid) brings one up to date without computing.

Engines: :func:`simulate` (in-process), :mod:`zo_optim.federated.distributed`
(``torch.distributed``: rank 0 serves); Flower is a separate integration on this core.
:func:`dirichlet_split` makes non-IID client splits of a labelled dataset.
See ``docs/federated.md``.
"""

from .aggregation import AGGREGATIONS, aggregate
from .client import FederatedWrapper, StepClosure
from .log import RoundLog
from .protocol import (
    PROTOCOL_VERSION,
    Hello,
    ProtocolError,
    Reply,
    RoundEntry,
    Snapshot,
    Task,
    Welcome,
    decode,
    encode,
    pack_scalars,
    payload_bytes,
    reply_client_id,
    unpack_scalars,
)
from .replica import GapError, Replica, config_digest
from .server import Receipt, RoundRecord, Server
from .simulate import SimulationResult, simulate
from .split import dirichlet_split

__all__ = [
    "AGGREGATIONS",
    "PROTOCOL_VERSION",
    "FederatedWrapper",
    "GapError",
    "Hello",
    "ProtocolError",
    "Receipt",
    "Replica",
    "Reply",
    "RoundEntry",
    "RoundLog",
    "RoundRecord",
    "Server",
    "SimulationResult",
    "Snapshot",
    "StepClosure",
    "Task",
    "Welcome",
    "aggregate",
    "config_digest",
    "decode",
    "dirichlet_split",
    "encode",
    "pack_scalars",
    "payload_bytes",
    "reply_client_id",
    "simulate",
    "unpack_scalars",
]

