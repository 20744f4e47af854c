"""Input validation shared by every backend: refuse before anything is modified."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .. import rng

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DISTRIBUTIONS = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")
#: the largest float32: the bound of the ops' float32 scalars and of their clamps (the numba kernels keep their own
#: numpy scalar of it, ``ops.cpu._kernels._F32_MAX``, so that the JIT module needs no torch)
F32_MAX = torch.finfo(torch.float32).max
# tensors sharing memory are told apart element by element up to this size; larger ambiguous layouts are refused
_EXACT_OVERLAP_LIMIT = 2**24


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
        check_writable(f"params[{i}]", p)
    check_no_overlap(params, "params")
    return device


def check_seed(seed: object) -> int:
    """A uint64 seed (a Python or NumPy integer): TypeError for another type, ValueError out of range."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"Invalid seed: {seed!r} (a {type(seed).__name__}); the seed is an int in [0, 2**64), "
            "e.g. zo_optim.rng.step_seed(base_seed, t) (convert a tensor or string with int(...))"
        )
    value = int(seed)
    if not 0 <= value < 2**64:
        raise ValueError(f"Invalid seed: {value} (an int in [0, 2**64))")
    return value


def check_writable(what: str, t: torch.Tensor) -> None:
    """A tensor an op writes in place: no inference tensor outside inference mode, no self-overlap."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} ({describe(t)}) is an inference tensor (created under torch.inference_mode()) and is updated "
            "in place outside inference mode, which torch forbids; clone it outside inference mode first "
            "(t = t.clone()) or run the op inside torch.inference_mode()"
        )
    check_self_overlap(what, t)


def check_self_overlap(what: str, t: torch.Tensor) -> None:
    """Refuse a tensor whose elements share memory (stride 0 of an expand(), overlapping as_strided)."""
    if t.layout != torch.strided or t.numel() <= 1 or t.is_contiguous():
        return  # (a contiguous tensor never overlaps itself)
    if any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride(), strict=True)):
        overlap = True
    else:
        # 0: no overlap, 1: overlap, 2: too hard for torch's stride test -> count the distinct offsets
        verdict = getattr(torch, "_debug_has_internal_overlap", lambda _: 2)(t)
        overlap = verdict == 1 or (verdict == 2 and (
            t.numel() > _EXACT_OVERLAP_LIMIT or torch.unique(_offsets(t)).numel() != t.numel()
        ))
    if overlap:
        raise ValueError(
            f"{what} ({describe(t)}, strides {t.stride()}) has elements that share memory (a stride-0 expand() or "
            "an overlapping as_strided view): an in-place update would write them several times; pass a real "
            "tensor (t.contiguous() or t.clone())"
        )


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory a strided tensor addresses."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    extent = sum((sz - 1) * abs(st) for sz, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (extent + 1) * t.element_size()


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage element offsets a tensor addresses (only for tensors whose memory spans overlap)."""
    off = torch.tensor(t.storage_offset(), dtype=torch.int64)
    for sz, st in zip(t.shape, t.stride(), strict=True):
        off = off.unsqueeze(-1) + torch.arange(sz, dtype=torch.int64) * st
    return off.reshape(-1)


def check_no_overlap(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Refuse tensors that share memory (the same tensor twice, overlapping views): writes would mix."""
    spans = []
    for i, t in enumerate(tensors):
        # meta/fake tensors have no memory to share (their data_ptr is 0 or unavailable)
        if t.layout != torch.strided or t.numel() == 0 or t.is_meta:
            continue
        try:
            start, end = _span(t)
        except (RuntimeError, NotImplementedError):
            continue
        if start != 0:
            spans.append((t.get_device(), start, end, i))  # (a device index; -1 on the CPU)
    spans.sort()
    active: list[tuple[int, int, int, int]] = []
    for dev, start, end, i in spans:
        active = [a for a in active if a[0] == dev and a[2] > start]
        for _, _, _, j in active:
            a, b = tensors[j], tensors[i]
            same_kind = a.dtype == b.dtype and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            # byte ranges overlap: views of one storage may still interleave without sharing an element
            exact = same_kind and max(a.numel(), b.numel()) <= _EXACT_OVERLAP_LIMIT
            if not exact or bool(torch.isin(_offsets(b), _offsets(a)).any()):
                j, i = sorted((i, j))
                a, b = tensors[j], tensors[i]
                raise ValueError(
                    f"{what}[{j}] ({describe(a)}) and {what}[{i}] ({describe(b)}) share memory (the same tensor "
                    "twice, or overlapping views of one tensor): an in-place update would write it twice or mix "
                    "their directions; pass each tensor once, or give each its own memory (t.clone())"
                )
        active.append((dev, start, end, i))


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
        if s.is_inference() and not torch.is_inference_mode_enabled():
            check_writable(f"{name}[{i}]", s)


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


def check_u32(name: str, value: object) -> int:
    """An int counter word of the RNG contract (query, restore_query, rounding_slot, tensor_id), returned."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= rng.MASK32:
        raise ValueError(f"Invalid {name}: {value!r} (an int in [0, 2**32))")
    return value


def check_precond_rule(rule: str, update_precond: bool, precond_coeffs: object) -> None:
    """The preconditioner rule of ``precond_sgd_update_``, and HiZOO's curvature scalars when Σ updates."""
    check_choice("rule", rule, ("hizoo", "hiso"))
    if rule == "hizoo" and update_precond and precond_coeffs is None:
        raise ValueError("rule='hizoo' needs precond_coeffs (the per-query curvature scalars) to update Σ")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose from {', '.join(map(repr, choices))})")
