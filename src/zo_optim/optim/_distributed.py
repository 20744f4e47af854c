"""Data parallel without a DDP wrapper: average the per-step scalars across ranks.

A ZO step is fully described by (seed, scalars), so replicas that start from the
same weights stay bit-identical if they agree on the seed and on the scalars:
every rank measures its own losses on its own data, the scalars are averaged
with one all-reduce (4 bytes per scalar), and every rank applies the same update.
Sums over examples (HELENE's Σ_b g_b²) and the non-finite flag travel in the
same all-reduce and are summed instead of averaged.
"""

from __future__ import annotations

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
