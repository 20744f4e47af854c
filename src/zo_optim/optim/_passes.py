"""The passes over the weights: perturbation passes and the update pass, all or nothing across chunks.

* perturbation pass: θ ← θ + s·u_k on every (group, device) chunk (``ops.perturb_``); a chunk that
  fails takes back the chunks already moved.
* update pass: the subclass's ``_fused_update`` (the algorithm's fused restore + update op) on every
  chunk; a chunk that fails leaves the chunks the op has processed restored and updated, and only the
  others are restored by a pass.
* ``_update_from_pending``: the pending estimate averaged (across ranks in data parallel), then the
  update pass, or the restore and skip (or raise) of a non-finite step.
* ``_update_from_scalars``: the update pass from given scalars (the work of ``apply_update``).

What can fail fails before the first write: the backend of every chunk is resolved
(``_check_backends``), and the hyper-parameters and the preconditioner are checked
(``_check_step_inputs``) while no weight has moved.

Errors: from the first perturbation until the fused update has run, any
exception (KeyboardInterrupt included) restores the weights before it
propagates. Every pass is all or nothing across the (group, device) chunks:
backends and per-tensor settings are validated before the first pass, a
perturbation pass that fails on a later chunk takes back the earlier ones, and
an update that fails part-way restores only the chunks the fused op has not
processed (those it processed are restored and updated).

A private mixin of :class:`~.base.ZOOptimizer` rather than a collaborator: the passes read the
optimizer's groups, state, counters and perturbation mode, and call the subclass hooks
(``_fused_update``, ``_check_group``, ``_prepare``, ``_check_scalars``); tests override
``_perturb_chunk`` and ``_fused_update`` on the optimizer class to inject failures.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch

from .. import ops
from ..ops import _sharding
from . import _distributed
from ._estimate import NonFiniteLossError
from ._validation import as_seed

__all__ = ["UpdatePasses"]


def _outside_stacklevel() -> int:
    """``stacklevel`` of the first caller outside zo_optim and torch: a warning names the user's line
    (``opt.step(...)``, ``estimate(...)``; transformers' loop under a Trainer), whatever path led there."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("zo_optim", "torch"):
        frame, level = frame.f_back, level + 1
    return level


class UpdatePasses:
    """Perturbation and update passes (mixed into :class:`~.base.ZOOptimizer`)."""

    # ------------------------------------------------------------------ perturbation passes

    def _perturb_params(self, params: list[torch.Tensor] | None, seed: int, query: int, scale: float) -> None:
        """θ ← θ + scale·u_query for ``params`` (all trainable ones when None)."""
        if params is None:
            chunks = [(ps, ids) for _, ps, ids in self._chunks()]
        else:
            by_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
            for p in params:
                ps, ids = by_device.setdefault(p.device, ([], []))
                ps.append(p)
                ids.append(self._tensor_ids[id(p)])
            chunks = list(by_device.values())
        chunks = self._block_pairs(chunks, seed)  # block probes (_subspace.py): only the step's block moves
        done: list[tuple[list[torch.Tensor], list[int]]] = []
        try:
            for ps, ids in chunks:
                self._perturb_chunk(ps, ids, seed, query, scale)
                done.append((ps, ids))
        except BaseException:
            # a later chunk failed: take back the chunks already moved, so the pass is all or nothing
            for ps, ids in reversed(done):
                self._perturb_chunk(ps, ids, seed, query, -scale)
            raise

    def _perturb_chunk(self, ps: list[torch.Tensor], ids: list[int], seed: int, query: int, scale: float) -> None:
        precond = None if self.precond_buffer is None else [self.state[p][self.precond_buffer] for p in ps]
        ops.perturb_(ps, ids, seed, scale, query=query, distribution=self.distribution, precond=precond,
                     rounding="nearest", backend=self.backend)

    def _check_backends(self) -> None:
        """Resolve the backend of every (group, device) chunk now, so an unusable one fails before any pass."""
        for _, ps, _ in self._chunks():
            dtypes = [p.dtype for p in ps] + ([torch.float32] if self.precond_buffer is not None else [])
            sharded = any(_sharding.local_and_offset(p)[1] for p in ps)  # shards of DTensors (FSDP2)
            ops.resolve_backend(self.backend, ps[0].device, dtypes, sharded=sharded)
            if self._warned_slow_fallback:
                continue
            notice = ops.slow_fallback_notice(self.backend, ps[0].device, dtypes)
            if notice is not None:
                self._warned_slow_fallback = True  # once per optimizer, not once per step
                warnings.warn(notice, stacklevel=_outside_stacklevel())

    # ------------------------------------------------------------------ update

    def _update_from_pending(self, precond_checked: bool = False) -> None:
        """Take the pending estimate and run its update pass (or restore and skip/raise a non-finite step)."""
        # hyper-parameters may have changed since the estimate (a scheduler, a user): checked before the
        # pending estimate is taken, so a refused step() can be retried once they are fixed
        assert self._acc is not None
        self._check_layout(self._acc.layout, "step")
        self._check_step_inputs(precond=not precond_checked)
        acc, self._acc = self._acc, None
        assert acc is not None and acc.grads is not None
        seed = acc.seed
        if _distributed.active(self.data_parallel):
            # the mean is weighted across micro-batches AND ranks; the flag says whether any rank saw a non-finite
            grads, extras, nonfinite = _distributed.mean_across_ranks(
                acc.grads, acc.extras, acc.weight, acc.nonfinite, self.summed_extras, self._guard.ungated
            )
        else:
            (grads, extras), nonfinite = acc.mean(), acc.nonfinite
        if nonfinite:
            self._perturbation.restore()
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(
                    f"{type(self).__name__}: a closure returned a non-finite loss at step {self._t} (on some rank); "
                    "weights restored (use on_nonfinite='skip' to skip such steps)"
                )
            self.skipped_steps += 1
            self._t += 1
            return
        self._update_pass(seed, grads, extras, restore=self._perturbation.pending_restore())
        self._perturbation.mark_restored()
        self._t += 1

    def _update_from_scalars(self, seed: Any, projected_grads: Any, extra_scalars: dict[str, Any]) -> None:
        """The update pass of one step from its (seed, scalars), checked first (``apply_update``)."""
        if self._acc is not None:
            raise RuntimeError("an estimate is pending; apply it with step() or drop it with take_estimate() first")
        seed = as_seed(seed)
        self._require_trainable()
        unknown = set(extra_scalars) - set(self.extra_scalars)
        missing = {k for k, req in self.extra_scalars.items() if req and k not in extra_scalars}
        if unknown or missing:
            raise TypeError(
                f"{type(self).__name__}.apply_update takes extra scalars {sorted(self.extra_scalars)} "
                f"(required: {sorted(k for k, r in self.extra_scalars.items() if r)}); "
                f"got unexpected {sorted(unknown)}, missing {sorted(missing)}"
            )
        device = self._trainable()[0].device
        grads = self._as_scalars("projected_grads", projected_grads, device)
        extras = {k: self._as_scalars(k, v, device) for k, v in extra_scalars.items() if v is not None}
        self._check_scalars(grads, extras)
        self._refresh_layout()
        self._ensure_state()
        self._prepare()
        self._check_step_inputs()
        self._update_pass(seed, grads, extras, restore=(0.0, 0))
        self._t += 1

    def _update_pass(
        self, seed: int, grads: torch.Tensor, extras: dict[str, torch.Tensor], restore: tuple[float, int]
    ) -> None:
        """``_fused_update`` on every chunk: the pending restore (if any) fused with the algorithm's update."""
        self.last_projected_grads = grads
        self.last_extra_scalars = extras
        q = grads.numel()
        coeffs = grads / q
        if self.maximize:
            coeffs = -coeffs
        restore_scale, restore_query = restore
        op_kwargs = dict(restore_scale=restore_scale, restore_query=restore_query, distribution=self.distribution,
                         rounding=self.rounding, backend=self.backend)
        chunks, coeffs = self._block_chunks(self._chunks(), seed, coeffs)  # block probes (_subspace.py)
        done = 0
        try:
            for group, params, ids in chunks:
                dev = params[0].device
                self._fused_update(group, params, ids, seed, coeffs.to(dev),
                                   {k: v.to(dev) for k, v in extras.items()}, self._t + 1, op_kwargs)
                done += 1
        except BaseException:
            # chunks the fused op has processed are restored (and updated); restore only the others
            if restore_scale != 0.0:
                for _, params, ids in chunks[done:]:
                    self._perturb_chunk(params, ids, seed, restore_query, restore_scale)
                self._perturbation.mark_restored()
            raise

    # ------------------------------------------------------------------ checks before the first write

    def _check_step_inputs(self, precond: bool = True) -> None:
        """What the user may have changed since construction, checked before the first write of a step.

        Every group's hyper-parameters (``_check_group``: an lr set to NaN by hand or by a scheduler
        would be written into every weight), and the preconditioner of the directions u = z/√P, which
        must be finite and > 0 (a zero makes u infinite: θ + ε·u − ε·u is then NaN, not θ).
        """
        for group in self.param_groups:
            self._check_group(group)
        if self.precond_buffer is None or not precond:
            return
        # a sharded buffer is checked on its local rows (each rank its own: no collective)
        bufs = [(i, _sharding.local(self.state[p][self.precond_buffer])) for i, p in enumerate(self._trainable())]
        bufs = [(i, b) for i, b in bufs if b.numel() > 0]
        if not bufs:
            return
        # one read of P and one host sync: min > 0 and max < inf (NaN fails both)
        bounds = torch.stack([torch.stack(torch.aminmax(b)).to(bufs[0][1].device) for _, b in bufs])
        ok = (bounds[:, 0] > 0) & (bounds[:, 1] < math.inf)
        if bool(ok.all()):
            return
        j = int((~ok).nonzero()[0, 0])
        i, buf = bufs[j]
        bad = int(((buf <= 0) | ~torch.isfinite(buf)).sum())
        raise ValueError(
            f"{type(self).__name__}: the preconditioner state {self.precond_buffer!r} of trainable parameter {i} "
            f"{tuple(buf.shape)} has {bad} value(s) that are zero, negative or non-finite (min "
            f"{bounds[j, 0].item():g}, max {bounds[j, 1].item():g}); it must be finite and > 0 (the directions "
            "are z/sqrt of it). Nothing was "
            f"changed: re-initialise it (opt.state[p][{self.precond_buffer!r}].fill_(1.0)) or load a valid state dict"
        )

    def _as_scalars(self, name: str, value: Any, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).to(device).reshape(-1)
        if t.numel() != self.num_queries:
            raise ValueError(f"{name} has {t.numel()} values, expected num_queries={self.num_queries}")
        return t
