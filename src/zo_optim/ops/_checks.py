"""Input validation shared by every backend: refuse before anything is modified."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rng

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DISTRIBUTIONS = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_params(params: Sequence[torch.Tensor], tensor_ids: Sequence[int]) -> torch.device:
    """Validate a parameter list; return its single device."""
    if len(params) == 0:
        raise ValueError("params is empty: pass at least one tensor")
    if len(tensor_ids) != len(params):
        raise ValueError(f"got {len(params)} params but {len(tensor_ids)} tensor_ids; pass one id per tensor")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a torch.Tensor")
    device = params[0].device
    for i, (p, tid) in enumerate(zip(params, tensor_ids, strict=True)):
        if p.layout != torch.strided:
            raise TypeError(
                f"params[{i}] ({describe(p)}) has layout {p.layout}: zeroth-order ops need dense "
                "tensors; convert it with .to_dense() or freeze it (requires_grad=False)"
            )
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"params[{i}] ({describe(p)}) has dtype {p.dtype}: only float32, bfloat16, float16 "
                "(and float64 on the reference backend) can be perturbed; freeze it (requires_grad=False)"
            )
        if p.device != device:
            raise ValueError(
                f"params[{i}] ({describe(p)}) is on {p.device} but params[0] is on {device}: "
                "one call takes tensors of one device; move them or split the call"
            )
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid <= rng.MASK32:
            raise ValueError(f"Invalid tensor_id for params[{i}]: {tid!r} (an int in [0, 2**32))")
        rng.check_numel(p.numel(), f"params[{i}] ({describe(p)})")
    return device


def check_state(name: str, state: Sequence[torch.Tensor] | None, params: Sequence[torch.Tensor]) -> None:
    """State buffers: one fp32 tensor per param, same shape and device."""
    if state is None:
        raise ValueError(f"{name} is required for this op")
    if len(state) != len(params):
        raise ValueError(f"{name} has {len(state)} tensors for {len(params)} params; pass one per param")
    for i, (s, p) in enumerate(zip(state, params, strict=True)):
        if s.dtype != torch.float32 or s.shape != p.shape or s.device != p.device:
            raise ValueError(
                f"{name}[{i}] ({describe(s)}) must be float32 with the shape and device of "
                f"params[{i}] ({describe(p)})"
            )


def check_scalars(name: str, t: torch.Tensor | None, device: torch.device, length: int | None = None) -> int:
    """A 1-D float32 device tensor of per-query scalars; returns its length."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0 or t.dtype != torch.float32:
        got = describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a non-empty 1-D float32 tensor of per-query scalars, got {got}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the params are on {device}; create it on {device}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} entries, expected {length} (one per query)")
    return t.numel()


def check_u32(name: str, value: object) -> None:
    """An int counter word of the RNG contract (query, restore_query, rounding_slot)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= rng.MASK32:
        raise ValueError(f"Invalid {name}: {value!r} (an int in [0, 2**32))")


def check_precond_rule(rule: str, update_precond: bool, precond_coeffs: object) -> None:
    """The preconditioner rule of ``precond_sgd_update_``, and HiZOO's curvature scalars when Σ updates."""
    check_choice("rule", rule, ("hizoo", "hiso"))
    if rule == "hizoo" and update_precond and precond_coeffs is None:
        raise ValueError("rule='hizoo' needs precond_coeffs (the per-query curvature scalars) to update Σ")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose from {', '.join(map(repr, choices))})")
