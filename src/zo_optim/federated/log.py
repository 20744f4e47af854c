"""The round log: append-only entries with absolute round indices, trimming and snapshots.

Position ``p`` means "rounds 0 .. p-1 applied". The log holds the entries of rounds
``start .. end-1``; :meth:`RoundLog.trim` drops the oldest ones down to ``limit``, but never
past the newest snapshot, so every position is reachable: a position ``>= start`` by
replaying entries, an older one by loading the newest snapshot and replaying the tail.
At most ``max_snapshots`` snapshots are kept (the newest ones).
"""

from __future__ import annotations

from .protocol import RoundEntry, Snapshot

__all__ = ["RoundLog"]


class RoundLog:
    """Bounded log of closed rounds plus the newest snapshots.

    Args:
        limit: most entries kept (None: unbounded). Needs snapshots to trim.
        max_snapshots: snapshots kept (the newest).
    """

    def __init__(self, limit: int | None = None, max_snapshots: int = 2) -> None:
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"Invalid log_limit: {limit!r} (an int >= 1, or None)")
        if not isinstance(max_snapshots, int) or max_snapshots < 1:
            raise ValueError(f"Invalid max_snapshots: {max_snapshots!r} (an int >= 1)")
        self.limit = limit
        self.max_snapshots = max_snapshots
        self._entries: list[RoundEntry] = []
        self._start = 0
        self._snapshots: list[Snapshot] = []

    @property
    def start(self) -> int:
        """Round index of the oldest entry kept (= ``end`` when empty)."""
        return self._start

    @property
    def end(self) -> int:
        """Number of rounds ever appended = the position of a replica that applied them all."""
        return self._start + len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: RoundEntry) -> None:
        if entry.round != self.end:
            raise ValueError(f"log entry for round {entry.round} appended at position {self.end}")
        self._entries.append(entry)

    def entries(self, start: int, stop: int | None = None) -> tuple[RoundEntry, ...]:
        """Entries of rounds ``start .. stop-1`` (stop defaults to ``end``); KeyError if trimmed."""
        stop = self.end if stop is None else stop
        if start < self._start or stop > self.end or start > stop:
            raise KeyError(f"rounds {start}..{stop - 1} are not in the log (it holds {self._start}..{self.end - 1})")
        return tuple(self._entries[start - self._start: stop - self._start])

    def add_snapshot(self, snapshot: Snapshot) -> None:
        if not self._start <= snapshot.position <= self.end:
            raise ValueError(f"snapshot at position {snapshot.position} outside the log {self._start}..{self.end}")
        self._snapshots.append(snapshot)
        del self._snapshots[: -self.max_snapshots]

    @property
    def latest_snapshot(self) -> Snapshot | None:
        return self._snapshots[-1] if self._snapshots else None

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        return tuple(self._snapshots)

    def trim(self) -> int:
        """Drop the oldest entries down to ``limit``, never past the newest snapshot; returns how many."""
        if self.limit is None or len(self._entries) <= self.limit:
            return 0
        snap = self.latest_snapshot
        floor = snap.position if snap is not None else 0
        drop = min(len(self._entries) - self.limit, max(0, floor - self._start))
        if drop:
            del self._entries[:drop]
            self._start += drop
            self._snapshots = [s for s in self._snapshots if s.position >= self._start]
        return drop

    def catch_up(self, position: int) -> tuple[Snapshot | None, tuple[RoundEntry, ...]]:
        """What a replica at ``position`` needs to reach ``end``: (snapshot or None, entries)."""
        if position > self.end:
            raise ValueError(f"position {position} is ahead of the log's end {self.end}")
        if position >= self._start:
            return None, self.entries(position)
        snap = self.latest_snapshot
        if snap is None:  # trim never passes the newest snapshot, so this cannot happen
            raise RuntimeError(f"position {position} is older than the log ({self._start}) and there is no snapshot")
        return snap, self.entries(snap.position)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Entries, start and snapshots as plain data (for the server's checkpoint)."""
        return {"start": self._start,
                "entries": [[e.round, e.n_participants, e.scalars, [[n, b] for n, b in e.extras]]
                            for e in self._entries],
                "snapshots": [[s.position, s.payload] for s in self._snapshots]}

    @staticmethod
    def parse_state(state: dict) -> tuple[int, list[RoundEntry], list[Snapshot]]:
        """Validate :meth:`state_dict`'s output (ValueError) without touching any log: (start, entries, snapshots)."""
        try:
            start = state["start"]
            entries = [RoundEntry(round=r, n_participants=n, scalars=s, extras=tuple((x, b) for x, b in ex))
                       for r, n, s, ex in state["entries"]]
            snaps = [Snapshot(p, b) for p, b in state["snapshots"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Invalid log state: {type(e).__name__}: {e}") from e
        ints = [start] + [e.round for e in entries] + [e.n_participants for e in entries] + [s.position for s in snaps]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints):
            raise ValueError("Invalid log state: rounds, counts and positions must be ints >= 0")
        if [e.round for e in entries] != list(range(start, start + len(entries))):
            raise ValueError(f"Invalid log state: entries are not the consecutive rounds from {start}")
        blobs = [e.scalars for e in entries] + [b for e in entries for _, b in e.extras] + [s.payload for s in snaps]
        names = [n for e in entries for n, _ in e.extras]
        if not all(isinstance(b, bytes) for b in blobs) or not all(isinstance(n, str) for n in names):
            raise ValueError("Invalid log state: scalars, extras and snapshot payloads must be bytes")
        end = start + len(entries)
        if not all(start <= s.position <= end for s in snaps):
            raise ValueError(f"Invalid log state: a snapshot lies outside the log {start}..{end}")
        return start, entries, snaps

    def load_state(self, parsed: tuple[int, list[RoundEntry], list[Snapshot]]) -> None:
        """Replace the log with :meth:`parse_state`'s result."""
        self._start, self._entries, self._snapshots = parsed[0], list(parsed[1]), list(parsed[2])
