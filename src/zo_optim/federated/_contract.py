"""The contract two participants must share, checked once for both sides.

A client checks each :class:`~zo_optim.federated.Task` against its own contract, and the server
checks each :class:`~zo_optim.federated.Hello`: protocol version, RNG contract, algorithm, P and
τ must be equal, or the peer is refused with every mismatch in the reason.
"""

from __future__ import annotations

from .. import rng
from ..optim.base import ZOOptimizer
from .protocol import PROTOCOL_VERSION, Hello, Task

__all__ = ["contract_mismatches"]


def contract_mismatches(msg: Hello | Task, optimizer: ZOOptimizer, local_steps: int, whose: str) -> list[str]:
    """What in ``msg``'s contract differs from ours, one phrase each (empty: the contract matches).

    ``whose`` names our side in the phrases (``"ours"`` on a client, ``"server"`` on the server).
    """
    wrong = []
    if msg.version != PROTOCOL_VERSION:
        wrong.append(f"protocol version {msg.version} ({whose} {PROTOCOL_VERSION})")
    if msg.rng_version != rng.RNG_VERSION:
        wrong.append(f"RNG contract {msg.rng_version!r} ({whose} {rng.RNG_VERSION!r})")
    if msg.algorithm != optimizer.algorithm:
        wrong.append(f"algorithm {msg.algorithm!r} ({whose} {optimizer.algorithm!r})")
    if msg.num_queries != optimizer.num_queries:
        wrong.append(f"num_queries {msg.num_queries} ({whose} {optimizer.num_queries})")
    if msg.local_steps != local_steps:
        wrong.append(f"local_steps {msg.local_steps} ({whose} {local_steps})")
    return wrong
