"""Data parallel without a DDP wrapper: average the per-step scalars across ranks.

A ZO step is fully described by (seed, scalars), so replicas that start from the
same weights stay bit-identical if they agree on the seed and on the scalars:
every rank measures its own losses on its own data, the scalars are averaged
with one all-reduce (4 bytes per scalar), and every rank applies the same update.
Sums over examples (HELENE's Σ_b g_b²) and the non-finite flag travel in the
same all-reduce and are summed instead of averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of ranks when ``torch.distributed`` is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) a float32 tensor; a no-op on one rank."""
    if world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_seed(seed: int, device: torch.device) -> int:
    """Rank 0's base seed on every rank (uint64 carried as two int64 halves)."""
    if world_size() == 1:
        return seed
    words = torch.tensor([seed & 0xFFFFFFFF, seed >> 32], dtype=torch.int64, device=device)
    dist.broadcast(words, src=0)
    lo, hi = (int(w) for w in words.tolist())
    return lo | (hi << 32)


def active(enabled: bool) -> bool:
    """Whether an optimizer with ``data_parallel=enabled`` is one replica of a data-parallel step now."""
    return enabled and world_size() > 1


def mean_across_ranks(
    grads: torch.Tensor,
    extras: dict[str, torch.Tensor],
    weight: float,
    nonfinite: bool,
    summed: frozenset[str],
    ungated: Callable[..., Any],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """A pending estimate's scalars averaged across micro-batches AND ranks, and the any-rank non-finite flag.

    ``grads``/``extras`` are this rank's weighted sums Σ w·g, Σ w·x (Σ x for the ``summed`` extras), ``weight``
    its Σ w. One all-reduce (SUM) of all of them and the non-finite flag, run through ``ungated`` (the wait may
    block: Ctrl-C must interrupt it).
    """
    names = sorted(extras)
    device = grads.device
    tail = torch.tensor([weight, 1.0 if nonfinite else 0.0], dtype=torch.float32, device=device)
    packed = ungated(sum_across_ranks, torch.cat([grads, *(extras[k] for k in names), tail]))
    q = grads.numel()
    total = packed[-2]
    grads = packed[:q] / total
    sums = {k: packed[q * (i + 1): q * (i + 2)] for i, k in enumerate(names)}
    extras = {k: v if k in summed else v / total for k, v in sums.items()}
    return grads, extras, bool(packed[-1] > 0)
