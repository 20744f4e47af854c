"""``Server.state_dict()`` / ``Server.load_state_dict()``: everything a restarted server needs to continue.

torch.optim's convention: the state of a server constructed with the same arguments (optimizer class and
settings, aggregation, limits), i.e. the replica's weights and optimizer state, the log and its snapshots,
what the server believes each client has applied, who owes a reply, the sampling RNG, the open round's
bookkeeping (sampled, replies kept, retries, the deadline as time left), the history with its byte
counters, rejection counts and the quarantine. Loading validates everything first and replaces nothing
until all of it passed (the replica's snapshot load is itself atomic), so a refused state changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter, deque
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_NAME, CheckpointError, read_checkpoint, write_checkpoint
from .protocol import Reply, Snapshot, decode, encode
from .records import RoundRecord

# the server is typed Any here: importing Server (even under TYPE_CHECKING) would make an import cycle
Server = Any

__all__ = ["Durable", "load_server_state", "server_state"]

FORMAT = 1


def _record_dict(rec: RoundRecord) -> dict[str, Any]:
    d = dataclasses.asdict(rec)
    d["rejected"] = [[c, why] for c, why in rec.rejected]
    return d


def _record(d: dict[str, Any]) -> RoundRecord:
    d = dict(d)
    for k in ("sampled", "participants", "dropped"):
        d[k] = tuple(int(c) for c in d[k])
    d["rejected"] = [(None if c is None else int(c), str(why)) for c, why in d["rejected"]]
    d["quarantined"] = [int(c) for c in d.get("quarantined", [])]
    return RoundRecord(**d)


def server_state(s: Server) -> dict[str, Any]:
    """The server's state as plain data, tensors and bytes (``torch.save``-able, ``weights_only`` loadable)."""
    return {
        "format": FORMAT,
        "config_digest": s.digest,
        "server_seed": s.server_seed,
        "replica": {"snapshot": s.replica.snapshot().payload, "position": s.replica.position,
                    "applied_rounds": s.replica.applied_rounds},
        "log": s.log.state_dict(),
        "chain": s.chain.state_dict(),
        "sampler": s._sampler.getstate(),
        "positions": dict(s._positions),
        "owes": dict(s._owes),
        "round": s._round,
        "sampled": list(s._sampled),
        "replies": [encode(r) for r in s._replies.values()],
        "answered": sorted(s._answered),
        "retries": dict(s._retries),
        "deadline_left": None if s._deadline is None else s._deadline - s.clock(),
        "record": None if s._record is None else _record_dict(s._record),
        "pending_up": s._pending_up,
        "history": [_record_dict(r) for r in s.history],
        "rejections": dict(s.rejections),
        "late": list(s.late),
        "quarantine": s.quarantine.state_dict(),
    }


def load_server_state(s: Server, state: dict[str, Any]) -> None:
    """Load :func:`server_state`'s output into ``s`` (constructed with the same arguments); ValueError if it
    does not fit, with nothing changed."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"Invalid server state: expected a dict from Server.state_dict() (format {FORMAT})")
    if state.get("config_digest") != s.digest:
        raise ValueError(f"Invalid server state: optimizer configuration digest {state.get('config_digest')!r}, this "
                         f"server's is {s.digest!r}: construct the server with the optimizer (class, settings, "
                         "parameter shapes) the checkpointed one had")
    try:
        rep = state["replica"]
        log_parsed = s.log.parse_state(state["log"])
        end = log_parsed[0] + len(log_parsed[1])
        if rep["position"] != end:
            raise ValueError(f"the replica is at position {rep['position']}, the log ends at {end}")
        sampler = random.Random()
        sampler.setstate(state["sampler"])
        positions = {int(c): int(p) for c, p in state["positions"].items()}
        if any(not 0 <= p <= end for p in positions.values()):
            raise ValueError(f"a client position lies outside 0..{end}")
        owes = {int(c): int(r) for c, r in state["owes"].items()}
        replies = [decode(r) for r in state["replies"]]
        if not all(isinstance(r, Reply) for r in replies):
            raise ValueError("a kept reply is not a reply")
        rnd = state["round"]
        if rnd is not None and rnd != end:
            raise ValueError(f"the open round is {rnd}, the log ends at {end}")
        record = None if state["record"] is None else _record(state["record"])
        history = [_record(d) for d in state["history"]]
        left = state["deadline_left"]
        parsed = dict(
            server_seed=int(state["server_seed"]),
            positions=positions, owes=owes, round=None if rnd is None else int(rnd),
            sampled=tuple(int(c) for c in state["sampled"]), replies={r.client_id: r for r in replies},
            answered={int(c) for c in state["answered"]}, retries=Counter({int(c): int(n) for c, n in
                                                                          state["retries"].items()}),
            deadline=None if left is None else s.clock() + float(left), record=record,
            pending_up=int(state["pending_up"]), history=history,
            rejections=Counter({str(k): int(v) for k, v in state["rejections"].items()}),
            late=[(int(r), None if c is None else int(c)) for r, c in state["late"]])
        quarantine = type(s.quarantine)(s.quarantine.after, s.quarantine.window, s.quarantine.rounds)
        quarantine.load_state_dict(state["quarantine"])
        chain = type(s.chain)(0, "", "00" * 32)
        chain.load_state_dict(state["chain"])
        if chain.end != end:
            raise ValueError(f"the chain ends at {chain.end}, the log at {end}")
        applied = int(rep["applied_rounds"])
        snapshot = Snapshot(int(rep["position"]), rep["snapshot"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"Invalid server state: {type(e).__name__}: {e}") from e
    # everything parsed: the replica's load is the last check that can fail (atomic), then the assignments
    s.replica.load_snapshot(snapshot)
    s.replica.snapshot_loads -= 1  # a restart, not a catch-up
    s.replica.server_seed = parsed["server_seed"]
    s.replica.applied_rounds = applied
    s.server_seed = parsed["server_seed"]
    s.log.load_state(log_parsed)
    s.chain = chain
    s._sampler = sampler
    s._positions = parsed["positions"]
    s._owes = parsed["owes"]
    s._round = parsed["round"]
    s._sampled = parsed["sampled"]
    s._replies = parsed["replies"]
    s._answered = parsed["answered"]
    s._retries = parsed["retries"]
    s._deadline = parsed["deadline"]
    s._record = parsed["record"]
    s._pending_up = parsed["pending_up"]
    s.history = parsed["history"]
    s.rejections = parsed["rejections"]
    s.late = deque(parsed["late"], maxlen=s.late.maxlen)
    s.quarantine = quarantine


class Durable:
    """The server's durability methods (a mixin of :class:`~zo_optim.federated.Server`)."""

    checkpoint_dir: Path | None
    checkpoint_extra: Any

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue (``torch.optim`` convention: load into a server built with the same
        arguments); see :mod:`zo_optim.federated._server_state`."""
        return server_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output; ValueError (nothing changed) if it does not fit."""
        load_server_state(self, state)

    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> Path:
        """Write :meth:`state_dict` (and ``checkpoint_extra()``) atomically to ``directory/server.ckpt``."""
        directory = self.checkpoint_dir if directory is None else Path(directory)
        if directory is None:
            raise ValueError("no checkpoint directory: pass one, or construct the server with checkpoint_dir=")
        extra = self.checkpoint_extra() if self.checkpoint_extra is not None else {}
        return write_checkpoint(directory / CHECKPOINT_NAME, {"server": self.state_dict(), "extra": extra})

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Continue from the checkpoint at ``path`` (a file or a ``checkpoint_dir``); returns its extra dict.

        :class:`~zo_optim.federated.checkpoint.CheckpointError` for a missing, truncated or altered file and
        ValueError for a state that does not fit this server; either way nothing changed.
        """
        data = read_checkpoint(path)
        if not isinstance(data.get("server"), dict) or not isinstance(data.get("extra"), dict):
            raise CheckpointError(f"{path}: not a server checkpoint (no 'server' / 'extra' dicts)")
        self.load_state_dict(data["server"])
        return data["extra"]
