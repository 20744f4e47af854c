"""``zo-optim federated --engine distributed``: the same rounds over ``torch.distributed``, launched by torchrun.

    torchrun --nproc-per-node 5 -m zo_optim.cli federated --engine distributed --clients 4 --clients-per-round 2

One process per rank (:func:`~zo_optim.federated.distributed.run_distributed`): rank 0 serves (and alone encodes
the tweets, evaluates, prints and writes ``--out``); rank ``c + 1`` is client ``c``, so ``--clients`` must be
the world size minus one. Rank 0 saves the encoded task to ``--out/task.pt`` and the clients load it (one
encoder pass, not one per rank). Every client applies every round's broadcast aggregate, so all are at the
server's position at the end; their checksums are gathered and compared with the server's. The same settings
give the same checksum as ``--engine simulate`` (collectives block: no ``--dropout``, no deadline).
Backend: gloo (CPU tensors; the head is small and the messages are a few scalars).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistributedRun", "init_group", "run_client", "run_server"]


def init_group(args: argparse.Namespace) -> int:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...); returns this rank.

    Checked before any collective (a ValueError, exit 2): launched by torchrun, and ``--clients`` = world - 1.
    """
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("Invalid --engine distributed without torchrun: launch it with e.g. `torchrun "
                         "--nproc-per-node 5 -m zo_optim.cli federated --engine distributed --clients 4` (rank 0 "
                         "serves, one rank per client)")
    world = int(os.environ["WORLD_SIZE"])
    if world - 1 != args.clients:
        raise ValueError(f"Invalid --clients {args.clients} with --engine distributed on {world} ranks: rank 0 "
                         f"serves and each other rank is one client, so --clients must be {world - 1} (or launch "
                         f"{args.clients + 1} processes)")
    if args.dropout:
        raise ValueError("Invalid --dropout with --engine distributed: dropout is simulated by the in-process "
                         "engine only (collectives block)")
    if args.checkpoint_dir is not None or args.resume is not None:
        raise ValueError("Invalid --checkpoint-dir/--resume with --engine distributed: not supported yet (restart "
                         "a failed rank from FederatedWrapper.state_dict(); docs/federated.md)")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank()


@dataclass
class DistributedRun:
    """What the CLI's report needs (the fields :class:`~zo_optim.federated.SimulationResult` has)."""

    server: torch.nn.Module
    history: list[Any]
    bytes_up: int
    bytes_down: int
    check: Any

    def replicas_identical(self) -> Any:
        return self.check


def _task_path(args: argparse.Namespace) -> Any:
    return (args.out / "task.pt").resolve()


def run_server(args: argparse.Namespace, task: Any, optimizer_fn: Any, on_round: Any) -> DistributedRun:
    """Rank 0: publish the encoded task to the clients, serve the rounds, gather and compare their checksums."""
    import torch.distributed as dist

    from ..federated.consistency import check_replicas
    from ..federated.distributed import run_distributed

    args.out.mkdir(parents=True, exist_ok=True)
    task.save(_task_path(args))
    dist.barrier()  # the clients load the task only now
    model = task.model_fn()
    res = run_distributed(model, optimizer_fn(model), None, rounds=args.rounds,
                          clients_per_round=args.clients_per_round, local_steps=args.local_steps, seed=args.seed,
                          aggregation=args.aggregation, on_round=lambda rec: on_round(rec, model))
    sums: list[Any] = [None] * dist.get_world_size()
    dist.gather_object(None, sums, dst=0)
    dist.destroy_process_group()
    check = check_replicas(res.checksum, {rank - 1: s for rank, s in enumerate(sums) if rank > 0})
    history = res.history
    return DistributedRun(model, history, sum(r.bytes_up for r in history), sum(r.bytes_down for r in history), check)


def run_client(args: argparse.Namespace, optimizer_fn: Any) -> None:
    """Rank c + 1: client c on the task rank 0 saved; its checksum goes to rank 0 at the end."""
    import torch.distributed as dist

    from ..federated.distributed import run_distributed
    from .tweets import load_task

    dist.barrier()  # rank 0 has saved the task
    task = load_task(_task_path(args))
    client = dist.get_rank() - 1
    model, loss = task.model_fn(), task.client_loss(client)
    res = run_distributed(model, optimizer_fn(model), lambda step: loss(model, step), rounds=args.rounds,
                          clients_per_round=args.clients_per_round, local_steps=args.local_steps, seed=args.seed,
                          aggregation=args.aggregation)
    dist.gather_object(res.checksum, None, dst=0)
    dist.destroy_process_group()
