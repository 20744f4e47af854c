r"""Reference backend: plain torch, one tensor at a time, z materialised.

This is the executable specification of every op. It is slow and obviously
correct; the fast backends (`cpu`, `triton`) are tested against it. Every op
takes ``compute_dtype`` (float32 by default, float64 for studies of rounding);
the fast backends always compute in float32.

Common notation for the fused update ops (per tensor, elementwise):

.. math::
    s &= \text{precond}^{-1/2} \text{ (or } 1\text{ when no preconditioner)} \\
    u_k &= s \odot z_k \qquad k = 0 \dots q-1 \\
    \theta_r &= \theta + \text{restore\_scale}\cdot u_{\text{restore\_query}}
        \quad\text{(restore of the last perturbation, skipped when 0)} \\
    \hat g &= \textstyle\sum_k c_k\, u_k \qquad (c = \text{coeffs, a device tensor } [q])

then the rule's own update of the state and of :math:`\theta_r`, and one
rounding of the result to the parameter's dtype (nearest-even, or stochastic
from the contract's rounding stream).

Every op is elementwise and takes ``offset`` (default 0): the index, within
each tensor's streams, of the tensor's first element. An op on the flat slice
``t.view(-1)[a:b]`` with ``offset=a`` writes exactly what the op on the whole
of ``t`` writes there; the ``chunked`` backend (:mod:`zo_optim.ops.chunked`)
runs the reference that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rng
from ._checks import F32_MAX, check_precond_rule

Tensors = Sequence[torch.Tensor]


def _z(
    seed: int, tensor_id: int, like: torch.Tensor, query: int, distribution: str, dtype: torch.dtype, offset: int
) -> torch.Tensor:
    gen = rng.normal if distribution == "gaussian" else rng.rademacher
    # Generated on the tensor's device (the contract's torch code is device-generic): no CPU pass and no
    # host-to-device copy of z for CUDA tensors, which is what makes `chunked` a usable fallback on a GPU.
    z = gen(seed, tensor_id, like.numel(), query, offset=offset, device=like.device)
    return z.to(dtype=dtype).reshape(like.shape)


def _store(
    param: torch.Tensor, value: torch.Tensor, seed: int, tensor_id: int, rounding: str, slot: int, offset: int,
    states: tuple[tuple[torch.Tensor, torch.Tensor], ...] = (),
) -> None:
    """Write ``value`` rounded to the parameter's dtype, and the op's new ``states`` ((buffer, value) pairs).

    Every temporary (the rounding words, the rounded value) is made before the first write, so an allocation
    failure leaves the tensor and its states as they were: an op writes each tensor all or nothing (the pass
    engine relies on it, ``optim/_passes.py``), up to a failure inside ``copy_`` itself.
    """
    if rounding == "stochastic" and param.dtype in (torch.bfloat16, torch.float16):
        words = rng.rounding_words(seed, tensor_id, param.numel(), slot, offset=offset, device=param.device)
        new = rng.stochastic_round(value, param.dtype, words)
    else:
        new = value if param.dtype == torch.float64 else value.to(torch.float32)
    for buf, v in states:
        buf.copy_(v)
    param.copy_(new)


class _Directions:
    """z_k and s of one tensor, computed once per op call."""

    def __init__(self, seed, tensor_id, param, num_queries, distribution, precond, dtype, offset):
        self.z = [_z(seed, tensor_id, param, k, distribution, dtype, offset) for k in range(num_queries)]
        self.s = None if precond is None else torch.rsqrt(precond.to(dtype))

    def u(self, k: int, z_extra: torch.Tensor | None = None) -> torch.Tensor:
        z = self.z[k] if z_extra is None else z_extra
        return z if self.s is None else z * self.s

    def ghat(self, coeffs: torch.Tensor) -> torch.Tensor:
        g = torch.zeros_like(self.z[0])
        for k, z in enumerate(self.z):
            g = g + coeffs[k] * z
        return g if self.s is None else g * self.s


def _prologue(seed, tensor_id, param, coeffs, distribution, precond, restore_scale, restore_query, dtype, offset):
    q = coeffs.numel()
    dirs = _Directions(seed, tensor_id, param, q, distribution, precond, dtype, offset)
    theta = param.to(dtype)
    if restore_scale != 0.0:
        zr = (
            dirs.z[restore_query]
            if restore_query < q
            else _z(seed, tensor_id, param, restore_query, distribution, dtype, offset)
        )
        theta = theta + restore_scale * dirs.u(restore_query, zr)
    return dirs, theta, dirs.ghat(coeffs.to(dtype))


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
    compute_dtype: torch.dtype = torch.float32,
    offset: int = 0,
) -> None:
    r"""In place :math:`\theta \leftarrow \theta + \text{scale}\cdot z_{\text{query}} \odot \text{precond}^{-1/2}`."""
    for i, (p, tid) in enumerate(zip(params, tensor_ids, strict=True)):
        z = _z(seed, tid, p, query, distribution, compute_dtype, offset)
        if precond is not None:
            z = z * torch.rsqrt(precond[i].to(compute_dtype))
        _store(p, p.to(compute_dtype) + scale * z, seed, tid, rounding, rounding_slot, offset)


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
    compute_dtype: torch.dtype = torch.float32,
    offset: int = 0,
) -> None:
    r"""ZO-SGD (MeZO), coupled weight decay, optional heavy-ball momentum (torch.optim.SGD's form).

    .. math::
        d = \hat g + \text{wd}\,\theta_r;\quad
        b \leftarrow \mu b + d \text{ (if momentum)};\quad
        \theta \leftarrow \theta_r - \text{lr}\cdot(b \text{ or } d)
    """
    for i, (p, tid) in enumerate(zip(params, tensor_ids, strict=True)):
        _, theta, g = _prologue(
            seed, tid, p, coeffs, distribution, None, restore_scale, restore_query, compute_dtype, offset
        )
        d = g + weight_decay * theta if weight_decay != 0.0 else g
        writes: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
        if momentum_buffers is not None:
            buf = momentum * momentum_buffers[i].to(compute_dtype) + d
            writes = ((momentum_buffers[i], buf),)
            d = buf
        _store(p, theta - lr * d, seed, tid, rounding, rounding_slot, offset, writes)


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
    compute_dtype: torch.dtype = torch.float32,
    offset: int = 0,
) -> None:
    r"""AdamW on the ZO estimate (torch.optim.AdamW's arithmetic; ``step`` is 1-based).

    .. math::
        \theta_r &\leftarrow \theta_r (1 - \text{lr}\,\text{wd}) \\
        m &\leftarrow \beta_1 m + (1-\beta_1)\hat g, \quad v \leftarrow \beta_2 v + (1-\beta_2)\hat g^2 \\
        \theta &\leftarrow \theta_r - \frac{\text{lr}}{1-\beta_1^t}\,
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}
    """
    step_size = lr / (1.0 - beta1**step)
    bias2_sqrt = (1.0 - beta2**step) ** 0.5
    for i, (p, tid) in enumerate(zip(params, tensor_ids, strict=True)):
        _, theta, g = _prologue(
            seed, tid, p, coeffs, distribution, None, restore_scale, restore_query, compute_dtype, offset
        )
        theta = theta * (1.0 - lr * weight_decay)
        m = beta1 * exp_avgs[i].to(compute_dtype) + (1.0 - beta1) * g
        v = beta2 * exp_avg_sqs[i].to(compute_dtype) + (1.0 - beta2) * (g * g)
        new_theta = theta - step_size * (m / (torch.sqrt(v) / bias2_sqrt + eps))
        _store(p, new_theta, seed, tid, rounding, rounding_slot, offset, ((exp_avgs[i], m), (exp_avg_sqs[i], v)))


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
    precond_min: float = 0.0,
    weight_decay: float = 0.0,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    offset: int = 0,
) -> None:
    r"""Diagonal-preconditioned ZO-SGD with the preconditioner P updated in the same pass.

    Directions use the OLD P: :math:`u_k = z_k / \sqrt{P}`. Then

    .. math::
        \theta \leftarrow \theta_r - \text{lr}\,(\hat g + \text{wd}\,\theta_r)

    and, when ``update_precond``:

    * ``rule="hizoo"`` (Σ): :math:`P \leftarrow \text{decay}\,P + \text{rate}\,P \odot \sum_k a_k z_k^2`
      with ``precond_coeffs`` :math:`a_k` (the curvature scalars, already divided by q);
    * ``rule="hiso"`` (K): :math:`P \leftarrow \text{decay}\,P + \text{rate}\,(\hat g^2 + \epsilon_H)`.

    ``precond_decay``/``precond_rate`` are passed separately (not rate = 1 − decay)
    so a rate of 1e-8 survives float32. The new P is then clamped to
    :math:`[\text{precond\_min}, \text{float32 max}]` (NaN propagates, as in ``torch.clamp``).
    """
    check_precond_rule(rule, update_precond, precond_coeffs)
    for i, (p, tid) in enumerate(zip(params, tensor_ids, strict=True)):
        dirs, theta, g = _prologue(
            seed, tid, p, coeffs, distribution, precond[i], restore_scale, restore_query, compute_dtype, offset
        )
        d = g + weight_decay * theta if weight_decay != 0.0 else g
        new_theta = theta - lr * d
        writes: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
        if update_precond:
            old = precond[i].to(compute_dtype)
            if rule == "hizoo":
                assert precond_coeffs is not None
                curv = torch.zeros_like(old)
                for k, z in enumerate(dirs.z):
                    curv = curv + precond_coeffs[k].to(compute_dtype) * (z * z)
                new = old * curv
            else:
                new = g * g + hessian_eps
            new_precond = torch.clamp(precond_decay * old + precond_rate * new, min=precond_min, max=F32_MAX)
            writes = ((precond[i], new_precond),)
        _store(p, new_theta, seed, tid, rounding, rounding_slot, offset, writes)


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
    compute_dtype: torch.dtype = torch.float32,
    offset: int = 0,
) -> None:
    r"""HELENE (Algorithm 1): annealed momentum, A-GNB diagonal Hessian EMA, layer-wise clip.

    .. math::
        m &\leftarrow \beta_1 m + \alpha_t \hat g \\
        \hat h &= \hat g^2 \text{ or } \textstyle\sum_k b_k z_k^2 \text{ (``hessian\_coeffs`` } b\text{)};\quad
        h \leftarrow \beta_2 h + (1-\beta_2)\hat h \text{ (when ``update\_hessian``)} \\
        \theta &\leftarrow \theta_r (1 - \text{lr}\,\text{wd})
            - \text{lr}\,\frac{m}{\gamma \max(h, \lambda_i) + \delta}

    with ``clip[i]`` = :math:`\lambda_i` of tensor i and ``eps`` = δ.
    """
    for i, (p, tid) in enumerate(zip(params, tensor_ids, strict=True)):
        dirs, theta, g = _prologue(
            seed, tid, p, coeffs, distribution, None, restore_scale, restore_query, compute_dtype, offset
        )
        theta = theta * (1.0 - lr * weight_decay)
        m = beta1 * exp_avgs[i].to(compute_dtype) + alpha * g
        h = hessians[i].to(compute_dtype)
        if update_hessian:
            if hessian_coeffs is None:
                h_hat = g * g
            else:
                h_hat = torch.zeros_like(g)
                for k, z in enumerate(dirs.z):
                    h_hat = h_hat + hessian_coeffs[k].to(compute_dtype) * (z * z)
            h = beta2 * h + (1.0 - beta2) * h_hat
        writes = ((hessians[i], h),) if update_hessian else ()
        denom = gamma * torch.clamp(h, min=float(clip[i])) + eps
        _store(p, theta - lr * (m / denom), seed, tid, rounding, rounding_slot, offset, (*writes, (exp_avgs[i], m)))
