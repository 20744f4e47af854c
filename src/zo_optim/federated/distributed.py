"""``torch.distributed`` engine: rank 0 serves, ranks 1..W-1 are clients 0..W-2.

For one cluster or cross-silo training over gloo/NCCL. Every message of a round is a
fixed-size tensor, so it maps onto three collectives (V = τ·P·(1 + #extra streams)):

1. ``broadcast`` int64 ``[1 + M]`` from rank 0: the round and which clients are sampled;
2. ``gather`` to rank 0: int64 ``[3]`` (status, position, n_examples) and float32 ``[1 + V]``
   (loss, scalars) from every rank (non-sampled ranks send zeros);
3. ``broadcast`` float32 ``[1 + V]`` from rank 0: n_participants and the aggregated scalars,
   which every client applies (so all clients stay at the server's position and tasks need
   no log entries).

Rank 0 rebuilds :class:`Reply` objects from the gathered tensors and validates them with
the same :class:`Server` as any engine; the handshake (once) uses ``gather_object`` /
``broadcast_object_list``. Collectives block, so there is no deadline and no dropout here;
a rank that fails takes the process group down (restart from ``FederatedWrapper.state_dict``).
Use CPU tensors with gloo and CUDA tensors with NCCL (``device=``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .. import rng
from ..optim.base import ZOOptimizer
from .client import FederatedWrapper, StepClosure
from .protocol import Reply, RoundEntry, Task, decode, encode, pack_scalars
from .server import RoundRecord, Server

__all__ = ["DistributedResult", "run_distributed"]

_STATUS = {"ok": 1, "gap": 2}
_STATUS_NAME = {v: k for k, v in _STATUS.items()}


@dataclass
class DistributedResult:
    """What :func:`run_distributed` returns on each rank.

    Rank 0: ``server`` (the :class:`Server`), ``history``. Other ranks: ``wrapper``.
    ``tensor_bytes_up``/``tensor_bytes_down``: bytes this rank sent / received in the per-round
    collectives (the handshake excluded).
    """

    rank: int
    checksum: str
    server: Server | None = None
    wrapper: FederatedWrapper | None = None
    history: list[RoundRecord] = field(default_factory=list)
    tensor_bytes_up: int = 0
    tensor_bytes_down: int = 0


def run_distributed(
    model: torch.nn.Module,
    optimizer: ZOOptimizer,
    closure: StepClosure | None,
    *,
    rounds: int,
    clients_per_round: int,
    local_steps: int = 1,
    seed: int = 0,
    aggregation: str = "mean",
    n_examples: int = 1,
    group: Any = None,
    device: torch.device | str = "cpu",
    on_round: Callable[[RoundRecord], None] | None = None,
) -> DistributedResult:
    """Run ``rounds`` federated rounds; call it on every rank of the (initialised) process group.

    Args:
        model, optimizer: this rank's model and zo-optim optimizer (same construction on every rank).
        closure: clients: ``closure(step) -> loss`` on the client's batch ``step`` (rank 0: unused, may be None).
        rounds, clients_per_round (m ≤ W-1), local_steps (τ), seed (server seed), aggregation: as in ``simulate``.
        n_examples: this client's weight in the mean.
        group: process group (default: the world).
        device: where the collective tensors live (CUDA for NCCL).
        on_round: rank 0 calls it with each closed round's record.
    """
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    if world < 2:
        raise ValueError("run_distributed needs at least 2 ranks (rank 0 serves, the others are clients)")
    n_clients = world - 1
    src = dist.get_global_rank(group, 0) if group is not None else 0
    device = torch.device(device)
    server: Server | None = None
    wrapper: FederatedWrapper | None = None
    if rank == 0:
        server = Server(optimizer, clients=n_clients, clients_per_round=clients_per_round, local_steps=local_steps,
                        server_seed=seed, aggregation=aggregation)
        streams = server.streams
        nvals = server.replica.num_values
    else:
        wrapper = FederatedWrapper(optimizer, local_steps, client_id=rank - 1, model=model)
        streams = wrapper.replica.streams
        nvals = wrapper.replica.num_values

    # handshake (once, variable size): every client's hello to rank 0, every welcome back
    hellos: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(encode(wrapper.hello()) if wrapper else None, hellos if rank == 0 else None, dst=src,
                       group=group)
    welcomes: list[Any] = [None] * world
    if server is not None:
        welcomes = [None] + [encode(server.handshake(h)) for h in hellos[1:]]
    dist.broadcast_object_list(welcomes, src=src, group=group)
    if wrapper is not None:
        wrapper.welcome(decode(welcomes[rank]))  # type: ignore[arg-type]

    width = 1 + nvals * (1 + len(streams))
    up = down = 0
    for _ in range(rounds):
        ctrl = torch.zeros(1 + n_clients, dtype=torch.int64, device=device)
        if server is not None:
            tasks = server.open_round()
            ctrl[0] = server.current_round  # type: ignore[assignment]
            for c in tasks:
                ctrl[1 + c] = 1
        dist.broadcast(ctrl, src=src, group=group)
        rnd = int(ctrl[0])
        head = torch.zeros(3, dtype=torch.int64, device=device)
        vals = torch.zeros(width, dtype=torch.float32, device=device)
        if wrapper is not None:
            down += ctrl.numel() * 8
            cid = wrapper.client_id
            if ctrl[1 + cid]:
                task = Task(round=rnd, client_id=cid, server_seed=wrapper.replica.server_seed or 0,
                            algorithm=optimizer.algorithm, rng_version=rng.RNG_VERSION,
                            num_queries=optimizer.num_queries, local_steps=local_steps, log_start=rnd,
                            streams=",".join(streams))
                reply = wrapper.handle(task, closure, n_examples=n_examples)
                head[0] = _STATUS.get(reply.status, 3)
                head[1] = reply.position
                head[2] = reply.n_examples
                if reply.status == "ok":
                    vals[0] = reply.loss
                    parts = [torch.frombuffer(bytearray(reply.scalars), dtype=torch.float32)]
                    parts += [torch.frombuffer(bytearray(b), dtype=torch.float32) for _, b in reply.extras]
                    vals[1:] = torch.cat(parts).to(device)
            up += head.numel() * 8 + vals.numel() * 4
        heads = [torch.zeros_like(head) for _ in range(world)] if rank == 0 else None
        valss = [torch.zeros_like(vals) for _ in range(world)] if rank == 0 else None
        dist.gather(head, heads, dst=src, group=group)
        dist.gather(vals, valss, dst=src, group=group)
        out = torch.zeros(width, dtype=torch.float32, device=device)
        if server is not None:
            assert heads is not None and valss is not None
            for c in range(n_clients):
                if not ctrl[1 + c]:
                    continue
                h, v = heads[1 + c].cpu(), valss[1 + c].cpu()
                status = _STATUS_NAME.get(int(h[0]), "invalid")
                extras = tuple((n, pack_scalars(v[1 + nvals * (i + 1): 1 + nvals * (i + 2)]))
                               for i, n in enumerate(streams)) if status == "ok" else ()
                server.receive(Reply(round=rnd, client_id=c, status=status, position=int(h[1]),
                                     algorithm=optimizer.algorithm, rng_version=rng.RNG_VERSION,
                                     n_examples=int(h[2]), loss=float(v[0]),
                                     scalars=pack_scalars(v[1: 1 + nvals]) if status == "ok" else b"",
                                     extras=extras))
            rec = server.close_round()
            entry = server.entry(rnd)
            out[0] = entry.n_participants
            if not entry.empty:
                from .protocol import unpack_scalars

                flat = [unpack_scalars(entry.scalars), *(unpack_scalars(b) for _, b in entry.extras)]
                out[1:] = torch.cat(flat).to(device)
            for c in range(n_clients):  # every client applies the broadcast entry below
                server.set_position(c, server.position)
            if on_round is not None:
                on_round(rec)
        dist.broadcast(out, src=src, group=group)
        if wrapper is not None:
            down += out.numel() * 4
            o = out.cpu()
            n_part = int(o[0])
            entry = RoundEntry(round=rnd, n_participants=n_part,
                               scalars=pack_scalars(o[1: 1 + nvals]) if n_part else b"",
                               extras=tuple((n, pack_scalars(o[1 + nvals * (i + 1): 1 + nvals * (i + 2)]))
                                            for i, n in enumerate(streams)) if n_part else ())
            wrapper.replica.apply(entry)
    if server is not None:
        return DistributedResult(rank=rank, checksum=server.checksum(), server=server, history=server.history,
                                 tensor_bytes_up=rounds * (1 + n_clients) * 8 + rounds * width * 4,
                                 tensor_bytes_down=rounds * n_clients * (3 * 8 + width * 4))
    assert wrapper is not None
    return DistributedResult(rank=rank, checksum=wrapper.checksum(), wrapper=wrapper, tensor_bytes_up=up,
                             tensor_bytes_down=down)
