"""The Flower ServerApp side: :class:`ZOStrategy`, a Flower ``Strategy`` whose rounds are our ``Server``'s.

The round logic lives here: settings, Flower's ``Strategy`` interface, and the driver
(:meth:`ZOStrategy.start`: handshake, rounds with a deadline each, final sync). The messages it
sends and the replies it dispatches are in :mod:`~zo_optim.federated.flower.messaging`, its base
class. The Flower facts both are built around are listed in :mod:`zo_optim.federated.flower`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ...optim.base import ZOOptimizer
from ..consistency import ReplicaCheck, check_replicas
from ..protocol import Hello
from ..server import RoundRecord, Server
from ._environment import flower_environment, flower_logger
from .identity import Identities
from .messaging import _Messaging, _Pending

__all__ = ["ZOStrategy"]

log = flower_logger("strategy")


class ZOStrategy(_Messaging, Strategy):
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
        idle_timeout: seconds a round waits, before it opens, for an eligible client while none is (every
            connected client still owes a reply, or no node is connected): a round never closes empty
            just because late replies have not released their clients yet. Once one is, the replies other
            connected clients still owe get up to ``min(round_timeout, idle_timeout)`` more, so the round
            samples ``clients_per_round`` clients rather than the first one freed. Default ``message_ttl + 5``
            (by then every owed message has expired and its client is released); ``0``: never wait.
            No wait when every client is quarantined (quarantine ends by round count).
        resume: a server checkpoint (file or ``checkpoint_dir``) to continue from, loaded here, before
            the handshake (:meth:`Server.load_checkpoint`: validated whole, a bad file raises
            :class:`~zo_optim.federated.checkpoint.CheckpointError` and nothing changes). The rounds
            then run from ``server.position + 1`` to ``num_rounds`` (the total), and the clients
            rejoin at the handshake with the positions they announce; to end bit-identical to the
            uninterrupted run they must keep their state across Flower runs
            (``make_client_app(state_dir=...)``). ``min_nodes`` defaults to the clients the
            checkpoint knows.
        **server_kwargs: passed to :class:`Server` (``aggregation``, ``log_limit``,
            ``snapshot_every``, ``max_abs_scalar``, ``extras``, ...).

    Identity (:mod:`~zo_optim.federated.flower.identity`): a client id is bound to the secret of the node that
    first registered it (trust on first use; the pins ride in the checkpoint); a hello for that id from another
    node id is accepted only with the same secret, and then the client is re-bound to the new node (a SuperNode
    restarted without auth). A client whose node Flower no longer lists as online is away (not sampled).

    After :meth:`start`: ``server`` (the :class:`Server`: ``history``, ``rejections``, ``late``,
    ``checksum()``), ``node_of`` (client id → node id), ``refused`` (node id → reason), ``rebound``
    ((client, old node, new node) per re-bind), ``identities`` (the pins),
    ``client_checksums`` (client id → checksum from the final sync), ``errors``, ``wire_up`` /
    ``wire_down`` (Flower record bytes per round, keys included; the final sync under round
    ``-1``).
    """

    #: seconds the handshake waits for the remaining hellos once ``min_nodes`` have arrived
    HELLO_GRACE = 10.0

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
        idle_timeout: float | None = None,
        resume: str | os.PathLike[str] | None = None,
        **server_kwargs: Any,
    ) -> None:
        for name in ("clients", "release_after"):
            if name in server_kwargs:
                raise ValueError(f"Invalid argument: {name} (the strategy sets it: clients register at the "
                                 "handshake, a client is released when its message is answered or expires)")
        if min_nodes is not None and (not isinstance(min_nodes, int) or min_nodes < 1):
            raise ValueError(f"Invalid min_nodes: {min_nodes!r} (an int >= 1)")
        if not round_timeout > 0:
            raise ValueError(f"Invalid round_timeout: {round_timeout!r} (seconds > 0)")
        if message_ttl is None:
            message_ttl = 3.0 * round_timeout
        if not message_ttl >= round_timeout:
            raise ValueError(f"Invalid message_ttl: {message_ttl!r} (seconds >= round_timeout {round_timeout})")
        if idle_timeout is None:
            idle_timeout = message_ttl + 5.0
        if not idle_timeout >= 0:
            raise ValueError(f"Invalid idle_timeout: {idle_timeout!r} (seconds >= 0)")
        if not handshake_timeout > 0:
            raise ValueError(f"Invalid handshake_timeout: {handshake_timeout!r} (seconds > 0)")
        if not poll_interval > 0:
            raise ValueError(f"Invalid poll_interval: {poll_interval!r} (seconds > 0)")
        # clients=(): ids come from the handshake; release_after: never by round count, the engine releases a client
        # when its message is answered, fails or expires (a node must never hold two messages)
        self.server = Server(optimizer, clients=(), clients_per_round=clients_per_round, local_steps=local_steps,
                             server_seed=server_seed, round_timeout=round_timeout, release_after=2**62,
                             **server_kwargs)
        self.wire_up: dict[int, int] = {}
        self.wire_down: dict[int, int] = {}
        self.identities = Identities()
        # the record byte counters and the identity pins travel with the server's checkpoint, so a resumed run's
        # totals are the whole run's and a returning client must prove the secret it first registered with
        self.server.checkpoint_extra = lambda: {"flower": {"wire_up": dict(self.wire_up),
                                                           "wire_down": dict(self.wire_down),
                                                           "identities": self.identities.state_dict()}}
        if resume is not None:
            extra = self.server.load_checkpoint(resume)  # atomic: a bad checkpoint raises and changes nothing
            wire = extra.get("flower", {}) if isinstance(extra, dict) else {}
            self.wire_up = {int(k): int(v) for k, v in wire.get("wire_up", {}).items()}
            self.wire_down = {int(k): int(v) for k, v in wire.get("wire_down", {}).items()}
            self.identities = Identities.from_state(wire.get("identities", {}))
            if min_nodes is None:
                min_nodes = max(1, len(self.server.clients))
        self.min_nodes = clients_per_round if min_nodes is None else min_nodes
        self.round_timeout = float(round_timeout)
        self.message_ttl = float(message_ttl)
        self.idle_timeout = float(idle_timeout)
        self.handshake_timeout = float(handshake_timeout)
        self.poll_interval = float(poll_interval)
        self.sync_at_end = sync_at_end
        self.node_of: dict[int, int] = {}
        self.client_of: dict[int, int] = {}
        self.refused: dict[int, str] = {}
        self.client_checksums: dict[int, str] = {}
        self.errors: list[tuple[str, int, int | None, str]] = []  # (kind, node, client, reason)
        self._known_nodes: set[int] = set()
        self._hello_retries: dict[int, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._hellos: list[tuple[int, Hello, str]] = []
        self._online: set[int] | None = None
        self.rebound: list[tuple[int, int, int]] = []  # (client, old node, new node): restarted nodes re-bound
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
        self._refresh_away(grid)
        tasks = self.server.open_round()
        for c in [c for c in tasks if c not in self.node_of]:
            # a client the resumed checkpoint knows but whose node has not said hello in this run: no node to
            # send to, so it is released now and the round records it as dropped (as a lost message would be)
            del tasks[c]
            self.server.release(c)
            log.warning("round %d: client %d has no node in this run (not reconnected): dropped", server_round - 1, c)
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
        first = self.server.position  # 0, or the rounds a resumed checkpoint had closed
        if num_rounds < first:
            raise ValueError(f"Invalid num_rounds: {num_rounds} (the total; the resumed checkpoint has already "
                             f"closed {first} rounds)")
        self._grid = grid
        wait = self.handshake_timeout if timeout is None else float(timeout)
        self.summary()
        result = Result()
        if evaluate_fn is not None:
            res = evaluate_fn(first, self._arrays())
            if res is not None:
                result.evaluate_metrics_serverapp[first] = res
        self.handshake(grid, timeout=wait)
        for server_round in range(first + 1, num_rounds + 1):
            self._discover(grid)
            self._refresh_away(grid)
            self._wait_for_eligible(grid, server_round - 1)
            msgs = list(self.configure_train(server_round, None, None, grid))
            self._push(grid, msgs)
            self._pump(grid, self._round_over(grid))
            metrics = self._close_round()
            result.train_metrics_clientapp[server_round] = metrics
            if evaluate_fn is not None:
                res = evaluate_fn(server_round, self._arrays())
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
        if self.sync_at_end:
            self.sync(grid, timeout=wait)
        self._log_summary(first)
        return result

    @property
    def rounds_trained(self) -> int:
        """Closed rounds (this run and any resumed from) whose aggregate was applied: at least one valid reply,
        not refused as a whole. The others were applied as empty rounds (every replica only moves its position)."""
        return sum(1 for r in self.server.history if r.participants and not r.aggregate_refused)

    def _round_over(self, grid: Grid) -> Callable[[], bool]:
        """The open round's end test: every sampled client answered or the deadline passed. Once a second it also
        says hello to new nodes: a SuperNode restarted mid-round (a new node id) re-claims its client now, which
        gives up the message its dead node owes, so the round closes without waiting for its deadline."""
        last = [time.monotonic()]

        def over() -> bool:
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                self._discover(grid)
            return self.server.all_replied or self.server.deadline_passed()

        return over

    def _refresh_away(self, grid: Grid) -> None:
        """Take out of sampling the clients whose node is not online (Flower marks a node offline when it missed its
        heartbeats: about 60 s after a kill, by flwr's defaults) or that have no node in this run; they keep their
        position and are sampled again when their node is back online or a restarted node proves their secret.
        Without this a dead registration is sampled round after round and each time loses a slot."""
        online = self._online = set(grid.get_node_ids())
        away = {c for c in self.server.clients if self.node_of.get(c) not in online}
        for c in sorted(away - self.server.away):
            log.info("client %d is away (node %s offline or gone): not sampled until it is back", c,
                     self.node_of.get(c))
        self.server.away = away

    def _eligible_connected(self) -> list[int]:
        return [c for c in self.server.eligible() if c in self.node_of]

    def _wait_for_eligible(self, grid: Grid, rnd: int) -> None:
        """Before round ``rnd`` opens: while no connected client may be sampled and one could become so (a client
        owes a reply, or no node is connected yet), pull replies and look for new nodes, up to ``idle_timeout``."""
        if self._eligible_connected() or self.idle_timeout == 0:
            return
        if self.node_of and not self.server.owes and not self.server.away:
            return  # every connected client is quarantined: only rounds end a quarantine, waiting cannot help
        log.info("round %d: no eligible client (%d owe a reply, %d connected); waiting up to %.1fs", rnd,
                 len(self.server.owes), len(self.node_of), self.idle_timeout)
        t0 = time.monotonic()
        last = [t0]

        def ready() -> bool:
            if time.monotonic() - last[0] >= 1.0:  # new nodes: a Grid call, so once a second
                last[0] = time.monotonic()
                self._discover(grid)
                self._refresh_away(grid)
            return bool(self._eligible_connected())

        self._pump(grid, ready, deadline=t0 + self.idle_timeout)
        if self._eligible_connected():
            self._gather_late_replies(grid)
            log.info("round %d: %d client(s) eligible after %.1fs", rnd, len(self._eligible_connected()),
                     time.monotonic() - t0)
        else:
            waited = time.monotonic() - t0
            log.warning("round %d: still no eligible client after %.1fs: the round runs empty", rnd, waited)

    def _gather_late_replies(self, grid: Grid) -> None:
        """The wait found a first eligible client: late replies that released it usually arrive together (one
        slow round for everyone), so give the others owed by connected clients up to ``min(round_timeout,
        idle_timeout)`` more to arrive, or the round opens with the first one alone and samples fewer than
        ``clients_per_round`` clients while the rest are about to be free."""
        def enough() -> bool:
            owed = [c for c in self.server.owes if c in self.node_of]
            return not owed or len(self._eligible_connected()) >= self.server.clients_per_round

        if not enough():
            self._pump(grid, enough, deadline=time.monotonic() + min(self.round_timeout, self.idle_timeout))

    def _log_summary(self, first: int) -> None:
        hist = self.server.history
        ran = hist[first:]
        trained = sum(1 for r in ran if r.participants and not r.aggregate_refused)
        log.info("ZOStrategy: %d round(s) run (%d trained, %d empty), %d trained of %d in the federation; "
                 "replicas: %s", len(ran), trained, len(ran) - trained, self.rounds_trained, len(hist),
                 self.replicas_identical().describe())

    def handshake(self, grid: Grid, timeout: float | None = None) -> None:
        """Wait for ``min_nodes`` nodes, send each a hello query and register the clients that match.

        Hellos are registered in client-id order, so the sampling sequence does not depend on
        which node started first (the same sequence as :func:`simulate` with the same ids). Once
        ``min_nodes`` hellos are in, the others get :attr:`HELLO_GRACE` seconds (a killed node's id stays
        listed ~60 s and never answers); a hello answered later registers its node when it arrives.
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
        enough_at: list[float] = []

        def answered() -> bool:
            # every hello answered; or min_nodes were and the rest had HELLO_GRACE more seconds: a node id that
            # Flower still lists as online but whose process is dead (killed; it stays "online" until its heartbeat
            # deadline, ~60 s) never answers, and must not hold up the federation. Its hello stays outstanding; a
            # later answer registers the node then (_on_hello), a dead node's expires.
            if not any(p.kind == "hello" for p in self._pending.values()):
                return True
            if len(self._hellos) >= self.min_nodes and not enough_at:
                enough_at.append(time.monotonic())
            return bool(enough_at) and time.monotonic() - enough_at[0] >= self.HELLO_GRACE

        try:
            self._discover(grid)
            self._pump(grid, answered, deadline=end)
        finally:
            self._deferred_hellos = False
        for node, hello, token in sorted(self._hellos, key=lambda nh: nh[1].client_id):
            self._register(node, hello, token)
        self._hellos = []
        if not self.node_of:
            raise RuntimeError(f"no SuperNode passed the handshake: {self.refused or 'no hello arrived in time'}")

    def sync(self, grid: Grid, timeout: float | None = None) -> None:
        """Bring every registered client to the server's position (no compute) and collect checksums.

        A client whose real position differs (it lost its state) answers a gap and gets a task
        from there (at most twice). Task replies still in flight from online nodes are waited for first
        (within ``timeout``); clients that still owe one after that are skipped.
        """
        timeout = self.handshake_timeout if timeout is None else timeout
        end = time.monotonic() + timeout
        # a task reply still in flight (the last round closed at its deadline while an online node was still
        # computing) would make its client skipped here and unchecked: give those up to the timeout to arrive
        # (late: logged, not applied; it releases the client). A node Flower no longer lists is not waited for.
        online = set(grid.get_node_ids())
        self._pump(grid, lambda: not any(p.kind == "task" and p.node_id in online for p in self._pending.values()),
                   deadline=end)
        # a node computing a task is not sent a sync as well; a hello still pending to a registered node is only
        # the duplicate of one it answered (messaging.HELLO_RESEND) and does not make it busy
        busy = {p.node_id for p in self._pending.values() if p.kind != "hello"}
        msgs = [self._message(grid, "query.sync", self.server.sync_task(c), n, round_=-1)
                for c, n in self.node_of.items() if n not in busy]
        self._push(grid, msgs, kind="sync")
        self._pump(grid, lambda: not any(p.kind == "sync" for p in self._pending.values()),
                   deadline=max(end, time.monotonic() + self.round_timeout))

    def replicas_identical(self) -> ReplicaCheck:
        """Which clients hold the server's weights and state bit for bit at the final sync, and which were not
        checked and why (a node still owing a reply, one that sent no checksum, a refused node); truthy only if
        every registered client was checked and all are identical."""
        owes = self.server.owes
        unchecked: list[tuple[int | str, str]] = [
            (c, f"owes a reply for round {owes[c]}" if c in owes else "sent no checksum at the final sync")
            for c in self.node_of if c not in self.client_checksums]
        unchecked += [(c, "did not reconnect after the resume") for c in self.server.clients if c not in self.node_of]
        unchecked += [(f"node {n}", f"refused: {why}") for n, why in self.refused.items()]
        return check_replicas(self.server.checksum(), self.client_checksums, unchecked)

    # ------------------------------------------------------------------ round metrics, evaluation

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
        refused = "; ".join(f"client {c}: {why}" for c, why in rec.rejected)
        log.info("round %d: %d/%d participants%s%s, loss %s, payload %d B up / %d B down, records %d B up / %d B down"
                 "%s%s", rec.round, len(rec.participants), len(rec.sampled),
                 f", dropped {list(rec.dropped)}" if rec.dropped else "",
                 f", refused {len(rec.rejected)} ({refused})" if rec.rejected else "",
                 f"{rec.loss:.5f}" if math.isfinite(rec.loss) else "n/a", rec.bytes_up, rec.bytes_down,
                 metrics["wire_bytes_up"], metrics["wire_bytes_down"],
                 f", quarantined {rec.quarantined}" if rec.quarantined else "",
                 f", aggregate refused ({rec.aggregate_refused}): applied empty" if rec.aggregate_refused else "")
        return MetricRecord(metrics)

    def _arrays(self) -> ArrayRecord:
        params = [p.detach().cpu().numpy() for g in self.server.optimizer.param_groups for p in g["params"]]
        return ArrayRecord(params)

