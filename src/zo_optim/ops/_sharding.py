"""Sharded parameters (FSDP2's ``DTensor``): the local shard and the contract index of its first element.

The RNG contract makes z of element i of a tensor depend only on (seed, tensor id, i), with i the
row-major index in the whole (unsharded) tensor. A rank that holds rows [a, b) of a ``Shard(0)``
tensor holds the contiguous index range [a·row, b·row) (row = elements per row), so it perturbs and
updates its local tensor with element offset a·row and writes exactly the values the unsharded op
writes into those rows: a sharded run equals the replicated one bit for bit. ``Replicate()`` holds
the whole tensor (offset 0).

Supported placements: any mix of ``Shard(0)`` and ``Replicate()`` over the mesh dimensions (FSDP2's
``Shard(0)``, HSDP's ``(Replicate(), Shard(0))``). Refused, with the reason, before anything is
written: ``Shard(d)`` for d > 0 (tensor parallel's column split: a rank's elements are not one
index range), ``Partial`` (the local values are not the parameter's), FSDP2's ``_StridedShard``
(FSDP + TP), and tensor subclasses the ops do not understand (DeepSpeed ZeRO-3 partitioned
parameters, other ``__torch_dispatch__`` wrappers, lazy parameters): their local memory is not the
parameter's values, so writing it would be a silent corruption or a native crash.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# DTensor is looked up, never imported here: `import torch.distributed.tensor` costs 0.5-0.75 s (sympy through
# torch.fx's symbolic shapes, measured on the 2-core dev machine), paid by every process that imports zo_optim, a
# fresh Flower ClientApp process per message included. A DTensor can only exist once its module is imported (by
# whoever built it: fully_shard, DTensor.from_local), so "not in sys.modules" means "no tensor here is a DTensor".

__all__ = ["SUPPORTED", "check_tensor", "is_dtensor", "like", "local", "local_and_offset", "local_rows", "unwrap"]

SUPPORTED = "torch.Tensor / nn.Parameter, and DTensor with Shard(0) or Replicate() placements (FSDP2's fully_shard)"


def _dtensor_module():  # torch.distributed.tensor if some code imported it (else None: no DTensor exists)
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(t: object) -> bool:
    cls = getattr(_dtensor_module(), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def _placement_ok(pl: object, ndim: int) -> bool:
    mod = _dtensor_module()  # called for a DTensor's placements only: its module is loaded
    if type(pl) is mod.Replicate:
        return True
    # exactly Shard (not its subclass _StridedShard), on dim 0 (torch may store a negative dim)
    return type(pl) is mod.Shard and pl.dim % max(ndim, 1) == 0  # type: ignore[attr-defined]


def check_tensor(where: str, t: torch.Tensor) -> None:
    """Refuse (TypeError) a tensor whose memory the ops cannot read as the parameter's values."""
    if is_dtensor(t):
        bad = [pl for pl in t.placements if not _placement_ok(pl, t.ndim)]
        if bad:
            raise TypeError(
                f"{where} is a DTensor with placements {tuple(t.placements)}: zeroth-order ops support "
                f"{SUPPORTED}; {bad[0]} is not supported (a rank's elements must be one row range of the "
                "row-major tensor, and its local values the parameter's). Shard it with fully_shard (Shard(0)) "
                "or replicate it, or freeze it (requires_grad=False)"
            )
        inner = t._local_tensor
        if type(inner) not in (torch.Tensor, torch.nn.Parameter) and is_traceable_wrapper_subclass(inner):
            raise TypeError(
                f"{where} is a DTensor whose local tensor is a {type(inner).__name__}; supported: {SUPPORTED}"
            )
        return
    if hasattr(t, "ds_id") or hasattr(t, "ds_status"):
        raise TypeError(
            f"{where} is a DeepSpeed ZeRO-3 partitioned parameter (its local memory is a flat partition, empty "
            f"outside GatheredParameters): zeroth-order ops support {SUPPORTED}. Use ZeRO stage <= 2, or FSDP2"
        )
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
        raise TypeError(f"{where} is an uninitialized (lazy) parameter: run one forward to materialize it first")
    if is_traceable_wrapper_subclass(t):
        raise TypeError(
            f"{where} is a {type(t).__name__}, a tensor subclass zeroth-order ops cannot write (its memory is "
            f"not its values); supported: {SUPPORTED}. Freeze it (requires_grad=False) or convert it to a plain tensor"
        )


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the ops write: a DTensor's local shard, any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def local_and_offset(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(local tensor, contract index of its element 0); a plain tensor is its own shard at offset 0."""
    if not is_dtensor(t):
        return t, 0
    check_tensor("a DTensor", t)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    loc = t._local_tensor  # type: ignore[attr-defined]
    if tuple(loc.shape) != tuple(shape):
        raise TypeError(
            f"a DTensor's local tensor has shape {tuple(loc.shape)}, its placements {tuple(t.placements)} say "
            f"{tuple(shape)} (padded or inconsistent shard); supported: {SUPPORTED}"
        )
    row = math.prod(t.shape[1:]) if t.ndim > 0 else 1
    return loc, (int(offset[0]) * row if t.ndim > 0 else 0)


def like(p: torch.Tensor, local_value: torch.Tensor) -> torch.Tensor:
    """``local_value`` (the shape of ``p``'s local shard) as a tensor sharded like ``p`` (itself if ``p`` is plain)."""
    if not is_dtensor(p):
        return local_value
    return _dtensor_module().DTensor.from_local(local_value, p.device_mesh, p.placements, run_check=False,
                                                shape=p.shape, stride=p.stride())


def unwrap(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Local tensors and their offsets, for a list that may mix DTensors and plain tensors."""
    pairs = [local_and_offset(t) for t in tensors]
    return [t for t, _ in pairs], [o for _, o in pairs]


def local_rows(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's part of a state buffer of ``p``, as a plain tensor shaped like ``p``'s local shard.

    ``value`` is a DTensor (a sharded state dict: redistributed to ``p``'s placements if they differ, a
    collective every rank runs in the same load) or a full tensor of ``p``'s shape (a full state dict,
    e.g. saved by a replicated run: this rank keeps its rows). A plain ``p`` takes a full tensor as is.
    """
    if is_dtensor(value):
        if not is_dtensor(p):
            return value.full_tensor()
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    if not is_dtensor(p):
        return value
    loc, offset = local_and_offset(p)
    return value.reshape(-1)[offset: offset + loc.numel()].view(loc.shape)
