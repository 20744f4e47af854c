"""The plain-torch restore + MeZO update for perturbation options whose directions are not the fused ops' z/√P.

Sparse-MeZO's reference path (:mod:`._sparse`) and the low-rank directions of LOZO (:mod:`._lowrank`) both
build each tensor's direction u_k in plain torch and then run the same restore + update; it lives here once,
with the check that the parameters are ones those plain-torch passes can write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..ops import _sharding

__all__ = ["ScratchBuffers", "check_plain_params", "plain_sgd_update_"]

#: u(p, tensor_id, query, slot) -> the direction u_query of p (in a scratch buffer: valid until the slot's next use)
Direction = Callable[[torch.Tensor, int, int, int], torch.Tensor]


class ScratchBuffers:
    """``scratch(p, slot)``: a buffer of p's shape (in ``dtype``, default p's), reused across tensors and steps, one
    per (device, dtype, slot). Fresh allocations of a tensor's size cost as much as the pass itself on a loaded CPU
    (page faults); this keeps at most one largest tensor per slot."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self._buffers: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    def __call__(self, p: torch.Tensor, slot: int) -> torch.Tensor:
        dtype = self.dtype or p.dtype
        key = (p.device, dtype, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < p.numel():
            buf = self._buffers[key] = torch.empty(p.numel(), dtype=dtype, device=p.device)
        return buf[: p.numel()].view(p.shape)


def check_plain_params(params: list[torch.Tensor], option: str, off: str) -> None:
    """Refuse (ValueError, before any write) parameters the plain-torch passes of ``option`` cannot take."""
    for i, p in enumerate(params):
        if _sharding.is_dtensor(p) or p.dtype not in (torch.float32, torch.float64):
            kind = " (a DTensor)" if _sharding.is_dtensor(p) else ""
            raise ValueError(
                f"{option}: trainable parameter {i} is {p.dtype}{kind}; the passes of this option run in plain "
                f"torch on float32/float64 local tensors only. Nothing was changed: keep those weights in float32 "
                f"(not sharded), or use {off}"
            )


def plain_sgd_update_(ps: list[torch.Tensor], ids: list[int], coeffs: torch.Tensor, u: Direction,
                      scratch: Callable[[torch.Tensor, int], torch.Tensor], *, lr: float, weight_decay: float,
                      momentum: float, bufs: list[torch.Tensor] | None, restore_scale: float, restore_query: int,
                      **_: Any) -> None:
    """The restore + MeZO update of :func:`zo_optim.ops.reference.sgd_update_` with directions ``u``, in place:
    θ_r = θ + restore_scale·u_r; d = Σ_k c_k u_k + wd·θ_r; b ← μb + d (if momentum); θ ← θ_r − lr·(b or d).

    ``scratch(p, slot)`` gives a float32 buffer of p's shape (slot 1 holds the sum of several directions)."""
    cs = [float(c) for c in coeffs.tolist()]  # q host floats (one sync per update pass, as apply_update's)
    q = len(cs)
    for i, (p, tid) in enumerate(zip(ps, ids, strict=True)):
        # every direction (and every allocation) first, the writes to p after: a failure here (out of memory)
        # leaves p untouched, so the pass engine's take-back of this tensor restores it exactly once
        if q == 1:
            g = u(p, tid, 0, 0)
            ur = None if restore_scale == 0.0 else (g if restore_query == 0 else u(p, tid, restore_query, 1))
            scale = cs[0]
        else:
            g = scratch(p, 1).zero_()
            for k, c in enumerate(cs):
                g.add_(u(p, tid, k, 0), alpha=c)
            ur = None if restore_scale == 0.0 else u(p, tid, restore_query, 0)
            scale = 1.0
        if ur is not None:
            p.add_(ur, alpha=restore_scale)
        if bufs is None:
            if weight_decay != 0.0:
                p.mul_(1.0 - lr * weight_decay)
            p.add_(g, alpha=-lr * scale)
        else:
            b = bufs[i]
            b.mul_(momentum).add_(g, alpha=scale)
            if weight_decay != 0.0:
                b.add_(p, alpha=weight_decay)
            p.add_(b, alpha=-lr)
