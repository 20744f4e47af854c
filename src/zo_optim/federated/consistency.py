"""What an end-of-run replica check saw: which replicas it compared, and which it could not.

``replicas_identical()`` used to answer a bare True while skipping clients it never checked (a
straggler still owing a reply, a refused node). :class:`ReplicaCheck` keeps both sides: it is truthy
only when every expected replica was checked and every checked one equals the server's checksum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["ReplicaCheck", "check_replicas"]


@dataclass(frozen=True)
class ReplicaCheck:
    """The result of comparing client replicas with the server's.

    ``checked``: client ids whose checksum was compared; ``differing``: those of them that differ;
    ``unchecked``: ``(id, reason)`` for every expected replica that could not be compared (ids are
    client ids, or ``"node N"`` for a Flower node refused before it had one).
    """

    checked: tuple[int, ...]
    differing: tuple[int, ...] = ()
    unchecked: tuple[tuple[int | str, str], ...] = ()

    @property
    def identical(self) -> bool:
        """Every checked replica equals the server's (says nothing about the unchecked ones)."""
        return not self.differing

    @property
    def complete(self) -> bool:
        """Every expected replica was checked."""
        return not self.unchecked

    def __bool__(self) -> bool:
        return self.identical and self.complete and bool(self.checked)

    def describe(self) -> str:
        """One line for a report: how many were checked and identical, and what was not checked and why."""
        line = f"{len(self.checked)} replica(s) checked: " + (
            "all identical to the server" if self.identical else f"{list(self.differing)} DIFFER from the server")
        if self.unchecked:
            line += "; not checked: " + ", ".join(f"{c} ({why})" for c, why in self.unchecked)
        return line


def check_replicas(reference: str, checksums: Mapping[int, str], unchecked: Iterable[tuple[int | str, str]] = ()
                   ) -> ReplicaCheck:
    """Compare ``checksums`` (client id → checksum) with the server's ``reference``."""
    checked = tuple(sorted(checksums))
    return ReplicaCheck(checked=checked, differing=tuple(c for c in checked if checksums[c] != reference),
                        unchecked=tuple(unchecked))
