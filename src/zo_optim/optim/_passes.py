"""The passes over the weights: perturbation passes and the update pass, all or nothing under real errors.

* perturbation pass: θ ← θ + s·u_k on every (group, device) chunk (``ops.perturb_``), called in *units*
  (``_units``) that an op writes all or nothing: one dtype of a chunk on the fused backends (one kernel
  launch each), one tensor on the plain-torch ones (which loop tensor by tensor). A unit that fails takes
  back the units already moved (up to the round trip's float32 rounding).
* update pass: the subclass's ``_fused_update`` (the algorithm's fused restore + update op) unit by unit.
  The units it has updated cannot be taken back (their state moved too): when a later unit fails, the
  others are restored to θ and the step stays pending with its progress (``Accumulator.applied``), so
  ``step()`` applies the rest once the cause is fixed and the counter advances then; no unit is updated
  twice.
* ``_update_from_pending``: the pending estimate averaged (across ranks in data parallel), then the
  update pass, or the restore and skip (or raise) of a non-finite step; or the rest of a part-way update.
* ``_update_from_scalars``: the update pass from given scalars (the work of ``apply_update``).

What can fail for a reason we can see fails before the first write: every chunk's backend is resolved and
its tensors and state buffers get the ops' checks (``_check_backends``: a parameter reassigned with
``p.data = ...`` between steps is refused there, not by the update of its group after the groups before
it were written), and the hyper-parameters and the preconditioner are checked (``_check_step_inputs``)
while no weight has moved.

Errors: from the first perturbation until the fused update has run, any exception (KeyboardInterrupt
included) restores the weights before it propagates. Not covered: an error inside one tensor of the
``chunked`` backend (it works slice by slice) and a second error while a pass is taken back.

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
from ..ops import _checks as ops_checks
from ..ops import _sharding
from . import _distributed
from ._estimate import Accumulator, NonFiniteLossError, PartialUpdate
from ._validation import as_seed

__all__ = ["UpdatePasses"]

# the backends that loop tensor by tensor in Python (the reference's code): their unit of all or nothing is a tensor
_PLAIN_TORCH = ("chunked", "reference")


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
            for ps, ids in self._units(chunks):
                self._perturb_chunk(ps, ids, seed, query, scale)
                done.append((ps, ids))
        except BaseException:
            # a later unit failed (it wrote nothing): take back the units already moved, so the pass is all or
            # nothing up to the round trip's rounding (θ + s·u − s·u, a few ulp in float32)
            for ps, ids in reversed(done):
                self._perturb_chunk(ps, ids, seed, query, -scale)
            raise

    def _units(self, chunks: Any) -> list[Any]:
        """Split each chunk (``(params, ids, ...)`` tuples; extra leading items kept) into the units that one op call
        writes all or nothing: one dtype of the chunk on the fused backends (Triton launches one kernel per dtype,
        numba one per call, and a launch that fails has written nothing), one tensor on the plain-torch backends,
        which loop tensor by tensor (an allocation failure on the third tensor leaves the first two written). The
        pass engine then knows exactly which tensors a failed call left moved: those of the units before it."""
        units = []
        for chunk in chunks:
            *head, ps, ids = chunk
            by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[int]]] = {}
            for p, i in zip(ps, ids, strict=True):
                dps, dids = by_dtype.setdefault(p.dtype, ([], []))
                dps.append(p)
                dids.append(i)
            for dtype, (dps, dids) in by_dtype.items():
                sharded = any(_sharding.is_dtensor(p) for p in dps)
                if ops.resolve_backend(self.backend, dps[0].device, [dtype], sharded=sharded) in _PLAIN_TORCH:
                    units.extend((*head, [p], [i]) for p, i in zip(dps, dids, strict=True))
                else:
                    units.append((*head, dps, dids))
        return units

    def _perturb_chunk(self, ps: list[torch.Tensor], ids: list[int], seed: int, query: int, scale: float) -> None:
        if self.sparse_density is not None:  # Sparse-MeZO: masked passes in plain torch (_sparse.py)
            self._sparse_perturb(ps, ids, seed, query, scale, self.distribution)
            return
        precond = None if self.precond_buffer is None else [self.state[p][self.precond_buffer] for p in ps]
        ops.perturb_(ps, ids, seed, scale, query=query, distribution=self.distribution, precond=precond,
                     rounding="nearest", backend=self.backend)

    def _check_backends(self) -> None:
        """Check every (group, device) chunk now, so that nothing an op would refuse is found after a first write.

        The backend of every chunk is resolved, and each chunk's tensors and state buffers get the checks the ops
        run (dtype, device, writable memory, buffers of the parameter's shape): a parameter reassigned between
        steps (``p.data = ...`` of another shape, dtype or device, an inference tensor) is refused here, before
        the first pass, instead of by the op of its group after the groups before it were updated.
        """
        for group, ps, ids in self._chunks():
            dtypes = [p.dtype for p in ps] + ([torch.float32] if self.precond_buffer is not None else [])
            self._check_chunk(group, ps, ids)
            sharded = any(_sharding.is_dtensor(p) for p in ps)  # DTensors (FSDP2): backends that take shards
            ops.resolve_backend(self.backend, ps[0].device, dtypes, sharded=sharded)
            if self._warned_slow_fallback:
                continue
            notice = ops.slow_fallback_notice(self.backend, ps[0].device, dtypes)
            if notice is not None:
                self._warned_slow_fallback = True  # once per optimizer, not once per step
                warnings.warn(notice, stacklevel=_outside_stacklevel())

    def _check_chunk(self, group: dict[str, Any], ps: list[torch.Tensor], ids: list[int]) -> None:
        name = type(self).__name__
        g = next(i for i, other in enumerate(self.param_groups) if other is group)
        try:
            ops_checks.check_params([_sharding.local(p) for p in ps], ids)  # a DTensor's shard, as the ops see it
        except (TypeError, ValueError, RuntimeError) as e:
            raise type(e)(
                f"{name}: a parameter of param group {g} cannot be stepped: {e} "
                "(params[i] = position among the group's trainable parameters on this device). Nothing was changed"
            ) from None
        names = set(self._buffers(group)) | ({self.precond_buffer} if self.precond_buffer else set())
        for p, tid in zip(ps, ids, strict=True):
            for buf in sorted(names):
                s = self.state[p].get(buf)
                if s is None or (s.dtype == torch.float32 and s.shape == p.shape and s.device == p.device):
                    continue
                raise ValueError(
                    f"{name}: the state {buf!r} of trainable parameter {tid} ({ops_checks.describe(s)}) no longer "
                    f"matches the parameter ({ops_checks.describe(p)}): was the parameter reassigned "
                    "(p.data = ...) since its state was created? Nothing was changed. Put back a tensor of the "
                    "state's shape and device, or start its state afresh (del opt.state[p])"
                )

    # ------------------------------------------------------------------ update

    def _update_from_pending(self, precond_checked: bool = False) -> None:
        """Take the pending estimate and run its update pass (or restore and skip/raise a non-finite step)."""
        # hyper-parameters may have changed since the estimate (a scheduler, a user): checked before the
        # pending estimate is taken, so a refused step() can be retried once they are fixed
        assert self._acc is not None
        self._check_layout(self._acc.layout, "step")
        self._check_step_inputs(precond=not precond_checked)
        self._check_backends()  # a parameter reassigned since the estimate: refused while the estimate is kept
        acc, self._acc = self._acc, None
        seed = acc.seed
        if acc.applied is not None:
            # the rest of an update pass that failed part-way: its scalars were averaged (and all-reduced) then,
            # and the units it had not applied were restored to θ
            grads, extras = acc.applied.grads, acc.applied.extras
            self._update_pass(seed, grads, extras, restore=(0.0, 0), resume=acc)
            self._t += 1
            return
        assert acc.grads is not None
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
        self._update_pass(seed, grads, extras, restore=self._perturbation.pending_restore(), resume=acc)
        self._perturbation.mark_restored()
        self._t += 1

    def _update_from_scalars(self, seed: Any, projected_grads: Any, extra_scalars: dict[str, Any]) -> None:
        """The update pass of one step from its (seed, scalars), checked first (``apply_update``)."""
        if self._acc is not None:
            raise RuntimeError(
                self._partial_help() if self._acc.applied is not None
                else "an estimate is pending; apply it with step() or drop it with take_estimate() first"
            )
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
        self._check_backends()
        acc = Accumulator(seed, self.summed_extras)
        acc.layout = self._layout()
        self._update_pass(seed, grads, extras, restore=(0.0, 0), resume=acc)
        self._t += 1

    def _update_pass(
        self, seed: int, grads: torch.Tensor, extras: dict[str, torch.Tensor], restore: tuple[float, int],
        resume: Accumulator,
    ) -> None:
        """``_fused_update`` on every unit: the pending restore (if any) fused with the algorithm's update.

        A unit that fails (an allocation failure, a failed kernel launch) has written nothing (see
        :meth:`_units`); the units before it are updated and cannot be taken back (their state moved too). So
        the units after them are restored to θ, and ``resume`` goes back as the pending estimate with the
        progress (``applied``): ``step()`` applies the remaining units once the cause is fixed, and the step
        counter advances then, so no unit is ever updated twice. A failure before any unit was applied leaves
        nothing pending (as before the first write).
        """
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
        units = self._units(chunks)
        keys = [tuple(ids) for _, _, ids in units]
        progress = resume.applied
        start = 0 if progress is None else progress.done
        if progress is not None and progress.units != keys:
            self._acc = resume  # kept: the layout of the units changed (a dtype), nothing was written
            raise RuntimeError(
                f"{type(self).__name__}.step(): the update of step {self._t} failed part-way and its units "
                "(the trainable parameters, their groups and dtypes) changed since; it can only be finished over "
                "the same parameters. Put them back as they were and call step() again"
            )
        done = start
        try:
            for group, params, ids in units[start:]:
                dev = params[0].device
                self._fused_update(group, params, ids, seed, coeffs.to(dev),
                                   {k: v.to(dev) for k, v in extras.items()}, self._t + 1, op_kwargs)
                done += 1
        except BaseException:
            # units the fused op has processed are restored (and updated); restore only the others
            if restore_scale != 0.0:
                for _, params, ids in units[done:]:
                    self._perturb_chunk(params, ids, seed, restore_query, restore_scale)
                self._perturbation.mark_restored()
            if done > 0:
                resume.applied = PartialUpdate(grads, extras, keys, done)
                self._acc = resume
            raise

    def _partial_help(self) -> str:
        assert self._acc is not None and self._acc.applied is not None
        done, total = self._acc.applied.done, len(self._acc.applied.units)
        return (
            f"{type(self).__name__}: the update of step {self._t} failed part-way ({done} of its {total} units "
            "applied, the others restored to their pre-step weights); call step() without a closure to apply the "
            "rest once the cause is fixed (no unit is updated twice), then continue"
        )

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
