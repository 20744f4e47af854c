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

Flower facts this engine is built around (verified on Flower 1.42, see DESIGN.md §7):

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
* ``ConfigRecord.count_bytes()`` fails on empty lists and on empty ``str``/``bytes`` values: our
  records hold no lists, and the wire bytes are counted by its rule here.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Result, Strategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'zo_optim.federated.flower needs Flower (flwr>=1.42): pip install "zo-optim[flower]"'
    ) from e

from ..optim.base import ZOOptimizer
from .client import FederatedWrapper
from .protocol import Hello, ProtocolError, Reply, Task, decode, encode, reply_client_id
from .protocol import Message as ZOMessage
from .server import RoundRecord, Server

__all__ = ["RECORD_KEY", "ZOStrategy", "flower_environment", "make_client_app", "make_server_app"]

#: the key of the one ConfigRecord every message carries
RECORD_KEY = "zo"
#: the key of the ConfigRecord a client keeps in ``context.state``
STATE_KEY = "zo_client"
#: the key of the ConfigRecord a sync reply adds (the client's checksum, to verify bit-identity)
META_KEY = "zo_meta"

log = logging.getLogger(__name__)


def flower_environment() -> None:
    """Switch off Flower's telemetry and update check (``setdefault``: an explicit user choice wins).

    Called wherever a run starts (the ServerApp, the ClientApp, :meth:`ZOStrategy.start`): federated
    nodes often have no route to the internet, and the check would only add start-up latency.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _record(msg: ZOMessage | dict[str, Any]) -> ConfigRecord:
    return ConfigRecord(encode(msg) if isinstance(msg, ZOMessage) else dict(msg))


def _content(msg: ZOMessage, **more: ConfigRecord) -> RecordDict:
    return RecordDict({RECORD_KEY: _record(msg), **more})


def _wire_bytes(content: RecordDict) -> int:
    """Record bytes by ``ConfigRecord.count_bytes()``'s rule: keys + values (int/float 8, bool 1, str/bytes length).

    Computed here because ``count_bytes`` raises on an empty ``str``/``bytes`` value (and an empty list),
    which our encodings hold (e.g. a task with no log entries has ``entries=b""``).
    """
    total = 0
    for record in (*content.config_records.values(), *content.metric_records.values()):
        for key, value in record.items():
            total += len(key)
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, bool):
                    total += 1
                elif isinstance(v, (str, bytes)):
                    total += len(v)
                else:
                    total += 8
    return total


# ====================================================================== server side


@dataclass
class _Pending:
    kind: str  # "hello", "task" or "sync"
    node_id: int
    client_id: int | None
    round: int | None
    sent_at: float
    retries: int = 0


class ZOStrategy(Strategy):
    """A Flower ``Strategy`` whose rounds are our :class:`~zo_optim.federated.Server`'s rounds.

    It implements Flower's ``Strategy`` interface (``configure_train`` builds the round's task
    messages, ``aggregate_train`` validates the replies and closes the round) and overrides
    ``start`` with a driver that needs what ``Strategy.start`` cannot give: a handshake before
    round 1, a deadline per round with late replies dropped, retries after a client's gap
    answer, and never a second message to a node that owes a reply. Use it through
    :func:`make_server_app` or call ``strategy.start(grid, num_rounds=...)`` from a ServerApp's
    main.

    Args:
        optimizer: the server replica's optimizer (same class and settings as every client's,
            on a model built the same way; checked at the handshake by digests of the configuration
            and of the weights).
        clients_per_round: m, sampled among the registered clients that owe no reply.
        local_steps: τ.
        server_seed: uint64 every round's seeds derive from (default: random).
        min_nodes: SuperNodes to wait for before the handshake (default: ``clients_per_round``).
        round_timeout: seconds a round stays open; later replies are dropped (default 600).
        message_ttl: Flower TTL of each message (default ``3 * round_timeout``): after it the
            SuperLink refuses the reply and the client may be sampled again.
        handshake_timeout: seconds to wait for ``min_nodes`` nodes and their hellos (and for the
            final sync).
        poll_interval: seconds between pulls.
        sync_at_end: bring every client to the final position after the last round
            (``"query.sync"`` tasks, no compute) and collect their checksums.
        **server_kwargs: passed to :class:`Server` (``aggregation``, ``log_limit``,
            ``snapshot_every``, ``max_abs_scalar``, ``extras``, ...).

    After :meth:`start`: ``server`` (the :class:`Server`: ``history``, ``rejections``, ``late``,
    ``checksum()``), ``node_of`` (client id → node id), ``refused`` (node id → reason),
    ``client_checksums`` (client id → checksum from the final sync), ``errors``, ``wire_up`` /
    ``wire_down`` (Flower record bytes per round, keys included; the final sync under round
    ``-1``).
    """

    def __init__(
        self,
        optimizer: ZOOptimizer,
        *,
        clients_per_round: int,
        local_steps: int = 1,
        server_seed: int | None = None,
        min_nodes: int | None = None,
        round_timeout: float = 600.0,
        message_ttl: float | None = None,
        handshake_timeout: float = 300.0,
        poll_interval: float = 0.05,
        sync_at_end: bool = True,
        **server_kwargs: Any,
    ) -> None:
        for name in ("clients", "release_after"):
            if name in server_kwargs:
                raise ValueError(f"Invalid argument: {name} (the strategy sets it: clients register at the "
                                 "handshake, a client is released when its message is answered or expires)")
        if min_nodes is None:
            min_nodes = clients_per_round
        if not isinstance(min_nodes, int) or min_nodes < 1:
            raise ValueError(f"Invalid min_nodes: {min_nodes!r} (an int >= 1)")
        if not round_timeout > 0:
            raise ValueError(f"Invalid round_timeout: {round_timeout!r} (seconds > 0)")
        if message_ttl is None:
            message_ttl = 3.0 * round_timeout
        if not message_ttl >= round_timeout:
            raise ValueError(f"Invalid message_ttl: {message_ttl!r} (seconds >= round_timeout {round_timeout})")
        if not handshake_timeout > 0:
            raise ValueError(f"Invalid handshake_timeout: {handshake_timeout!r} (seconds > 0)")
        if not poll_interval > 0:
            raise ValueError(f"Invalid poll_interval: {poll_interval!r} (seconds > 0)")
        # clients=(): ids come from the handshake; release_after: never by round count, the engine releases a client
        # when its message is answered, fails or expires (a node must never hold two messages)
        self.server = Server(optimizer, clients=(), clients_per_round=clients_per_round, local_steps=local_steps,
                             server_seed=server_seed, round_timeout=round_timeout, release_after=2**62,
                             **server_kwargs)
        self.min_nodes = min_nodes
        self.round_timeout = float(round_timeout)
        self.message_ttl = float(message_ttl)
        self.handshake_timeout = float(handshake_timeout)
        self.poll_interval = float(poll_interval)
        self.sync_at_end = sync_at_end
        self.node_of: dict[int, int] = {}
        self.client_of: dict[int, int] = {}
        self.refused: dict[int, str] = {}
        self.client_checksums: dict[int, str] = {}
        self.errors: list[tuple[str, int, int | None, str]] = []  # (kind, node, client, reason)
        self.wire_up: dict[int, int] = {}
        self.wire_down: dict[int, int] = {}
        self._known_nodes: set[int] = set()
        self._pending: dict[str, _Pending] = {}
        self._hellos: list[tuple[int, Hello]] = []
        self._deferred_hellos = False
        self._grid: Grid | None = None

    # ------------------------------------------------------------------ Strategy interface

    def summary(self) -> None:
        s = self.server
        log.info("ZOStrategy: %s, P=%d, tau=%d, m=%d, aggregation=%s, round timeout %.1fs, server seed %d",
                 s.optimizer.algorithm, s.optimizer.num_queries, s.replica.local_steps, s.clients_per_round,
                 s.aggregation, self.round_timeout, s.server_seed)

    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None,
                        grid: Grid) -> Iterable[Message]:
        """Open round ``server_round - 1`` (Flower counts from 1) and return its task messages.

        ``arrays`` and ``config`` are ignored: weights never travel, and the task is the whole
        configuration of a round.
        """
        self._grid = grid
        if self.server.position != server_round - 1:
            raise ValueError(f"Invalid server_round: {server_round} (the next round is {self.server.position + 1})")
        tasks = self.server.open_round()
        return [self._message(grid, "train", t, self.node_of[c]) for c, t in tasks.items()]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate ``replies`` (gap retries are sent and awaited until the deadline), close the round.

        Returns no arrays (there are none) and the round's metrics.
        """
        for msg in replies:
            self._on_reply(msg)
        if self._grid is not None:
            self._pump(self._grid, lambda: self.server.all_replied or self.server.deadline_passed())
        return None, self._close_round()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation messages: evaluate the server replica locally (``evaluate_fn``)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ driver

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Handshake, ``num_rounds`` rounds, final sync; returns Flower's ``Result`` (metrics per round).

        ``initial_arrays`` must be None or empty: every participant builds the initial weights
        itself; ``train_config`` / ``evaluate_config`` are ignored (a task is the whole
        configuration of a round). ``timeout`` overrides ``handshake_timeout``. ``evaluate_fn(round, arrays)`` gets
        the server replica's parameters as an ArrayRecord (built locally, never sent), before
        round 1 and after each round.
        """
        flower_environment()
        if initial_arrays is not None and len(initial_arrays):
            raise ValueError("Invalid initial_arrays: ZOStrategy sends no weights; every participant builds the "
                             "initial model itself (pass None)")
        if not isinstance(num_rounds, int) or num_rounds < 0:
            raise ValueError(f"Invalid num_rounds: {num_rounds!r} (an int >= 0)")
        self._grid = grid
        wait = self.handshake_timeout if timeout is None else float(timeout)
        self.summary()
        result = Result()
        if evaluate_fn is not None:
            res = evaluate_fn(0, self._arrays())
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        self.handshake(grid, timeout=wait)
        for server_round in range(1, num_rounds + 1):
            self._discover(grid)
            msgs = list(self.configure_train(server_round, None, None, grid))
            self._push(grid, msgs)
            self._pump(grid, lambda: self.server.all_replied or self.server.deadline_passed())
            metrics = self._close_round()
            result.train_metrics_clientapp[server_round] = metrics
            if evaluate_fn is not None:
                res = evaluate_fn(server_round, self._arrays())
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
        if self.sync_at_end:
            self.sync(grid, timeout=wait)
        return result

    def handshake(self, grid: Grid, timeout: float | None = None) -> None:
        """Wait for ``min_nodes`` nodes, send each a hello query and register the clients that match.

        Hellos are registered in client-id order, so the sampling sequence does not depend on
        which node started first (the same sequence as :func:`simulate` with the same ids).
        Raises ``RuntimeError`` if fewer than ``min_nodes`` nodes appear in time or none is accepted.
        """
        timeout = self.handshake_timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        # flwr.serverapp.strategy.strategy_utils.sample_nodes waits the same way, but 1 s per poll and forever
        while len(list(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() >= end:
                raise RuntimeError(f"{len(list(grid.get_node_ids()))} SuperNodes connected within {timeout:.0f}s, "
                                   f"min_nodes is {self.min_nodes}")
            time.sleep(self.poll_interval)
        self._deferred_hellos = True
        try:
            self._discover(grid)
            self._pump(grid, lambda: not any(p.kind == "hello" for p in self._pending.values()), deadline=end)
        finally:
            self._deferred_hellos = False
        for node, hello in sorted(self._hellos, key=lambda nh: nh[1].client_id):
            self._register(node, hello)
        self._hellos = []
        if not self.node_of:
            raise RuntimeError(f"no SuperNode passed the handshake: {self.refused or 'no hello arrived in time'}")

    def sync(self, grid: Grid, timeout: float | None = None) -> None:
        """Bring every registered client to the server's position (no compute) and collect checksums.

        A client whose real position differs (it lost its state) answers a gap and gets a task
        from there (at most twice). Clients that still owe a reply are skipped.
        """
        timeout = self.handshake_timeout if timeout is None else timeout
        busy = {p.node_id for p in self._pending.values()}
        msgs = [self._message(grid, "query.sync", self.server.sync_task(c), n, round_=-1)
                for c, n in self.node_of.items() if n not in busy]
        self._push(grid, msgs, kind="sync")
        self._pump(grid, lambda: not any(p.kind == "sync" for p in self._pending.values()),
                   deadline=time.monotonic() + timeout)

    def replicas_identical(self) -> bool:
        """Every client that reported at the final sync holds the server's weights and state, bit for bit."""
        ref = self.server.checksum()
        return bool(self.client_checksums) and all(c == ref for c in self.client_checksums.values())

    # ------------------------------------------------------------------ messages

    def _message(self, grid: Grid, message_type: str, msg: ZOMessage | None, node_id: int,
                 round_: int | None = None) -> Message:
        content = _content(msg) if msg is not None else RecordDict({RECORD_KEY: ConfigRecord({"op": "hello"})})
        rnd = round_ if round_ is not None else (msg.round if isinstance(msg, Task) else -1)
        out = Message(content, node_id, message_type, ttl=self.message_ttl, group_id=str(rnd))
        return out

    def _push(self, grid: Grid, messages: Iterable[Message], kind: str | None = None) -> None:
        now = time.monotonic()
        for m in messages:
            node = m.metadata.dst_node_id
            rec = m.content.config_records[RECORD_KEY]
            k = kind or ("hello" if "op" in rec else "task")
            cid = rec.get("client_id") if k != "hello" else None
            rnd = rec.get("round") if k == "task" else None
            ids = list(grid.push_messages([m]))
            if not ids:  # the SuperLink refused to store it (node gone, run stopped)
                self.errors.append((k, node, cid, "push refused"))
                if cid is not None:
                    self.server.release(int(cid))
                continue
            self._pending[ids[0]] = _Pending(k, node, None if cid is None else int(cid),
                                             None if rnd is None else int(rnd), now)
            key = -1 if rnd is None else int(rnd)
            self.wire_down[key] = self.wire_down.get(key, 0) + _wire_bytes(m.content)

    def _pump(self, grid: Grid, done: Callable[[], bool], deadline: float | None = None) -> None:
        """Pull replies of every outstanding message (older rounds too: late replies) until ``done()``."""
        while True:
            if self._pending:
                for msg in grid.pull_messages(list(self._pending)):
                    self._on_reply(msg)
            self._expire()
            if done() or (deadline is not None and time.monotonic() >= deadline):
                return
            time.sleep(self.poll_interval)

    def _expire(self) -> None:
        # the SuperLink answers an expired message with an error reply; this is the fallback if none comes
        now = time.monotonic()
        for mid, p in list(self._pending.items()):
            if now - p.sent_at > self.message_ttl + 5.0:
                del self._pending[mid]
                self.errors.append((p.kind, p.node_id, p.client_id, "expired"))
                if p.client_id is not None:
                    self.server.release(p.client_id)

    def _on_reply(self, msg: Message) -> None:
        p = self._pending.pop(msg.metadata.reply_to_message_id, None)
        if p is None:
            # a reply to a message pushed by someone else (Flower's own Strategy.start with configure_train /
            # aggregate_train): it can only be a task reply from a registered node
            cid = self.client_of.get(msg.metadata.src_node_id)
            if cid is None:
                return
            p = _Pending("task", msg.metadata.src_node_id, cid, self.server.current_round, time.monotonic())
        if msg.metadata.src_node_id != p.node_id:
            self.errors.append((p.kind, p.node_id, p.client_id, f"reply from node {msg.metadata.src_node_id}"))
            if p.client_id is not None:
                self.server.release(p.client_id)
            return
        if msg.has_error():
            self.errors.append((p.kind, p.node_id, p.client_id, str(msg.error.reason)))
            log.warning("node %d (%s): %s", p.node_id, p.kind, msg.error.reason)
            if p.client_id is not None:
                self.server.release(p.client_id)
            return
        content = msg.content
        key = -1 if p.round is None else p.round
        self.wire_up[key] = self.wire_up.get(key, 0) + _wire_bytes(content)
        if content.array_records:  # never accepted: weights do not travel
            self.errors.append((p.kind, p.node_id, p.client_id, "reply carries an ArrayRecord"))
            if p.client_id is not None:
                self.server.release(p.client_id)
            return
        record = content.config_records.get(RECORD_KEY)
        data: dict[str, Any] = dict(record) if record is not None else {}
        if p.kind == "hello":
            self._on_hello(p.node_id, data)
            return
        assert p.client_id is not None
        claimed = reply_client_id(data)
        if claimed != p.client_id:  # a node speaks only for the client it registered as
            self.server.rejections["wrong_node"] += 1
            self.errors.append((p.kind, p.node_id, p.client_id, f"reply claims client {claimed!r}"))
            self.server.release(p.client_id)
            return
        if p.kind == "sync":
            self._on_sync(p, data, content)
            return
        receipt = self.server.receive(data)
        if receipt.retry is not None and self._grid is not None:
            self._push(self._grid, [self._message(self._grid, "train", receipt.retry, p.node_id)])

    def _on_hello(self, node: int, data: dict[str, Any]) -> None:
        try:
            hello = decode(data)
        except ProtocolError as e:
            self.refused[node] = f"malformed hello: {e}"
            return
        if not isinstance(hello, Hello):
            self.refused[node] = f"expected a hello, got a {hello.kind}"
            return
        if self._deferred_hellos:
            self._hellos.append((node, hello))
        else:
            self._register(node, hello)

    def _register(self, node: int, hello: Hello) -> None:
        owner = self.node_of.get(hello.client_id)
        if owner is not None and owner != node:
            self.refused[node] = f"client id {hello.client_id} is already node {owner}'s"
            return
        welcome = self.server.handshake(hello)
        if not welcome.accepted:
            self.refused[node] = welcome.reason
            log.warning("node %d refused at the handshake: %s", node, welcome.reason)
            return
        self.node_of[hello.client_id] = node
        self.client_of[node] = hello.client_id

    def _on_sync(self, p: _Pending, data: dict[str, Any], content: RecordDict) -> None:
        assert p.client_id is not None and self._grid is not None
        try:
            reply = decode(data)
        except ProtocolError as e:
            self.errors.append(("sync", p.node_id, p.client_id, str(e)))
            return
        if isinstance(reply, Reply) and reply.status == "gap" and 0 <= reply.position <= self.server.position:
            if p.retries >= 2:
                self.errors.append(("sync", p.node_id, p.client_id, f"still at position {reply.position}"))
                return
            self.server.set_position(p.client_id, reply.position)
            self._push(self._grid, [self._message(self._grid, "query.sync", self.server.sync_task(p.client_id),
                                                  p.node_id, round_=-1)], kind="sync")
            for q in self._pending.values():
                if q.kind == "sync" and q.client_id == p.client_id:
                    q.retries = p.retries + 1
            return
        receipt = self.server.receive(data)
        meta = content.config_records.get(META_KEY)
        if receipt.accepted and meta is not None and isinstance(meta.get("checksum"), str):
            self.client_checksums[p.client_id] = str(meta["checksum"])

    def _discover(self, grid: Grid) -> None:
        """Send a hello query to every node not seen yet (late registration)."""
        new = [n for n in grid.get_node_ids() if n not in self._known_nodes]
        self._known_nodes.update(new)
        self._push(grid, [self._message(grid, "query", None, n) for n in sorted(new)], kind="hello")

    def _close_round(self) -> MetricRecord:
        rec: RoundRecord = self.server.close_round()
        metrics: dict[str, int | float] = {
            "round": rec.round,
            "participants": len(rec.participants),
            "sampled": len(rec.sampled),
            "rejected": len(rec.rejected),
            "bytes_up": rec.bytes_up,
            "bytes_down": rec.bytes_down,
            "wire_bytes_up": self.wire_up.get(rec.round, 0),
            "wire_bytes_down": self.wire_down.get(rec.round, 0),
        }
        if math.isfinite(rec.loss):
            metrics["loss"] = rec.loss
        log.info("round %d: %d/%d participants, loss %s, payload %d B up / %d B down", rec.round,
                 len(rec.participants), len(rec.sampled), f"{rec.loss:.5f}" if math.isfinite(rec.loss) else "n/a",
                 rec.bytes_up, rec.bytes_down)
        return MetricRecord(metrics)

    def _arrays(self) -> ArrayRecord:
        params = [p.detach().cpu().numpy() for g in self.server.optimizer.param_groups for p in g["params"]]
        return ArrayRecord(params)


def make_server_app(
    strategy: ZOStrategy,
    num_rounds: int,
    *,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    on_finish: Callable[[ZOStrategy, Result], None] | None = None,
) -> ServerApp:
    """A Flower ``ServerApp`` whose main runs ``strategy.start(grid, num_rounds=num_rounds)``.

    ``evaluate_fn`` is passed to :meth:`ZOStrategy.start`; ``on_finish(strategy, result)`` is
    called after the final sync (e.g. to save the server replica's weights). A ServerApp that
    needs the run config (``flwr run``) builds its strategy in its own main and calls ``start``.
    """
    if not isinstance(num_rounds, int) or num_rounds < 0:
        raise ValueError(f"Invalid num_rounds: {num_rounds!r} (an int >= 0)")
    flower_environment()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = strategy.start(grid, num_rounds=num_rounds, evaluate_fn=evaluate_fn)
        if on_finish is not None:
            on_finish(strategy, result)

    return app


# ====================================================================== client side


@dataclass
class _Participant:
    model: torch.nn.Module
    wrapper: FederatedWrapper
    loss: Callable[[torch.nn.Module, int], Any]
    n_examples: int
    token: str


# one entry per (run, node) in this process; valid only while its token matches context.state's
_PARTICIPANTS: dict[tuple[int, int], _Participant] = {}
# Model factories typically seed the global torch RNG (torch.manual_seed(...); nn.Linear(...)): two nodes built
# at once in one process (a threaded simulation backend) would interleave their draws and start from different
# weights, which the handshake's state digest would then refuse. Building one client at a time keeps model_fn's
# contract.
_BUILD_LOCK = threading.Lock()


# The ClientApp's handlers are closures, which Ray's cloudpickle ships *by value* with every message, the globals
# they name included (a copy of the cache, a lock that cannot be pickled). Module-level functions travel by
# reference, so the handlers reach this process's cache and lock only through these.
def _cached_participant(key: tuple[int, int]) -> _Participant | None:
    return _PARTICIPANTS.get(key)


def _remember_participant(key: tuple[int, int], participant: _Participant) -> None:
    _PARTICIPANTS[key] = participant


def _build_one_at_a_time(fn: Callable[[], Any]) -> Any:
    with _BUILD_LOCK:
        return fn()


def _client_id(context: Context, client_id: Callable[[Context], int] | None) -> int:
    if client_id is not None:
        return int(client_id(context))
    pid = context.node_config.get("partition-id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        return pid
    return int(context.node_id)


def make_client_app(
    model_fn: Callable[..., torch.nn.Module],
    optimizer_fn: Callable[..., ZOOptimizer],
    data_fn: Callable[[Context], Any],
    *,
    local_steps: int | Callable[[Context], int] = 1,
    extras: Iterable[str] = (),
    client_id: Callable[[Context], int] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClientApp:
    """A Flower ``ClientApp`` running a :class:`FederatedWrapper` per node.

    Args:
        model_fn: builds the model (``model_fn()`` or ``model_fn(context)``); identical initial
            weights on every call and every node (frozen parameters too: they are never sent; the
            handshake refuses a node whose trainable weights differ from the server's).
        optimizer_fn: ``optimizer_fn(model)`` or ``optimizer_fn(model, context)`` (e.g. the
            learning rate from ``context.run_config``), the same settings as the server's (the
            handshake checks a digest).
        data_fn: ``data_fn(context)`` returns this node's ``loss(model, step)`` (the loss on its
            batch number ``step``; equal steps must mean equal batches), or ``(loss, n_examples)``
            (n_examples: its weight in the mean; default 1).
        local_steps: τ (must match the strategy's), or ``local_steps(context)``.
        extras: optional extra scalar streams (as for :class:`FederatedWrapper`).
        client_id: ``client_id(context)`` → this node's client id; default: the node config's
            ``partition-id`` (set by the simulation, ``--node-config "partition-id=..."`` in
            deployment), else the node id.
        cache_dir: keep weights and optimizer state in a file per (run, node) under this
            node-local directory instead of inside ``context.state`` (big models).

    Every message may run in a fresh process (deployment): the client's position, counters,
    server seed and weights + optimizer state are written to ``context.state`` (the blob, or
    the cache file's path) after every message, and a fresh process rebuilds the client from
    there. A client that lost its state starts from position 0 and answers the next task
    with a gap; the server then sends the entries (or a snapshot) from there.
    """
    flower_environment()
    extras = tuple(extras)
    cache = None if cache_dir is None else Path(cache_dir)
    model_takes_context = len(inspect.signature(model_fn).parameters) > 0
    opt_takes_context = len(inspect.signature(optimizer_fn).parameters) > 1
    if not callable(local_steps) and (not isinstance(local_steps, int) or local_steps < 1):
        raise ValueError(f"Invalid local_steps: {local_steps!r} (an int >= 1, or local_steps(context))")

    def build(context: Context) -> _Participant:
        def make() -> tuple[torch.nn.Module, ZOOptimizer, Any]:
            model = model_fn(context) if model_takes_context else model_fn()
            opt = optimizer_fn(model, context) if opt_takes_context else optimizer_fn(model)
            return model, opt, data_fn(context)

        model, opt, data = _build_one_at_a_time(make)
        tau = local_steps(context) if callable(local_steps) else local_steps
        wrapper = FederatedWrapper(opt, int(tau), client_id=_client_id(context, client_id), model=model,
                                   extras=extras)
        loss, n = data if isinstance(data, tuple) else (data, 1)
        return _Participant(model, wrapper, loss, int(n), "")

    def participant(context: Context) -> _Participant:
        key = (context.run_id, context.node_id)
        state = context.state.config_records.get(STATE_KEY)
        cached = _cached_participant(key)
        if state is None:
            p = build(context)  # a new run for this node (or its state was lost: the protocol answers a gap)
        elif cached is not None and cached.token == state.get("token"):
            return cached
        else:
            p = build(context)
            blob = state.get("snapshot")
            if blob is None and isinstance(state.get("cache_file"), str):
                path = Path(str(state["cache_file"]))
                blob = path.read_bytes() if path.exists() else None
            if isinstance(blob, bytes):
                sd: dict[str, Any] = {"position": state["position"], "snapshot": blob,
                                      "server_seed": state.get("server_seed"),
                                      "local_step_counter": state["local_step_counter"]}
                p.wrapper.load_state_dict(sd)
        _remember_participant(key, p)
        return p

    def save(context: Context, p: _Participant) -> None:
        sd = p.wrapper.state_dict()
        token = uuid.uuid4().hex
        rec = ConfigRecord({"position": int(sd["position"]), "local_step_counter": int(sd["local_step_counter"]),
                            "client_id": p.wrapper.client_id, "token": token})
        if sd["server_seed"] is not None:
            rec["server_seed"] = int(sd["server_seed"])
        if cache is None:
            rec["snapshot"] = sd["snapshot"]
        else:
            path = cache / f"zo-{context.run_id}-{context.node_id}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{token}.tmp")
            tmp.write_bytes(sd["snapshot"])
            tmp.replace(path)  # atomic: a crash leaves the previous state, never half a file
            rec["cache_file"] = str(path)
        context.state[STATE_KEY] = rec
        p.token = token

    app = ClientApp()

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        flower_environment()
        p = participant(context)
        if STATE_KEY not in context.state.config_records:
            save(context, p)
        return Message(_content(p.wrapper.hello()), reply_to=msg)

    def handle(msg: Message, context: Context) -> Message:
        flower_environment()
        p = participant(context)
        record = msg.content.config_records.get(RECORD_KEY)
        if record is None:
            raise ProtocolError(f"message has no {RECORD_KEY!r} ConfigRecord")
        task = decode(dict(record))
        if not isinstance(task, Task):
            raise ProtocolError(f"expected a task, got a {task.kind}")
        model, loss = p.model, p.loss
        reply = p.wrapper.handle(task, lambda step: loss(model, step), n_examples=p.n_examples)
        save(context, p)
        more = {}
        if reply.status == "synced":
            more[META_KEY] = ConfigRecord({"checksum": p.wrapper.checksum()})
        return Message(_content(reply, **more), reply_to=msg)

    app.train()(handle)
    app.query("sync")(handle)
    return app
