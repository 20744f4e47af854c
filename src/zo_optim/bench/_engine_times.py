"""Seconds per round of the in-process and ``torch.distributed`` engines on the round-time bench's tiny problem.

The problem is the Flower apps' (:mod:`._flower_rt_app`): ``nn.Linear(8, 2)``, HiSo P = 5, τ = 1, every one of
``nodes`` clients sampled every round, client c's batches drawn from a generator seeded with c. ``simulate``
runs it in this process; ``run_distributed`` on ``nodes + 1`` gloo processes on 127.0.0.1 (rank 0 serves),
timed on rank 0 from the first round's start to the last round's close (the handshake and process start
excluded, as the Flower rows exclude the handshake).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import torch

__all__ = ["distributed_seconds_per_round", "simulate_seconds_per_round"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(8, 2)


def _optimizer(m: torch.nn.Module):
    from ..optim.hiso import HiSo

    return HiSo(m.parameters(), lr=0.05, num_queries=5)


def _loss(client: int):
    g = torch.Generator().manual_seed(client)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)

    def loss(m: torch.nn.Module, step: int) -> torch.Tensor:
        i = (torch.arange(16) + 16 * step) % 64
        return torch.nn.functional.cross_entropy(m(x[i]), y[i])

    return loss


def simulate_seconds_per_round(nodes: int, rounds: int) -> float:
    """Median seconds between consecutive round closes of ``simulate`` (``rounds`` >= 2)."""
    from ..federated import simulate

    marks: list[float] = []
    simulate(_model, _optimizer, [_loss(c) for c in range(nodes)], rounds=max(rounds, 2), clients_per_round=nodes,
             on_round=lambda rec, model: marks.append(time.perf_counter()))
    gaps = sorted(b - a for a, b in itertools.pairwise(marks))
    return gaps[len(gaps) // 2]


def _rank(rank: int, world: int, port: int, rounds: int, out: str) -> None:
    import torch.distributed as dist

    from ..federated.distributed import run_distributed

    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model()
        marks: list[float] = []

        def on_round(rec: object) -> None:
            marks.append(time.perf_counter())

        run_distributed(model, _optimizer(model), None if rank == 0 else (lambda step: _loss(rank - 1)(model, step)),
                        rounds=rounds, clients_per_round=world - 1, on_round=on_round)
        if rank == 0:
            gaps = sorted(b - a for a, b in itertools.pairwise(marks))
            Path(out).write_text(str(gaps[len(gaps) // 2]))
    finally:
        dist.destroy_process_group()


def distributed_seconds_per_round(nodes: int, rounds: int, out: Path) -> float:
    """Median seconds between consecutive round closes of ``run_distributed`` on ``nodes + 1`` gloo processes."""
    import torch.multiprocessing as mp

    from .net import free_port

    mp.spawn(_rank, args=(nodes + 1, free_port(), max(rounds, 2), str(out)), nprocs=nodes + 1, join=True)
    return float(out.read_text())
