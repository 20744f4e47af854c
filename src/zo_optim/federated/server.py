"""The coordinator: sampling, tasks, validation of every reply, aggregation, the log and byte counts.

A round, driven by an engine::

    tasks = server.open_round()            # {client_id: Task}; sampled m of M, none that owes a reply
    ...   reply = client.handle(task, closure)   (over any transport; encode()/decode() on the wire)
    receipt = server.receive(reply)        # validated; receipt.retry is a new Task after a "gap" reply
    record = server.close_round()          # aggregate → RoundEntry → server replica applies → log → record

``close_round`` may be called at any time (a deadline, see :meth:`Server.deadline_passed`):
sampled clients that have not answered are recorded as dropped, and a reply for a closed
round is logged as late and never applied. Nothing but validated replies of the open round
reaches the aggregate, each client at most once per round.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import rng
from ..optim.base import ZOOptimizer
from ._handshake import Handshake
from ._server_state import Durable
from .aggregation import AGGREGATIONS, _invalid_aggregation, aggregate
from .chain import ServerChain
from .log import RoundLog
from .protocol import (
    PROTOCOL_VERSION,
    Message,
    ProtocolError,
    Reply,
    RoundEntry,
    Task,
    decode,
    pack_scalars,
    payload_bytes,
    reply_client_id,
)
from .quarantine import Quarantine
from .records import Receipt, RoundRecord
from .replica import Replica, config_digest
from .validation import apply_checked, mistyped, reply_error

__all__ = ["Receipt", "RoundRecord", "Server"]

log = logging.getLogger("zo_optim.federated")

class Server(Handshake, Durable):
    """The coordinator of a federation, with its own replica of the model.

    Args:
        optimizer: the server replica's optimizer (same class and settings as the clients').
        clients: M client ids (an int M means ids 0..M-1); :meth:`handshake` adds new ones.
        clients_per_round: m, sampled per round among the clients that owe no reply.
        local_steps: τ.
        server_seed: uint64 from which every round's seeds derive (default: random).
        aggregation: ``"mean"`` (weighted by n_examples), ``"median"`` or ``"trimmed_mean"``.
        trim_fraction: fraction cut at each end by ``"trimmed_mean"``.
        max_abs_scalar: replies with any |scalar| above this are refused.
        max_examples: largest n_examples accepted (bounds one client's weight in the mean).
        log_limit: most log entries kept (None: unbounded); needs snapshots (default every log_limit//2).
        snapshot_every: snapshot the server replica every this many rounds.
        max_snapshots: snapshots kept.
        round_timeout: seconds after :meth:`open_round` at which :meth:`deadline_passed` is true.
        release_after: a sampled client that never answered may be sampled again this many rounds later.
        sample_seed: seed of the sampling RNG (default: from the server seed).
        extras: optional extra streams to carry (e.g. HELENE's ``"sq_grad_sum"``).
        quarantine_after: refusals within ``quarantine_window`` rounds that quarantine a client (it is not
            sampled, :mod:`~zo_optim.federated.quarantine`); None (default): never.
        quarantine_window: rounds the refusals are counted over.
        quarantine_rounds: rounds a quarantine lasts (None: until :meth:`release_quarantine`).
        checkpoint_dir: write :meth:`state_dict` atomically to ``checkpoint_dir/server.ckpt`` after every
            ``checkpoint_every``-th closed round (:mod:`~zo_optim.federated.checkpoint`); None: never.
        checkpoint_every: rounds between checkpoints.
        clock: time source for the deadline.
    """

    def __init__(
        self,
        optimizer: ZOOptimizer,
        *,
        clients: int | Iterable[int],
        clients_per_round: int,
        local_steps: int = 1,
        server_seed: int | None = None,
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
        max_abs_scalar: float = 1e6,
        max_examples: int = 2**31,
        log_limit: int | None = None,
        snapshot_every: int | None = None,
        max_snapshots: int = 2,
        round_timeout: float | None = None,
        release_after: int = 2,
        sample_seed: int | None = None,
        extras: Iterable[str] = (),
        quarantine_after: int | None = None,
        quarantine_window: int = 10,
        quarantine_rounds: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise _invalid_aggregation(aggregation)
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"Invalid trim_fraction: {trim_fraction!r} (in [0, 0.5))")
        if not (isinstance(max_abs_scalar, (int, float)) and max_abs_scalar > 0):
            raise ValueError(f"Invalid max_abs_scalar: {max_abs_scalar!r} (a positive number)")
        if not isinstance(clients_per_round, int) or clients_per_round < 1:
            raise ValueError(f"Invalid clients_per_round: {clients_per_round!r} (an int >= 1)")
        if log_limit is not None and snapshot_every is None:
            snapshot_every = max(1, log_limit // 2)
        if snapshot_every is not None:
            if not isinstance(snapshot_every, int) or snapshot_every < 1:
                raise ValueError(f"Invalid snapshot_every: {snapshot_every!r} (an int >= 1, or None)")
            if log_limit is not None and snapshot_every > log_limit:
                raise ValueError(f"Invalid snapshot_every: {snapshot_every} > log_limit {log_limit}: the log could "
                                 "not be trimmed to its limit; snapshot at least every log_limit rounds")
        if round_timeout is not None and not round_timeout > 0:
            raise ValueError(f"Invalid round_timeout: {round_timeout!r} (seconds > 0, or None)")
        if not isinstance(release_after, int) or release_after < 1:
            raise ValueError(f"Invalid release_after: {release_after!r} (an int >= 1)")
        if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
            raise ValueError(f"Invalid checkpoint_every: {checkpoint_every!r} (an int >= 1)")
        ids = list(range(clients)) if isinstance(clients, int) else [int(c) for c in clients]
        self.server_seed = random.getrandbits(64) if server_seed is None else int(server_seed)
        self.replica = Replica(optimizer, local_steps=local_steps, server_seed=self.server_seed, extras=extras)
        self.optimizer = optimizer
        self.clients_per_round = clients_per_round
        self.aggregation = aggregation
        self.trim_fraction = float(trim_fraction)
        self.max_abs_scalar = float(max_abs_scalar)
        self.max_examples = int(max_examples)
        self.snapshot_every = snapshot_every
        self.round_timeout = round_timeout
        self.release_after = release_after
        self.clock = clock
        self.log = RoundLog(log_limit, max_snapshots=max_snapshots)
        self.quarantine = Quarantine(quarantine_after, quarantine_window, quarantine_rounds)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        #: ``checkpoint_extra()`` → a dict saved with each checkpoint (an engine's own state: simulate's clients)
        self.checkpoint_extra: Callable[[], dict[str, Any]] | None = None
        self.digest = config_digest(optimizer)
        # the digest chain, with the replica's checksum at every position a client can be checked against
        self.chain = ServerChain(self.server_seed, self.digest, self.replica.checksum())
        self._sampler = random.Random(self.server_seed if sample_seed is None else sample_seed)
        self._positions: dict[int, int] = dict.fromkeys(ids, 0)  # what we believe each client has applied
        self._owes: dict[int, int] = {}  # client → round it was sampled in and has not answered
        #: clients an engine knows to be unreachable now (a Flower node gone offline): not sampled, state kept
        self.away: set[int] = set()
        self._round: int | None = None
        self._sampled: tuple[int, ...] = ()
        self._replies: dict[int, Reply] = {}
        self._answered: set[int] = set()
        self._retries: Counter[int] = Counter()
        self._deadline: float | None = None
        self._record: RoundRecord | None = None
        self._pending_up = 0
        self.history: list[RoundRecord] = []
        self.rejections: Counter[str] = Counter()
        self.late: deque[tuple[int, int | None]] = deque(maxlen=1000)  # (round, client) of late replies

    # ------------------------------------------------------------------ properties

    @property
    def position(self) -> int:
        """Rounds closed (and applied by the server replica)."""
        return self.log.end

    @property
    def clients(self) -> tuple[int, ...]:
        return tuple(self._positions)

    @property
    def owes(self) -> dict[int, int]:
        """Client → the round it was sampled in and has not answered yet (a copy)."""
        return dict(self._owes)

    @property
    def round_open(self) -> bool:
        return self._round is not None

    @property
    def current_round(self) -> int | None:
        return self._round

    @property
    def streams(self) -> tuple[str, ...]:
        return self.replica.streams

    def checksum(self) -> str:
        return self.replica.checksum()

    # ------------------------------------------------------------------ tasks

    def task_for(self, client_id: int, *, compute: bool = True, position: int | None = None,
                 fresh_snapshot: bool = False) -> Task:
        """The task for ``client_id``: the open round (``compute``) or a catch-up to the current position.

        ``fresh_snapshot``: carry a snapshot of the server replica now and no entries (for a client that
        answered ``"diverged"``: whatever it holds, it is replaced by the server's state)."""
        if compute and self._round is None:
            raise RuntimeError("no round is open: call open_round() first")
        rnd = self._round if compute else self.position
        assert rnd is not None
        known = self._positions.get(client_id, 0) if position is None else position
        known = max(0, min(known, self.position))
        snapshot, entries = (self.replica.snapshot(), ()) if fresh_snapshot else self.log.catch_up(known)
        start = entries[0].round if entries else self.position
        opt = self.optimizer
        return Task(round=rnd, client_id=client_id, server_seed=self.server_seed, algorithm=opt.algorithm,
                    rng_version=rng.RNG_VERSION, num_queries=opt.num_queries, local_steps=self.replica.local_steps,
                    log_start=start, entries=entries, snapshot=snapshot, compute=compute,
                    streams=",".join(self.streams), chain=self.chain.task_chain(snapshot, entries, self.position))

    def sync_task(self, client_id: int) -> Task:
        """A catch-up-only task (``compute=False``) that brings ``client_id`` to the current position."""
        task = self.task_for(client_id, compute=False)
        self._count_down(task)
        return task

    def _count_down(self, task: Task) -> None:
        n = payload_bytes(task)
        snap = len(task.snapshot.payload) if task.snapshot is not None else 0
        if self._record is not None:
            self._record.bytes_down += n
            self._record.snapshot_bytes += snap

    def set_position(self, client_id: int, position: int) -> None:
        """Record that ``client_id`` has applied ``position`` rounds (an engine that delivers every entry itself)."""
        if client_id not in self._positions:
            raise KeyError(f"unknown client {client_id}")
        if not 0 <= position <= self.position:
            raise ValueError(f"Invalid position: {position} (in 0..{self.position})")
        self._positions[client_id] = position

    def release(self, client_id: int) -> bool:
        """Forget that ``client_id`` owes a reply; True if it owed one.

        For engines that learn a task is gone for good (an error reply, a message past its TTL): the
        client may be sampled again, and in the open round it counts as answered (recorded as dropped
        at the close) so the round need not wait for its deadline. ``release_after`` does the same by
        round count for engines that cannot know.
        """
        owed = self._owes.pop(client_id, None)
        if self._round is not None and client_id in self._sampled and client_id not in self._replies:
            self._answered.add(client_id)
        return owed is not None

    def eligible(self) -> list[int]:
        """Clients that may be sampled now: every client that owes no reply, is not quarantined and not away."""
        return [c for c in self._positions if c not in self._owes and c not in self.quarantine and c not in self.away]

    def release_quarantine(self, client_id: int) -> bool:
        """Let a quarantined client be sampled again (and forget its refusals); True if it was quarantined."""
        return self.quarantine.release(client_id)

    def open_round(self, now: float | None = None) -> dict[int, Task]:
        """Open round ``position``: sample up to m eligible clients and build their tasks."""
        if self._round is not None:
            raise RuntimeError(f"round {self._round} is still open: close_round() first")
        r = self.position
        # a client that never answered is released after release_after rounds (it may have left for good)
        for c, since in list(self._owes.items()):
            if r - since > self.release_after:
                del self._owes[c]
        self.quarantine.expire(r)
        pool = self.eligible()
        sampled = tuple(sorted(self._sampler.sample(pool, min(self.clients_per_round, len(pool)))))
        self._round = r
        self._sampled = sampled
        self._replies = {}
        self._answered = set()
        self._retries = Counter()
        self._record = RoundRecord(round=r, sampled=sampled, participants=(), dropped=(), bytes_up=self._pending_up)
        self._pending_up = 0
        now = self.clock() if now is None else now
        self._deadline = None if self.round_timeout is None else now + self.round_timeout
        tasks = {}
        for c in sampled:
            self._owes[c] = r
            tasks[c] = self.task_for(c)
            self._count_down(tasks[c])
        return tasks

    def deadline_passed(self, now: float | None = None) -> bool:
        """True when the open round's deadline (``round_timeout``) has passed."""
        if self._deadline is None:
            return False
        return (self.clock() if now is None else now) >= self._deadline

    @property
    def all_replied(self) -> bool:
        """Every sampled client of the open round has answered (validly or not)."""
        return self._round is not None and set(self._sampled) <= self._answered

    # ------------------------------------------------------------------ replies

    def _reject(self, reason: str, client: int | None, detail: str = "") -> Receipt:
        self.rejections[reason] += 1
        if self._record is not None:
            self._record.rejected.append((client, reason))
        # a late reply or an unknown id is what a slow or restarted honest client sends: not held against it
        if client in self._positions and reason not in ("late", "quarantined"):
            assert client is not None
            if self.quarantine.refused(client, self.position, reason) and self._record is not None:
                self._record.quarantined.append(client)
        return Receipt(False, reason if not detail else f"{reason}: {detail}", client)

    def receive(self, reply: Reply | dict[str, Any], now: float | None = None) -> Receipt:
        """Validate one reply (an object or its encoding) and keep it for the aggregate if it is valid.

        Anything but a :class:`Reply` or a dict (``None``, a list, another object) is an engine's bug, not a
        peer's message: :class:`ProtocolError`, before any counter moves.
        """
        if not isinstance(reply, (Message, dict)):
            raise ProtocolError(f"Server.receive takes a Reply or its encoding (a dict from encode()), got "
                                f"{type(reply).__name__}")
        if isinstance(reply, Reply) and mistyped(reply):  # cannot even be encoded (or counted)
            return self._reject("malformed", None, mistyped(reply))
        size = payload_bytes(reply)
        if self._record is not None:
            self._record.bytes_up += size
        else:
            self._pending_up += size
        if isinstance(reply, dict):
            try:
                msg: Message = decode(reply)
            except ProtocolError as e:
                reason = "version" if reply.get("zo_fed") != PROTOCOL_VERSION else "malformed"
                return self._reject(reason, reply_client_id(reply), str(e))
            if not isinstance(msg, Reply):
                return self._reject("malformed", None, f"expected a reply, got a {msg.kind}")
            reply = msg
        if not isinstance(reply, Reply):
            return self._reject("malformed", None, f"expected a Reply, got {type(reply).__name__}")
        c = reply.client_id
        if reply.version != PROTOCOL_VERSION:
            return self._reject("version", c, f"protocol version {reply.version}")
        if reply.rng_version != rng.RNG_VERSION:
            return self._reject("rng_version", c, repr(reply.rng_version))
        if reply.algorithm != self.optimizer.algorithm:
            return self._reject("algorithm", c, repr(reply.algorithm))
        if c not in self._positions:
            return self._reject("unknown_client", c)
        if c in self.quarantine:
            self._answered.add(c)
            self._owes.pop(c, None)
            return self._reject("quarantined", c, self.quarantine.quarantined[c][1])
        if reply.status == "synced":
            if 0 <= reply.position <= self.position:
                self._positions[c] = reply.position
                return Receipt(True, "synced", c)
            return self._reject("position", c, f"{reply.position}")
        if reply.status == "diverged" and (self._round is None or reply.round != self._round):
            return self._diverged(reply)  # from a catch-up-only task
        if self._round is None or reply.round < self._round:
            self.late.append((reply.round, c))
            if self._owes.get(c) == reply.round:
                del self._owes[c]  # it answered, late: it may be sampled again
            return self._reject("late", c, f"round {reply.round} is closed")
        if reply.status == "diverged":
            return self._diverged(reply)
        if reply.round != self._round:
            return self._reject("wrong_round", c, f"round {reply.round}, open round is {self._round}")
        if c not in self._sampled:
            return self._reject("not_sampled", c)
        if c in self._replies:
            return self._reject("duplicate", c)
        if reply.status == "gap":
            if not 0 <= reply.position <= self._round:
                return self._reject("position", c, f"gap at position {reply.position}")
            self._positions[c] = reply.position
            self.rejections["gap"] += 1
            if self._retries[c] >= 2:  # the retry did not help: stop sending, count it as dropped
                self._answered.add(c)
                return Receipt(False, "gap", c)
            self._retries[c] += 1
            task = self.task_for(c)
            self._count_down(task)
            return Receipt(False, "gap", c, retry=task)
        self._answered.add(c)
        self._owes.pop(c, None)
        wrong = reply_error(reply, self._round, self.replica, self.streams, self.max_examples, self.max_abs_scalar)
        if wrong is not None:
            return self._reject(*wrong)
        self._replies[c] = reply
        self._positions[c] = reply.position
        return Receipt(True, "ok", c)

    def _diverged(self, reply: Reply) -> Receipt:
        """A client whose task did not match the chain (it reverted): answer with a fresh snapshot."""
        c = reply.client_id
        if not 0 <= reply.position <= self.position:
            return self._reject("position", c, f"diverged at position {reply.position}")
        self._positions[c] = reply.position
        self.rejections["diverged"] += 1
        compute = self._round is not None and reply.round == self._round and c in self._sampled
        if compute and self._retries[c] >= 2:  # the snapshots did not help: count it as dropped
            self._answered.add(c)
            return Receipt(False, "diverged", c)
        self._retries[c] += compute
        task = self.task_for(c, compute=compute, fresh_snapshot=True)
        self._count_down(task)
        return Receipt(False, "diverged", c, retry=task)

    # ------------------------------------------------------------------ closing

    def _aggregate(self, replies: list[Reply]) -> RoundEntry:
        assert self._round is not None
        if not replies:
            return RoundEntry(round=self._round, n_participants=0)
        w = np.array([r.n_examples for r in replies], dtype=np.float64)

        def agg(blobs: list[bytes]) -> bytes:
            x = np.stack([np.frombuffer(b, dtype="<f4") for b in blobs])
            return pack_scalars(aggregate(x, w, self.aggregation, self.trim_fraction))

        extras = tuple((name, agg([dict(r.extras)[name] for r in replies])) for name in self.streams)
        return RoundEntry(round=self._round, n_participants=len(replies),
                          scalars=agg([r.scalars for r in replies]), extras=extras)

    def close_round(self) -> RoundRecord:
        """Aggregate the valid replies, apply the round on the server replica, log it, snapshot/trim; a record."""
        if self._round is None or self._record is None:
            raise RuntimeError("no round is open")
        replies = [self._replies[c] for c in sorted(self._replies)]
        entry = self._aggregate(replies)
        refused = apply_checked(self.replica, entry)
        if refused:  # the round is logged empty: every replica moves its position and nothing else
            entry = RoundEntry(round=entry.round, n_participants=0)
            self.replica.apply(entry)
            self._record.aggregate_refused = refused
            self.rejections["aggregate"] += 1
            log.warning("round %d: aggregate refused, applied as an empty round: %s", entry.round, refused)
        self.log.append(entry)
        self.chain.close(entry, self.replica.checksum())
        if self.snapshot_every is not None and self.log.end % self.snapshot_every == 0:
            self.log.add_snapshot(self.replica.snapshot())
        self.log.trim()
        self.chain.trim(self.log.start, [snap.position for snap in self.log.snapshots])
        rec = self._record
        rec.participants = tuple(sorted(self._replies))
        rec.dropped = tuple(c for c in self._sampled if c not in self._replies)
        if replies:
            w = np.array([r.n_examples for r in replies], dtype=np.float64)
            rec.loss = float((w * np.array([r.loss for r in replies])).sum() / w.sum())
        self.history.append(rec)
        self._round = None
        self._record = None
        self._deadline = None
        self._replies = {}
        if self.checkpoint_dir is not None and self.position % self.checkpoint_every == 0:
            self.save_checkpoint()
        return rec

    def entry(self, round_idx: int) -> RoundEntry:
        """The logged entry of ``round_idx`` (KeyError if trimmed)."""
        return self.log.entries(round_idx, round_idx + 1)[0]

    def aggregated(self, round_idx: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The aggregated [τ·P] scalars (and extras) of a logged round, as float32 tensors."""
        from .protocol import unpack_scalars

        e = self.entry(round_idx)
        return unpack_scalars(e.scalars), {n: unpack_scalars(b) for n, b in e.extras}
