"""What the server hands back: a :class:`Receipt` per reply and a :class:`RoundRecord` per closed round."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .protocol import Task

__all__ = ["Receipt", "RoundRecord"]


@dataclass(frozen=True)
class Receipt:
    """What :meth:`Server.receive` did with a reply."""

    accepted: bool
    reason: str
    client_id: int | None = None
    retry: Task | None = None


@dataclass
class RoundRecord:
    """One closed round: who took part, what was refused, the mean loss and payload bytes."""

    round: int
    sampled: tuple[int, ...]
    participants: tuple[int, ...]
    dropped: tuple[int, ...]
    rejected: list[tuple[int | None, str]] = field(default_factory=list)
    loss: float = math.nan
    bytes_up: int = 0
    bytes_down: int = 0
    snapshot_bytes: int = 0
    #: clients quarantined during this round (:mod:`~zo_optim.federated.quarantine`)
    quarantined: list[int] = field(default_factory=list)
    #: why the round's aggregate was refused ("": applied); a refused round is logged empty (a no-op)
    aggregate_refused: str = ""
