"""Which parameters a step touches, how they are numbered and chunked, and their state buffers.

* trainable parameters: those with ``requires_grad`` now (a closure or a user may freeze some
  between steps, so every step recomputes the layout);
* ``tensor_id``: a trainable parameter's position among the trainable ones across groups (the
  RNG contract's per-tensor word);
* chunks: the trainable parameters of one group on one device, the unit one fused op runs on;
* state: the per-parameter float32 buffers that the subclass's ``_buffers`` hook names, created
  on first use (``state_bytes`` counts them);
* ``add_param_group``: ``(name, tensor)`` pairs become names, and a group whose hyper-parameters
  or memory (a tensor twice, overlapping views) are refused is not kept.

A private mixin of :class:`~.base.ZOOptimizer` rather than a collaborator: it reads and fills the
``torch.optim.Optimizer`` fields ``param_groups`` and ``state`` directly, and its methods are
called by every other part of the optimizer as ``self._chunks()`` and friends.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..ops import _checks as ops_checks
from ..ops import _sharding
from ._eager import eager

__all__ = ["ParamLayout"]


class ParamLayout:
    """Parameter layout and state initialisation (mixed into :class:`~.base.ZOOptimizer`)."""

    param_groups: list[dict[str, Any]]
    state: Any
    _tensor_ids: dict[int, int]
    _buffers: Any  # the subclass hook (base.py)
    _take_anchors: Any  # (_anchor.py)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # (name, tensor) pairs become "params" + "param_names" here rather than in torch, whose
        # Optimizer learned named_parameters() only in 2.6 (pytorch/pytorch#134107); this keeps
        # torch >= 2.4 working and gives the same groups as torch's own handling.
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), (torch.Tensor, set)):
            items = list(param_group["params"])
            named = [isinstance(it, tuple) for it in items]
            if any(named):
                if not all(named):
                    raise ValueError("all optimizer params should be with/without names. Some param names are missing")
                param_group = {**param_group, "params": [t for _, t in items], "param_names": [n for n, _ in items]}
            else:
                param_group = {**param_group, "params": items}
        with self._guard.exclusive("add_param_group"):
            eager(super().add_param_group)(param_group)  # no torch._dynamo import (see _eager)
            try:
                self._check_group(self.param_groups[-1])
                self._check_memory()
                self._check_dtypes(self.param_groups[-1])
                # transient mode: the new parameters must be registered on the attached model and get its hooks
                if getattr(self, "_transient", None) is not None and self._transient.attached:
                    self._reattach()
                self._take_anchors(self.param_groups[-1])  # last: all or none, nothing to undo after it (_anchor)
            except BaseException:
                self.param_groups.pop()  # a refused group is not kept
                raise

    def state_bytes(self) -> int:
        """Bytes held in per-parameter optimizer state (the fp32 buffers and ``anchor_decay``'s anchors, in their
        parameters' dtype; this rank's shards of sharded ones)."""
        self._ensure_state()
        tensors = [_sharding.local(v) for st in self.state.values() for v in st.values() if torch.is_tensor(v)]
        return sum(v.numel() * v.element_size() for v in tensors)

    def _param_label(self, pid: int) -> str:
        """How an error names the parameter with ``id(p) == pid``: its name from a named param group, else its
        trainable position and shape."""
        for group in self.param_groups:
            for p, name in zip(group["params"], group.get("param_names", [None] * len(group["params"])), strict=True):
                if id(p) == pid:
                    if name is not None:
                        return str(name)
                    return f"trainable parameter {self._tensor_ids.get(pid, '?')} (shape {tuple(p.shape)})"
        return f"an unknown parameter (id {pid})"

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self._all_params() if p.requires_grad]

    def _require_trainable(self) -> None:
        if not self._trainable():
            raise ValueError(
                f"{type(self).__name__}: no trainable parameters: every parameter of this optimizer has "
                "requires_grad=False (frozen after construction); unfreeze some (p.requires_grad_(True)) "
                "before estimate()/step()/apply_update()"
            )

    def _layout(self) -> tuple[int, ...]:
        """Which parameters are trainable, as positions in the optimizer's parameter list."""
        return tuple(i for i, p in enumerate(self._all_params()) if p.requires_grad)

    def _check_layout(self, layout: tuple[int, ...], what: str) -> None:
        """A pending estimate applies only to the parameters it perturbed (requires_grad unchanged since)."""
        now = self._layout()
        if now == layout:
            return
        frozen = sorted(set(layout) - set(now))
        unfrozen = sorted(set(now) - set(layout))
        changes = "; ".join(
            text for text in (f"frozen since: parameters {frozen}" if frozen else "",
                              f"unfrozen or added since: parameters {unfrozen}" if unfrozen else "") if text
        )
        raise RuntimeError(
            f"{type(self).__name__}.{what}(): requires_grad changed since the pending estimate was measured "
            f"({changes}; positions in the optimizer's parameter list): its directions cover other parameters, so "
            "it can neither be applied nor accumulated. Nothing was applied (the weights are restored). Put "
            "requires_grad back and retry, or drop the estimate with opt.take_estimate() and estimate again"
        )

    def _chunks(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[int]]]:
        """(group, params, tensor_ids) per group and device, trainable params only."""
        out = []
        for group in self.param_groups:
            by_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
            for p in group["params"]:
                if id(p) in self._tensor_ids:
                    ps, ids = by_device.setdefault(p.device, ([], []))
                    ps.append(p)
                    ids.append(self._tensor_ids[id(p)])
            out.extend((group, ps, ids) for ps, ids in by_device.values())
        return out

    def _refresh_layout(self) -> None:
        """tensor_id = position among trainable params across groups (recomputed: freezing may change)."""
        self._tensor_ids = {id(p): i for i, p in enumerate(self._trainable())}

    def _ensure_state(self) -> None:
        for group in self.param_groups:
            for name, init in self._buffers(group).items():
                for p in group["params"]:
                    if p.requires_grad and name not in self.state[p]:
                        # sharded like its parameter (a DTensor's state is a DTensor of its local rows)
                        loc = _sharding.local(p)
                        buf = torch.full(loc.shape, init, dtype=torch.float32, device=loc.device)
                        self.state[p][name] = _sharding.like(p, buf)

    def _check_dtypes(self, group: dict[str, Any]) -> None:
        """Refuse now, with the first step's message, a trainable parameter no op can step: a dtype the ops do
        not compute (complex, integer), or one the chosen fast backend does not (float64 with ``backend="cpu"``
        or ``"triton"``). (The device and the backend's installation are checked at the first step: a model may
        still move to its device after the optimizer is built.)"""
        for i, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            where = f"{type(self).__name__}: param group {len(self.param_groups) - 1}, params[{i}]"
            if p.dtype not in ops_checks.SUPPORTED_DTYPES:
                raise TypeError(
                    f"{where} ({ops_checks.describe(p)}) has dtype {p.dtype}: only float32, bfloat16, float16 (and "
                    "float64 on the reference backend) can be perturbed; freeze it (requires_grad=False)"
                )
            if p.dtype not in ops.FAST_DTYPES:
                try:
                    ops.resolve_backend(self.backend, p.device, [p.dtype])
                except RuntimeError as e:
                    raise RuntimeError(f"{where} ({ops_checks.describe(p)}): {e}") from None

    def _check_memory(self) -> None:
        """Every parameter owns its memory: no stride-0 expand, no tensor twice, no overlapping views.

        And the ops can write it: a tensor subclass they do not understand, or a DTensor placement other
        than Shard(0)/Replicate(), is refused here, at construction (``ops._sharding``).
        """
        params = self._all_params()
        for i, p in enumerate(params):
            try:
                _sharding.check_tensor(f"params[{i}]", p)
            except TypeError as e:
                raise TypeError(f"{type(self).__name__}: {e}; nothing was written") from None
        params = [_sharding.local(p) for p in params]  # a DTensor's memory is its local shard
        try:
            for i, p in enumerate(params):
                ops_checks.check_self_overlap(f"params[{i}]", p)
            ops_checks.check_no_overlap(params, "params")
        except ValueError as e:
            raise ValueError(
                f"{type(self).__name__}: {e} (params[i] = position in the optimizer's parameter list); "
                "nothing was written"
            ) from None
