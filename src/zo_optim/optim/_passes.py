"""The passes over the weights: perturbation passes and the update pass, all or nothing under real errors.

* perturbation pass: θ ← θ + s·u_k on every (group, device) chunk (``ops.perturb_``), called in *units*
  (``_units``) that an op writes all or nothing: one dtype of a chunk on the fused backends (one kernel
  launch each), one tensor on the plain-torch ones (which loop tensor by tensor). A unit that fails takes
  back the units already moved (up to the round trip's float32 rounding).
* update pass: the subclass's ``_fused_update`` (the algorithm's fused restore + update op) unit by unit.
  The units it has updated cannot be taken back (their state moved too): when a later unit fails, the
  others are restored to θ and the step stays pending with its progress (``Accumulator.applied``), so
  ``step()`` applies the rest once the cause is fixed and the counter advances then; no unit is updated
  twice. A ``chunked`` unit (one tensor, written slice by slice) that fails between two slices keeps the
  slices it wrote: the progress records the element it stopped at (``ops.chunked.window``), the rest of the
  tensor is restored from there, and ``step()`` updates it from there. So after a failed update every
  element is either updated (θ_new) or restored (θ), never both, nor updated twice; for float32 weights on the
  plain-torch backends the finished step is bit-identical to an error-free one (the restore pass computes
  the same float32 θ + s·u that the fused op would have).
* ``_update_from_pending``: the pending estimate averaged (across ranks in data parallel), then the
  update pass, or the restore and skip (or raise) of a non-finite step; or the rest of a part-way update.
* ``_update_from_scalars``: the update pass from given scalars (the work of ``apply_update``).

What can fail for a reason we can see fails before the first write: every chunk's backend is resolved and
its tensors and state buffers get the ops' checks (``_check_backends``: a parameter reassigned with
``p.data = ...`` between steps is refused there, not by the update of its group after the groups before
it were written), and the hyper-parameters and the preconditioner are checked (``_check_step_inputs``)
while no weight has moved.

Errors: from the first perturbation until the fused update has run, any exception (KeyboardInterrupt
included) restores the weights before it propagates. A second error while a pass is taken back (or an op
that could not put back its own partial write: ``ops.chunked.PartialWriteError``) leaves weights the engine
cannot account for: it raises :class:`WeightsNotRestoredError` and the optimizer refuses every later call
but ``load_state_dict`` (which lifts the refusal) instead of stepping from unknown weights (see
:meth:`UpdatePasses._take_back` for why it does not retry).

A private mixin of :class:`~.base.ZOOptimizer` rather than a collaborator: the passes read the
optimizer's groups, state, counters and perturbation mode, and call the subclass hooks
(``_fused_update``, ``_check_group``, ``_prepare``, ``_check_scalars``); tests override
``_perturb_chunk`` and ``_fused_update`` on the optimizer class to inject failures.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Any

import torch

from .. import ops
from ..ops import _checks as ops_checks
from ..ops import _sharding, chunked
from . import _distributed
from ._estimate import Accumulator, NonFiniteLossError, PartialUpdate
from ._schedule import scheduled
from ._validation import as_seed

__all__ = ["UpdatePasses", "WeightsNotRestoredError"]


class WeightsNotRestoredError(RuntimeError):
    """A pass failed and taking it back failed too: some weights may still be perturbed or part-updated.

    The optimizer refuses every later call except ``load_state_dict`` until a checkpoint is loaded."""

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
        except BaseException as e:
            # a later unit failed (it wrote nothing): take back the units already moved, so the pass is all or
            # nothing up to the round trip's rounding (θ + s·u − s·u: the same float32 values a complete pass
            # and its restore leave, a few ulp from θ; bit for bit in transient mode, which copies θ back)
            def take_back() -> None:
                for ps, ids in reversed(done):
                    self._perturb_chunk(ps, ids, seed, query, -scale)

            self._take_back(e, take_back)
            raise

    def _units(self, chunks: Any) -> list[Any]:
        """Split each chunk (``(params, ids, ...)`` tuples; extra leading items kept) into the units that one op call
        writes all or nothing: one dtype of the chunk on the fused backends (Triton launches one kernel per dtype,
        numba one per call, and a launch that fails has written nothing), one tensor on the plain-torch backends
        and for the options whose passes run in plain torch (:meth:`_passes_in_plain_torch`), which loop tensor by
        tensor (an allocation failure on the third tensor leaves the first two written). The
        pass engine then knows exactly which tensors a failed call left moved: those of the units before it."""
        units = []
        per_tensor = self._passes_in_plain_torch()
        for chunk in chunks:
            *head, ps, ids = chunk
            by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[int]]] = {}
            for p, i in zip(ps, ids, strict=True):
                dps, dids = by_dtype.setdefault(p.dtype, ([], []))
                dps.append(p)
                dids.append(i)
            for dps, dids in by_dtype.values():
                if per_tensor or self._unit_backend(dps) in _PLAIN_TORCH:
                    units.extend((*head, [p], [i]) for p, i in zip(dps, dids, strict=True))
                else:
                    units.append((*head, dps, dids))
        return units

    def _passes_in_plain_torch(self) -> bool:
        """Whether an option's passes loop tensor by tensor in plain torch on every backend: then a unit is one
        tensor whatever the backend (low-rank directions; Sparse-MeZO's masked update with momentum)."""
        return self.lowrank_rank is not None or self._sparse_plain_update()

    def _take_back(self, error: BaseException, undo: Any) -> None:
        """Run ``undo()``, the take-back of a pass that failed with ``error``; if it fails too, refuse from now on.

        A second error here (or an op that could not put back its own partial write) leaves weights the engine
        cannot account for: which units, or slices of a unit, the failed take-back reached is not known at every
        level (an op that failed inside its own repair), so retrying it could move some weights twice, silently.
        The refusal (every later call but ``load_state_dict``) keeps anyone from stepping, estimating or saving a
        checkpoint from those weights; the way back is the last checkpoint, which is exact. Once refused,
        further take-backs (an outer handler's) do nothing: they could only compound it.
        """
        if self._guard.refusal is not None:
            return
        try:
            if isinstance(error, chunked.PartialWriteError):
                raise error
            undo()
        except BaseException as again:
            self._refuse_after(error, again)

    def _refuse_after(self, error: BaseException, again: BaseException) -> None:
        name = type(self).__name__
        msg = (
            f"{name}: a pass over the weights failed at step {self._t + 1} ({error!r}) and taking it back failed "
            f"too ({again!r}): some trainable weights may still be perturbed (off by up to ε·|z|) or part-updated. "
            f"{name} refuses to estimate, step or save from them. Recover from your last checkpoint: load the "
            "model's weights (model.load_state_dict(...)), then this optimizer's state (opt.load_state_dict(...), "
            "which lifts this refusal), and train on"
        )
        self._guard.refusal = msg
        raise WeightsNotRestoredError(msg) from again

    def _window(self, ps: list[torch.Tensor], start: int) -> Any:
        """``ops.chunked.window(start)`` for a unit that runs on the chunked backend (one tensor), else a
        window that no op reads (its progress stays 0: the unit is written all or nothing)."""
        if self._unit_backend(ps) == "chunked":
            return chunked.window(start)
        return contextlib.nullcontext(chunked.Window(start))

    def _unit_backend(self, ps: list[torch.Tensor]) -> str:
        sharded = any(_sharding.is_dtensor(p) for p in ps)
        return ops.resolve_backend(self.backend, ps[0].device, [ps[0].dtype], sharded=sharded)

    def _perturb_chunk(self, ps: list[torch.Tensor], ids: list[int], seed: int, query: int, scale: float) -> None:
        if self.sparse_density is not None:  # Sparse-MeZO: masked passes in plain torch (_sparse.py)
            self._sparse_perturb(ps, ids, seed, query, scale, self.distribution)
            return
        if self.lowrank_rank is not None:  # LOZO: low-rank directions in plain torch (_lowrank.py)
            self._lowrank_perturb(ps, ids, seed, query, scale)
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
        self._check_anchors(group, ps, ids)

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
            # and the units (elements of a chunked unit) it had not applied were restored to θ
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
        counter advances then, so no unit is ever updated twice. A ``chunked`` unit that fails between slices
        keeps its written slices: the progress records the element it stopped at, the restore and the resume
        start there (``_window``). A failure before anything was applied leaves nothing pending (as before the
        first write).
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
        elements = 0 if progress is None else progress.elements
        if progress is not None and (progress.units != keys or (
                elements and self._unit_backend(units[start][1]) != "chunked")):
            self._acc = resume  # kept: the layout of the units changed (a dtype), nothing was written
            raise RuntimeError(
                f"{type(self).__name__}.step(): the update of step {self._t} failed part-way and its units "
                "(the trainable parameters, their groups and dtypes, the backend of a tensor it stopped inside) "
                "changed since; it can only be finished over the same parameters. Put them back as they were and "
                "call step() again"
            )
        done, win = start, chunked.Window(elements)
        try:
            for group, params, ids in units[start:]:
                group = scheduled(group, self._t)  # the lr of step t (lr_decay_steps; itself when constant)
                dev = params[0].device
                first = elements if done == start else 0
                win = chunked.Window(first)  # until the op's own window is open: nothing of this unit written
                with self._window(params, first) as opened:
                    win = opened
                    self._fused_update(group, params, ids, seed, coeffs.to(dev),
                                       {k: v.to(dev) for k, v in extras.items()}, self._t + 1, op_kwargs)
                # in the same iteration: a unit counted done is updated and decayed, a failed one neither (_anchor)
                self._decay_unit(group, params)
                done += 1
        except BaseException as e:
            # units the fused op has processed are restored (and updated); restore only the others, and the
            # failed unit from the element it stopped at (its slices before are updated)
            partial = win.done if done < len(units) else 0

            def restore_rest() -> None:
                for j, (_, params, ids) in enumerate(units[done:] if restore_scale != 0.0 else ()):
                    with self._window(params, partial if j == 0 else 0):
                        self._perturb_chunk(params, ids, seed, restore_query, restore_scale)

            self._take_back(e, restore_rest)  # (also refuses after an op that left its unit part-written)
            if restore_scale != 0.0:
                self._perturbation.mark_restored()
            if done > 0 or partial > 0:
                resume.applied = PartialUpdate(grads, extras, keys, done, partial)
                self._acc = resume
            raise

    def _partial_help(self) -> str:
        assert self._acc is not None and self._acc.applied is not None
        done, total = self._acc.applied.done, len(self._acc.applied.units)
        inside = self._acc.applied.elements
        inside = f" and the first {inside} elements of the next" if inside else ""
        return (
            f"{type(self).__name__}: the update of step {self._t} failed part-way ({done} of its {total} units"
            f"{inside} applied, the rest restored to the pre-step weights); call step() without a closure to apply the "
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
