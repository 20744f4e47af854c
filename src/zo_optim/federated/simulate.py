"""In-process engine: a server and M clients in one process, every message encoded and decoded.

For research and tests. Each round the server samples m clients; each sampled client drops
out with probability ``dropout`` (it never answers: the round closes without it and it
catches up when next sampled); the others catch up, compute and reply; the server validates,
aggregates and applies. At the end every client is brought up to date (a ``compute=False``
task), so ``result.server`` and every ``result.clients[c]`` can be compared bit for bit.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..optim.base import ZOOptimizer
from .checkpoint import CheckpointError
from .client import FederatedWrapper
from .consistency import ReplicaCheck, check_replicas
from .protocol import decode, encode, payload_bytes
from .server import RoundRecord, Server

__all__ = ["SimulationResult", "simulate"]

ClientLoss = Callable[[torch.nn.Module, int], Any]


@dataclass
class SimulationResult:
    """What :func:`simulate` returns.

    ``server``: the server's model; ``clients``: each client's model (all caught up);
    ``history``: one :class:`~zo_optim.federated.RoundRecord` per round (sampled,
    participants, dropped, rejected, loss = n_examples-weighted mean of the participants'
    losses, bytes_up, bytes_down); ``bytes_up``/``bytes_down``: totals (payload bytes,
    the final catch-up included in ``bytes_down``); ``coordinator`` and ``wrappers`` are the
    :class:`Server` and the :class:`FederatedWrapper` objects (checksums, counters).
    """

    server: torch.nn.Module
    clients: list[torch.nn.Module]
    history: list[RoundRecord]
    bytes_up: int
    bytes_down: int
    coordinator: Server
    wrappers: list[FederatedWrapper] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.history]

    def replicas_identical(self) -> ReplicaCheck:
        """Which clients' weights and optimizer state are bit-identical to the server's, and which could not be
        compared (a client left behind the server's position); truthy only if all were checked and identical."""
        ref, pos = self.coordinator.checksum(), self.coordinator.position
        behind = [(w.client_id, f"at position {w.position}, server {pos}") for w in self.wrappers if w.position != pos]
        return check_replicas(ref, {w.client_id: w.checksum() for w in self.wrappers if w.position == pos}, behind)


def simulate(
    model_fn: Callable[[], torch.nn.Module],
    optimizer_fn: Callable[[torch.nn.Module], ZOOptimizer],
    client_losses: Sequence[ClientLoss],
    *,
    rounds: int,
    clients_per_round: int,
    local_steps: int = 1,
    seed: int = 0,
    dropout: float = 0.0,
    aggregation: str = "mean",
    log_limit: int | None = None,
    snapshot_every: int | None = None,
    progress: bool = False,
    on_round: Callable[[RoundRecord, torch.nn.Module], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: str | os.PathLike | None = None,
    n_examples: Sequence[int] | None = None,
) -> SimulationResult:
    """Run ``rounds`` federated rounds in process.

    Args:
        model_fn: builds the model; every call must give identical initial weights.
        optimizer_fn: ``optimizer_fn(model)`` builds its zo-optim optimizer (same settings each call).
        client_losses: ``client_losses[c](model, step)`` returns client c's loss on its batch number
            ``step`` (c's own counter of local steps); called once per forward of a step, so equal
            ``step`` must mean the same batch.
        rounds: rounds to run; clients_per_round: m; local_steps: τ.
        seed: server seed (round seeds) and the seed of the dropout draws.
        dropout: probability that a sampled client never answers.
        aggregation: ``"mean"``, ``"median"`` or ``"trimmed_mean"``.
        log_limit, snapshot_every: see :class:`Server`.
        progress: print a line every ~10% of the rounds.
        on_round: ``on_round(record, server_model)`` after each round is applied on the server
            (progress bars, evaluation curves); it must not change the model.
        checkpoint_dir: the server writes its checkpoint (:meth:`Server.save_checkpoint`) here, with the
            simulation's own state in it: every client's :meth:`FederatedWrapper.state_dict` and the dropout
            RNG (in one process the clients die with the server, so they are restored from the same file; a
            real client keeps its own state).
        checkpoint_every: rounds between checkpoints.
        resume: a checkpoint (file or directory) to continue from: the same arguments (``rounds`` is the
            total) then end bit-identical to the run that was never interrupted. ``on_round`` is called for
            the remaining rounds only.
    """
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"Invalid rounds: {rounds!r} (an int >= 0)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid dropout: {dropout!r} (in [0, 1))")
    n_clients = len(client_losses)
    if n_clients < 1:
        raise ValueError("client_losses is empty: give one loss function per client")
    weights = [1] * n_clients if n_examples is None else list(n_examples)
    if len(weights) != n_clients or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in weights):
        raise ValueError(f"Invalid n_examples: {n_examples!r} (one positive int per client, {n_clients} clients)")
    server_model = model_fn()
    server = Server(optimizer_fn(server_model), clients=n_clients, clients_per_round=clients_per_round,
                    local_steps=local_steps, server_seed=seed, aggregation=aggregation, log_limit=log_limit,
                    snapshot_every=snapshot_every)
    server.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    server.checkpoint_every = checkpoint_every
    models = [model_fn() for _ in range(n_clients)]
    wrappers = [FederatedWrapper(optimizer_fn(m), local_steps, client_id=c, model=m) for c, m in enumerate(models)]
    drops = random.Random(seed ^ 0x5EED)
    server.checkpoint_extra = lambda: {"clients": [w.state_dict() for w in wrappers], "drops": drops.getstate()}
    if resume is None:
        for w in wrappers:
            w.welcome(server.handshake(decode(encode(w.hello()))))  # type: ignore[arg-type]
    else:
        _resume(server, wrappers, drops, resume)
    every = max(1, rounds // 10)

    def run(c: int, task: Any) -> None:
        model, loss_fn = models[c], client_losses[c]
        reply = wrappers[c].handle(decode(encode(task)), lambda step: loss_fn(model, step),  # type: ignore[arg-type]
                                   n_examples=weights[c])
        receipt = server.receive(encode(reply))
        if receipt.retry is not None:
            run(c, receipt.retry)

    for r in range(server.position, rounds):
        tasks = server.open_round()
        for c, task in tasks.items():
            if drops.random() < dropout:
                continue
            run(c, task)
        rec = server.close_round()
        if on_round is not None:
            on_round(rec, server_model)
        if progress and (r % every == 0 or r == rounds - 1):
            loss = f"{rec.loss:.5f}" if math.isfinite(rec.loss) else "  n/a  "
            print(f"round {r:5d}  loss {loss}  participants {len(rec.participants)}/{len(rec.sampled)}  "
                  f"bytes up {rec.bytes_up:6d} down {rec.bytes_down:6d}", flush=True)
    # final catch-up: every client to the server's position (counted as download)
    final_down = final_up = 0
    for c, w in enumerate(wrappers):
        task = server.sync_task(c)
        final_down += payload_bytes(task)
        reply = encode(w.handle(decode(encode(task))))  # type: ignore[arg-type]
        final_up += payload_bytes(reply)
        server.receive(reply)
    up = sum(r.bytes_up for r in server.history) + final_up
    down = sum(r.bytes_down for r in server.history) + final_down
    return SimulationResult(server=server_model, clients=models, history=server.history, bytes_up=up, bytes_down=down,
                            coordinator=server, wrappers=wrappers)


def _resume(server: Server, wrappers: list[FederatedWrapper], drops: random.Random, path: str | os.PathLike) -> None:
    """Load the checkpoint at ``path`` into the server, the clients and the dropout RNG (validated first).

    No handshake: the clients are the checkpoint's own, and a handshake would reset what the server
    believes (who owes a reply), which the uninterrupted run never did.
    """
    extra = server.load_checkpoint(path)  # the server's state is validated and loaded atomically
    clients, state = extra.get("clients"), extra.get("drops")
    if not isinstance(clients, list) or len(clients) != len(wrappers) or state is None:
        raise CheckpointError(f"{path}: not a simulate() checkpoint of {len(wrappers)} clients")
    for w, st in zip(wrappers, clients, strict=True):
        w.load_state_dict(st)
    drops.setstate(state)
