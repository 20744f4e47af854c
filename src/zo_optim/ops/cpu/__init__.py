"""CPU backend: numba-compiled loops that generate z in registers and update in place.

Same five ops, keyword arguments and float32 math as :mod:`zo_optim.ops.reference`
(without ``compute_dtype``); it receives validated, contiguous CPU tensors from
:mod:`zo_optim.ops`. Importing it raises ImportError when numba is missing, and
the dispatcher then falls back to the reference (``backend="auto"``) or shows
the install hint (``backend="cpu"``); ``import zo_optim`` never imports numba.

Why numba (measured on the 2-core AMD EPYC (Zen 4) CI-class machine, torch
2.13, numba 0.68, MiniLM-L6's 22.7M fp32 parameters, see ``TIMINGS`` below):
z is a pure function of (seed, tensor id, element index), so the contract can be
evaluated without storing z, but evaluating it with torch ops materialises every
Philox round as a tensor: ``rng.normal`` takes ~200× as long as ``torch.randn``.
A compiled loop keeps the 10 Philox rounds, the Box-Muller transform and the
update in registers and touches each parameter once per pass. numba is a pure
pip wheel (no compiler at run time), and parallelises with ``prange``.

Structure: one jitted kernel per op (:mod:`._kernels`) runs over all tensors of
a call in one parallel region, addressing them through an int64 table of data
pointers (one Python-side row per tensor, no per-tensor kernel launch), so a
call costs a few µs per tensor on top of the arithmetic. Scalars that torch
would round to float32 (Python floats multiplied with float32 tensors) are
rounded to float32 here before the kernel sees them.

Compiled code is cached (``cache=True``) in ``__pycache__`` beside this file, or,
when that directory is read-only (a system-wide install), in numba's per-user
cache directory (``NUMBA_CACHE_DIR`` overrides it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numba  # noqa: F401  (ImportError here makes the backend unavailable)
import numpy as np
import torch

from ... import rng
from . import _kernels
from ._numerics import BF16, F16, F32

__all__ = ["adamw_update_", "helene_update_", "perturb_", "precond_sgd_update_", "sgd_update_"]

Tensors = Sequence[torch.Tensor]

_FORMATS = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}
_EMPTY = np.zeros(0, dtype=np.float32)


def _f32(x: float) -> np.float32:
    """A Python float as torch uses it against a float32 tensor (rounded to float32)."""
    return np.float32(x)


def _key(seed: int) -> tuple[int, int]:
    seed &= rng.MASK64
    return seed & rng.MASK32, seed >> 32


def _check_u32(name: str, value: int) -> int:
    if not isinstance(value, int) or not 0 <= value <= rng.MASK32:
        raise ValueError(f"Invalid {name}: {value!r} (an int in [0, 2**32))")
    return value


def _scalars(t: torch.Tensor | None) -> np.ndarray:
    """Per-query scalars of a CPU float32 tensor as a contiguous numpy array (no copy when possible)."""
    if t is None:
        return _EMPTY
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)


def _table(params: Tensors, tensor_ids: Sequence[int], *states: Tensors | None) -> tuple[np.ndarray, np.ndarray]:
    """The address table of a call and the cumulative work-item count per tensor."""
    table = np.zeros((len(params), _kernels.TABLE_COLUMNS), dtype=np.int64)
    for row, (p, tid) in enumerate(zip(params, tensor_ids, strict=True)):
        fmt = _FORMATS.get(p.dtype)
        if fmt is None or p.device.type != "cpu" or not p.is_contiguous():
            raise ValueError(
                f"params[{row}] (shape {tuple(p.shape)}, {p.dtype}, {p.device}): the cpu backend takes "
                "contiguous CPU float32/bfloat16/float16 tensors; call it through zo_optim.ops"
            )
        n = p.numel()
        rng.check_numel(n, f"params[{row}]")
        table[row, _kernels.ADDR] = p.data_ptr() if n else 0
        table[row, _kernels.NUMEL] = n
        table[row, _kernels.FMT] = fmt
        table[row, _kernels.TID] = _check_u32("tensor_id", tid)
        for col, state in zip((_kernels.STATE0, _kernels.STATE1), states, strict=False):
            if state is None:
                continue
            s = state[row]
            if s.dtype != torch.float32 or s.device.type != "cpu" or not s.is_contiguous() or s.numel() != n:
                raise ValueError(f"state buffer {row} must be a contiguous CPU float32 tensor like params[{row}]")
            table[row, col] = s.data_ptr() if n else 0
    groups = (table[:, _kernels.NUMEL] + 3) // 4
    blocks = np.zeros(len(params) + 1, dtype=np.int64)
    np.cumsum((groups + _kernels.BLOCK_GROUPS - 1) // _kernels.BLOCK_GROUPS, out=blocks[1:])
    return table, blocks


def _common(seed: int, distribution: str, rounding: str, rounding_slot: int) -> tuple[int, int, bool, bool, int]:
    k0, k1 = _key(seed)
    return k0, k1, distribution == "rademacher", rounding == "stochastic", _check_u32("rounding_slot", rounding_slot)


def _restore(restore_scale: float, restore_query: int) -> tuple[bool, np.float32, int]:
    return restore_scale != 0.0, _f32(restore_scale), _check_u32("restore_query", restore_query)


def perturb_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    scale: float,
    *,
    query: int = 0,
    distribution: str = "gaussian",
    precond: Tensors | None = None,
    rounding: str = "nearest",
    rounding_slot: int = 1,
) -> None:
    r"""In place :math:`\theta \leftarrow \theta + \text{scale}\cdot z_{\text{query}} \odot \text{precond}^{-1/2}`."""
    k0, k1, rad, sr, slot = _common(seed, distribution, rounding, rounding_slot)
    query = _check_u32("query", query)
    table, blocks = _table(params, tensor_ids, precond)
    _kernels.perturb_kernel(table, blocks, k0, k1, query, rad, _f32(scale), sr, slot)


def sgd_update_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    coeffs: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    momentum_buffers: Tensors | None = None,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
) -> None:
    """Fused restore + ZO-SGD update (see :func:`zo_optim.ops.reference.sgd_update_`)."""
    k0, k1, rad, sr, slot = _common(seed, distribution, rounding, rounding_slot)
    restore, rscale, rq = _restore(restore_scale, restore_query)
    table, blocks = _table(params, tensor_ids, momentum_buffers)
    _kernels.sgd_kernel(
        table, blocks, k0, k1, rad, _scalars(coeffs), _f32(lr), weight_decay != 0.0, _f32(weight_decay),
        _f32(momentum), restore, rscale, rq, sr, slot,
    )


def adamw_update_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    coeffs: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
) -> None:
    """Fused restore + AdamW update (see :func:`zo_optim.ops.reference.adamw_update_`)."""
    k0, k1, rad, sr, slot = _common(seed, distribution, rounding, rounding_slot)
    restore, rscale, rq = _restore(restore_scale, restore_query)
    table, blocks = _table(params, tensor_ids, exp_avgs, exp_avg_sqs)
    # Python-float scalars computed in float64 exactly as the reference does, then rounded once.
    step_size = lr / (1.0 - beta1**step)
    bias2_sqrt = (1.0 - beta2**step) ** 0.5
    _kernels.adamw_kernel(
        table, blocks, k0, k1, rad, _scalars(coeffs), _f32(1.0 - lr * weight_decay), _f32(beta1),
        _f32(1.0 - beta1), _f32(beta2), _f32(1.0 - beta2), _f32(eps), _f32(step_size), _f32(bias2_sqrt),
        restore, rscale, rq, sr, slot,
    )


def precond_sgd_update_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    coeffs: torch.Tensor,
    *,
    lr: float,
    precond: Tensors,
    rule: str,
    update_precond: bool,
    precond_decay: float,
    precond_rate: float,
    precond_coeffs: torch.Tensor | None = None,
    hessian_eps: float = 0.0,
    weight_decay: float = 0.0,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
) -> None:
    """Fused restore + preconditioned SGD + preconditioner update (HiZOO Σ, HiSo K)."""
    if rule not in ("hizoo", "hiso"):
        raise ValueError(f"Invalid preconditioner rule: {rule!r}")
    hizoo_update = update_precond and rule == "hizoo"
    if hizoo_update and precond_coeffs is None:
        raise ValueError("rule='hizoo' needs precond_coeffs (the per-query curvature scalars) to update Σ")
    k0, k1, rad, sr, slot = _common(seed, distribution, rounding, rounding_slot)
    restore, rscale, rq = _restore(restore_scale, restore_query)
    table, blocks = _table(params, tensor_ids, precond)
    _kernels.precond_sgd_kernel(
        table, blocks, k0, k1, rad, _scalars(coeffs), _f32(lr), weight_decay != 0.0, _f32(weight_decay),
        rule == "hiso", bool(update_precond), _f32(precond_decay), _f32(precond_rate),
        _scalars(precond_coeffs) if hizoo_update else _EMPTY, _f32(hessian_eps), restore, rscale, rq, sr, slot,
    )


def helene_update_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    coeffs: torch.Tensor,
    *,
    lr: float,
    alpha: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    clip: Sequence[float],
    exp_avgs: Tensors,
    hessians: Tensors,
    update_hessian: bool,
    hessian_coeffs: torch.Tensor | None = None,
    weight_decay: float = 0.0,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
) -> None:
    """Fused restore + HELENE update (see :func:`zo_optim.ops.reference.helene_update_`)."""
    if len(clip) != len(params):
        raise ValueError(f"clip has {len(clip)} values for {len(params)} params; pass one λ per tensor")
    k0, k1, rad, sr, slot = _common(seed, distribution, rounding, rounding_slot)
    restore, rscale, rq = _restore(restore_scale, restore_query)
    table, blocks = _table(params, tensor_ids, exp_avgs, hessians)
    _kernels.helene_kernel(
        table, blocks, k0, k1, rad, _scalars(coeffs), np.asarray(clip, dtype=np.float32), _f32(lr),
        _f32(1.0 - lr * weight_decay), _f32(alpha), _f32(beta1), _f32(beta2), _f32(1.0 - beta2), _f32(gamma),
        _f32(eps), bool(update_hessian), _scalars(hessian_coeffs) if update_hessian else _EMPTY,
        restore, rscale, rq, sr, slot,
    )
