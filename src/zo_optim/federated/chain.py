"""The digest chain: every round the server closes commits to all the rounds before it and to its state.

    d_0     = sha256("zo-fed-chain/1" ‖ server_seed (uint64) ‖ config digest ‖ c_0)
    d_{r+1} = sha256(d_r ‖ entry_r ‖ c_{r+1})

``c_p`` is the server replica's checksum after ``p`` rounds (:meth:`Replica.checksum`: weights, optimizer
state, hyper-parameters, step counters, position), ``entry_r`` the packed round entry (round number — the
round's seeds are ``round_seed(server_seed, r, k)`` — participants, the aggregated scalars of every stream).
So ``d_0`` (sent in the :class:`~zo_optim.federated.Welcome`) commits to the initial weights, and every
``d_p`` to the whole history up to ``p``.

A :class:`~zo_optim.federated.Task` carries ``chain``: the digest at its base position (the snapshot's, or
the first entry's round), the snapshot's checksum if it has one, then the checksum after each of its
entries, 32 bytes each — one entry in the steady state, so O(1) bytes per round (64 B). The client folds the
entries it receives into the chain from the base, checks that the fold passes through the digest it holds
for its own position (the entries extend the history it has), loads and applies, and checks its own
checksum against the committed one after the snapshot and after the last entry. Any mismatch — a flipped
bit in a snapshot weight, a changed hyper-parameter in a snapshot, a flipped bit in a logged scalar —
reverts the client to where it was and it answers ``"diverged"``; the server then sends a fresh snapshot
of its current state. A client never trains on a replica that is not the server's.

The chain is an integrity check against corruption and divergence, not authentication: anyone who can
rewrite a task can rewrite its chain too. Authenticity is the transport's (Flower's TLS).
"""

from __future__ import annotations

import hashlib
import struct

from .protocol import ProtocolError, RoundEntry, Snapshot

__all__ = ["DIGEST_BYTES", "ChainError", "TaskChain", "genesis", "link", "pack_task_chain", "parse_task_chain"]

DIGEST_BYTES = 32
_ENTRY = struct.Struct("<QII")


class ChainError(ProtocolError):
    """A snapshot or log entry that does not match the server's digest chain (the client stays as it was)."""


def genesis(server_seed: int, config_digest: str, checksum: str) -> bytes:
    """``d_0``: the federation's seed, configuration and initial state."""
    return hashlib.sha256(b"zo-fed-chain/1" + struct.pack("<Q", server_seed) + config_digest.encode()
                          + bytes.fromhex(checksum)).digest()


def link(prev: bytes, entry: RoundEntry, checksum_after: bytes) -> bytes:
    """``d_{r+1}`` from ``d_r``, round r's entry and the checksum after applying it (32 raw bytes)."""
    h = hashlib.sha256(prev)
    h.update(_ENTRY.pack(entry.round, entry.n_participants, len(entry.scalars)))
    h.update(entry.scalars)
    for name, blob in entry.extras:
        h.update(name.encode() + b"\0" + struct.pack("<I", len(blob)) + blob)
    h.update(checksum_after)
    return h.digest()


class TaskChain:
    """A task's chain field, parsed: the base digest, the snapshot's checksum (or None), one checksum per entry."""

    def __init__(self, base: bytes, snapshot: bytes | None, after: list[bytes]) -> None:
        self.base, self.snapshot, self.after = base, snapshot, after


def pack_task_chain(base: bytes, snapshot_checksum: bytes | None, after: list[bytes]) -> bytes:
    return base + (snapshot_checksum or b"") + b"".join(after)


def parse_task_chain(blob: bytes, snapshot: Snapshot | None, n_entries: int) -> TaskChain:
    """Split a task's chain field; :class:`ChainError` if its length does not fit the task."""
    want = DIGEST_BYTES * (1 + (snapshot is not None) + n_entries)
    if len(blob) != want:
        raise ChainError(f"task chain is {len(blob)} B, expected {want} (base digest, snapshot checksum, one "
                         f"checksum per entry for {n_entries} entries)")
    parts = [blob[i: i + DIGEST_BYTES] for i in range(0, len(blob), DIGEST_BYTES)]
    if snapshot is not None:
        return TaskChain(parts[0], parts[1], parts[2:])
    return TaskChain(parts[0], None, parts[1:])


class ServerChain:
    """The server's side of the chain: ``(d_p, c_p)`` for the positions a task or a welcome can start from.

    Kept: position 0 (the genesis), every position the log can replay from (``log.start .. log.end``) and
    the snapshots' positions; older ones are dropped with the log (O(log length) memory).
    """

    def __init__(self, server_seed: int, config_digest: str, checksum: str) -> None:
        c0 = bytes.fromhex(checksum)
        self._at: dict[int, tuple[bytes, bytes]] = {0: (genesis(server_seed, config_digest, checksum), c0)}
        self.end = 0

    def at(self, position: int) -> tuple[bytes, bytes] | None:
        """(digest, checksum) after ``position`` rounds, if kept."""
        return self._at.get(position)

    def checksum_hex(self, position: int) -> str | None:
        got = self._at.get(position)
        return None if got is None else got[1].hex()

    def close(self, entry: RoundEntry, checksum: str) -> None:
        """Extend the chain by the round just applied (``checksum``: the replica's after it)."""
        if entry.round != self.end:
            raise ValueError(f"chain at position {self.end} cannot take round {entry.round}")
        c = bytes.fromhex(checksum)
        self._at[entry.round + 1] = (link(self._at[entry.round][0], entry, c), c)
        self.end += 1

    def trim(self, start: int, snapshots: list[int]) -> None:
        keep = {0, *snapshots}
        self._at = {p: v for p, v in self._at.items() if p >= start or p in keep}

    def task_chain(self, snapshot: Snapshot | None, entries: tuple[RoundEntry, ...], position: int) -> bytes:
        base = snapshot.position if snapshot is not None else (entries[0].round if entries else position)
        snap = self._at[snapshot.position][1] if snapshot is not None else None
        return pack_task_chain(self._at[base][0], snap, [self._at[e.round + 1][1] for e in entries])

    def state_dict(self) -> dict:
        return {"end": self.end, "at": {p: [d, c] for p, (d, c) in self._at.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (validated first: ValueError, nothing changed)."""
        try:
            end = int(state["end"])
            at = {int(p): (bytes(d), bytes(c)) for p, (d, c) in state["at"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Invalid chain state: {type(e).__name__}: {e}") from e
        if 0 not in at or end not in at or any(len(d) != DIGEST_BYTES or len(c) != DIGEST_BYTES
                                               for d, c in at.values()):
            raise ValueError("Invalid chain state: it must hold 32-byte digests for position 0 and its end")
        self.end, self._at = end, at
