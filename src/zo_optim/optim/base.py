r"""The public :class:`ZOOptimizer`: the one step protocol of every zeroth-order optimizer, and its hooks.

Subclasses only declare their hyper-parameters (torch-style ``defaults``), their
per-parameter float32 buffers, the extra scalars they need, and which fused op
runs their update (:meth:`ZOOptimizer._fused_update`). Everything else — seeds,
estimators, the pass schedule, safety, accumulation, data parallel, state dicts —
lives in this package and is never overridden.

Vocabulary (one name per concept):

* *pass*: one elementwise sweep over the trainable weights. A *perturbation pass*
  moves them by s·u_k (``_perturb_params``); a *restore* brings them back to θ.
* *estimate*: the forwards of one step at its probe points, giving the projected
  gradients g_k and the algorithm's extra scalars; accumulated until ``step()``
  uses them, they are the *pending estimate*.
* *update*: the one pass that changes θ and the state from (seed, scalars). On
  each (group, device) chunk it is the subclass's *fused update*
  (``_fused_update``: its fused op, which also does the pending restore); over
  all chunks it is the *update pass* (``_update_pass``), run from the pending
  estimate (``_update_from_pending``, by ``step()``) or from given scalars
  (``_update_from_scalars``, by ``apply_update()``).
* *apply* names only the public ``apply_update(seed, projected_grads, **extras)``:
  an update from given scalars, without forwards (replay, federated rounds).

Where the parts live (each module's docstring says why it is a mixin or a collaborator):

======================  ==========================================================
:mod:`._validation`     argument checks and the accepted choices
:mod:`._guard`          one call at a time, signals deferred (:mod:`._interrupts`)
:mod:`._layout`         trainable parameters, tensor ids, chunks, state buffers
                        (``add_param_group``, ``state_bytes``)
:mod:`._estimate`       the forwards of an estimate: probes → scalars, accumulation
:mod:`._passes`         the perturbation passes and the update pass
:mod:`._perturbation`   in-place or transient perturbation of the weights
                        (``attach``, ``detach``, ``restore_weights``)
:mod:`._checkpoint`     ``state_dict`` / ``load_state_dict`` (validated whole first); no copies
:mod:`._distributed`    data parallel: seed broadcast, scalar all-reduce
======================  ==========================================================

The step schedule (passes and forwards per estimator), the seeds and the handling of
non-finite losses are described in :mod:`._estimate`; what an error leaves behind, in
:mod:`._passes`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from .. import ops, rng
from ._anchor import AnchorDecay
from ._checkpoint import Checkpointing, ZOState
from ._estimate import CLOSURE_HELP, Accumulator, Closure, MeasuredEstimate, NonFiniteLossError, Probes
from ._guard import CallGuard
from ._layout import ParamLayout
from ._lowrank import LowRankPerturbation
from ._passes import UpdatePasses, WeightsNotRestoredError
from ._perturbation import InPlacePerturbation, PerturbationModes, TransientPerturbation
from ._schedule import check_lr_decay_steps
from ._sparse import SparsePerturbation
from ._subspace import BlockProbes
from ._validation import (
    DISTRIBUTIONS,
    ESTIMATORS,
    NONFINITE,
    PERTURBATIONS,
    ROUNDINGS,
    ZO_EPS_RANGE,
    as_seed,
    as_zo_eps,
    check_choice,
    check_positive,
)

__all__ = ["ZO_EPS_RANGE", "NonFiniteLossError", "WeightsNotRestoredError", "ZOOptimizer"]


class ZOOptimizer(
    PerturbationModes, MeasuredEstimate, UpdatePasses, Checkpointing, ParamLayout, BlockProbes, SparsePerturbation,
    LowRankPerturbation, AnchorDecay, torch.optim.Optimizer
):
    r"""Base class of the zeroth-order optimizers (see the module docstring for the schedule).

    Args (common to every subclass):
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer
            (``named_parameters()`` also works and gives names to per-tensor options; the names
            are extracted here, so this works with torch >= 2.4, not only torch >= 2.6).
            Parameters with ``requires_grad=False`` are skipped and not numbered.
        zo_eps: perturbation scale ε.
        num_queries: random directions per step (each its own ``query`` slot).
        estimator: ``"central"`` (±ε, 2q forwards) or ``"forward"`` (L0 + q forwards).
        distribution: ``"gaussian"`` or ``"rademacher"`` directions z.
        seed: base seed of the run (uint64); ``None`` draws one from Python's ``random``
            (rank 0's is broadcast when ``torch.distributed`` is initialised).
        backend: ``"auto" | "triton" | "cpu" | "chunked" | "reference"`` for the fused ops.
        on_nonfinite: ``"skip"`` (restore, skip the update, count it) or ``"raise"``.
        maximize: ascend the objective instead of descending.
        perturbation: ``"inplace"`` or ``"transient"`` (needs :meth:`attach`, or ``module=``).
        rounding: how the update pass stores bfloat16/float16 weights,
            ``"stochastic"`` (default, unbiased) or ``"nearest"``.
        module: shortcut for ``perturbation="transient"`` + ``opt.attach(module)``.
        data_parallel: ``True`` (default): under an initialised ``torch.distributed`` group with
            world size > 1 this optimizer is one replica of a data-parallel step (the base seed is
            broadcast from rank 0, ``step()`` all-reduces the scalars). ``False``: it ignores the
            process group and enters no collective (federated replicas, per-rank experiments).
        anchor_decay: λ_a >= 0 (default 0: off), a param-group option: after each step's update,
            θ ← θ + γλ_a(θ_a − θ) toward θ_a, the weights at construction (L2-SP applied decoupled;
            needs lr·anchor_decay < 1; one copy of the group's weights as state; :mod:`._anchor`).
        lr_decay_steps: T >= 0 (default 0: a constant lr), a param-group option: the update of step t
            uses lr·max(0, 1 − t/T), a linear decay to 0 read from the step counter, so replay, resume
            and federated replicas apply the same lr (:mod:`._schedule`).
    """

    #: algorithm name written into state dicts and federated messages
    algorithm: ClassVar[str] = "zo"
    #: the buffer used as preconditioner P of the directions u = z / sqrt(P) (None: u = z)
    precond_buffer: ClassVar[str | None] = None
    #: whether L(θ) must be measured in every estimate (HiZOO's curvature)
    needs_center_loss: ClassVar[bool] = False
    #: estimators this algorithm accepts
    estimators: ClassVar[tuple[str, ...]] = ESTIMATORS
    #: names of the extra per-query scalars :meth:`apply_update` accepts, and whether each is required
    extra_scalars: ClassVar[dict[str, bool]] = {}
    #: extra scalars that are sums over examples: summed (not averaged) across micro-batches and ranks
    summed_extras: ClassVar[frozenset[str]] = frozenset()
    #: lower bounds of per-parameter buffers checked on load: name -> (bound, strict); the preconditioner
    #: buffer is always checked > 0 (the directions are z/sqrt of it); every buffer must be finite
    buffer_ranges: ClassVar[dict[str, tuple[float, bool]]] = {}
    #: whether the preconditioner's updates can be stopped with the instance flag ``freeze_precond`` (HiSo)
    can_freeze_precond: ClassVar[bool] = False
    #: recommended settings per use (``use → {"lr": ...}``; the uses are :data:`zo_optim.optim.registry.USES`)
    recommended: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        zo_eps: float = 1e-3,
        num_queries: int = 1,
        estimator: str = "central",
        distribution: str = "gaussian",
        seed: int | None = None,
        backend: str = "auto",
        on_nonfinite: str = "skip",
        maximize: bool = False,
        perturbation: str = "inplace",
        rounding: str = "stochastic",
        module: torch.nn.Module | None = None,
        data_parallel: bool = True,
        anchor_decay: float = 0.0,
        lr_decay_steps: int = 0,
    ) -> None:
        as_zo_eps(zo_eps)
        if not isinstance(data_parallel, bool):
            raise TypeError(f"Invalid data_parallel: {data_parallel!r} (True or False)")
        if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
            raise ValueError(f"Invalid num_queries: {num_queries!r} (an int >= 1)")
        check_choice("estimator", estimator, self.estimators)
        check_choice("distribution", distribution, DISTRIBUTIONS)
        check_choice("backend", backend, ops.BACKENDS)
        check_choice("on_nonfinite", on_nonfinite, NONFINITE)
        check_choice("perturbation", perturbation, PERTURBATIONS)
        check_choice("rounding", rounding, ROUNDINGS)
        seed = random.getrandbits(64) if seed is None else as_seed(seed)
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or dicts, got a single Tensor; pass [tensor]")
        self.zo_eps = float(zo_eps)
        self.num_queries = num_queries
        self.estimator = estimator
        self.distribution = distribution
        self.base_seed = seed
        self.backend = backend
        self.on_nonfinite = on_nonfinite
        self.maximize = bool(maximize)
        self.rounding = rounding
        self.skipped_steps = 0
        self.last_projected_grads: torch.Tensor | None = None
        self.last_extra_scalars: dict[str, torch.Tensor] = {}
        self._t = 0
        self.data_parallel = data_parallel
        self._seed_synced = False
        self._acc: Accumulator | None = None
        self._tensor_ids: dict[int, int] = {}
        self._guard = CallGuard(type(self).__name__)  # before super().__init__: add_param_group takes it
        self._transient_names: dict[int, str] = {}
        self._warned_slow_fallback = False
        super().__init__(params, {**defaults, "anchor_decay": anchor_decay, "lr_decay_steps": lr_decay_steps})
        # truthy when empty: see ZOState (torch.distributed.checkpoint); keeps the anchors add_param_group took
        self.state = ZOState(dict, self.state)
        for p in self._all_params():
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported: zeroth-order ops need dense tensors")
        if not self._trainable():
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        self._inplace = InPlacePerturbation(self._perturb_params)
        self._transient = TransientPerturbation(self._perturb_params, lambda p: id(p) in self._tensor_ids)
        self._perturbation = self._transient if perturbation == "transient" or module is not None else self._inplace
        if module is not None:
            self.attach(module)

    # ------------------------------------------------------------------ hooks for subclasses

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one param group's hyper-parameters (ValueError in torch style)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            # torch.optim accepts a Tensor lr (for capturable/compiled steps); ours is read as a host float
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"Invalid learning rate: {lr!r} (a Tensor lr must hold one floating value)")
            lr = float(lr)
        check_positive("learning rate", lr, allow_zero=True)
        check_positive("weight_decay value", group.get("weight_decay", 0.0), allow_zero=True)
        self._check_anchor_decay(group)
        check_lr_decay_steps(group)

    def _buffers(self, group: dict[str, Any]) -> dict[str, float]:
        """Per-parameter float32 buffers of this group: name → initial value."""
        return {}

    def _extras_from_probes(self, probes: Probes) -> dict[str, torch.Tensor]:
        """Extra per-query scalars [q] this algorithm derives from the probe losses."""
        return {}

    def _settings(self) -> dict[str, Any]:
        """Constructor-level (not per-group) settings, written into ``state_dict()["zo"]["settings"]``."""
        return {}

    def _runtime_state(self) -> dict[str, Any]:
        """Attributes a user may change between steps that a resume must restore (Python scalars)."""
        return {}

    def _load_runtime_state(self, runtime: dict[str, Any]) -> None:
        """Restore what :meth:`_runtime_state` saved (missing keys: older state dicts, keep the current value)."""

    # (``_check_runtime_state``, the hook that validates a loaded ``zo["runtime"]``, is in :mod:`._checkpoint`)

    def _prepare(self) -> None:
        """Validate per-tensor settings of every group before the first pass of a step.

        Anything that can fail must fail here, while no weight is perturbed yet.
        """

    def _check_scalars(self, grads: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        """Replayed scalars (``apply_update``) must be finite (one host sync): a NaN/inf g would be written
        into every weight. Subclasses add their own checks (HiZOO: curvature >= 0)."""
        values = {"projected_grads": grads, **extras}
        finite = torch.stack([torch.isfinite(v).all() for v in values.values()]).tolist()
        bad = [name for name, ok in zip(values, finite, strict=True) if not ok]
        if bad:
            raise ValueError(
                f"{type(self).__name__}.apply_update: non-finite {', '.join(bad)} "
                f"({', '.join(str(values[n].tolist()) for n in bad)}); nothing was applied. A step whose loss was "
                "non-finite is skipped, not replayed: skip it, or replay it with the scalars of a finite estimate"
            )

    def _fused_update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        ids: list[int],
        seed: int,
        coeffs: torch.Tensor,
        extras: dict[str, torch.Tensor],
        step: int,
        op_kwargs: dict[str, Any],
    ) -> None:
        """Run the fused restore + update op on one chunk (one group, one device).

        ``coeffs`` [q] are the ĝ coefficients (g_k / q, negated when maximizing),
        ``step`` is 1-based (this update's index), ``op_kwargs`` carries restore,
        distribution, rounding and backend.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ public API

    @property
    def zo_eps(self) -> float:
        """The perturbation scale ε; validated when set (range ``ZO_EPS_RANGE``), takes effect at the next step."""
        return self._zo_eps

    @zo_eps.setter
    def zo_eps(self, value: float) -> None:
        self._zo_eps = as_zo_eps(value)

    @property
    def refusal(self) -> str | None:
        """Why every call but ``load_state_dict`` is refused, after a :class:`WeightsNotRestoredError`; else None.

        Set when a pass failed and taking it back failed too (the weights are unknown); a successful
        ``load_state_dict`` clears it.
        """
        return self._guard.refusal

    @property
    def step_count(self) -> int:
        """Steps taken so far (skipped ones included) = the ``t`` of the next seed."""
        return self._t

    @property
    def current_seed(self) -> int:
        """The seed of the step the next ``estimate``/``step`` works on."""
        return rng.step_seed(self.base_seed, self._t)

    @property
    def pending_seed(self) -> int | None:
        """The seed of the pending (accumulated, not yet applied) estimate; None when nothing is pending."""
        return None if self._acc is None else self._acc.seed

    @torch.no_grad()
    def estimate(
        self, closure: Closure, *, seed: int | None = None, weight: Any = None, restore: bool = True
    ) -> torch.Tensor:
        """Run the forwards of one step and accumulate its projected gradients.

        Repeated calls before :meth:`step` accumulate a weighted mean (gradient
        accumulation); the weights are restored when it returns. Returns the loss
        estimate of L(θ) (a 0-d tensor on the parameters' device).

        Args:
            closure: returns the loss (scalar or ``[B]`` per-example vector).
            seed: the step seed (uint64) to measure with, instead of
                ``current_seed`` (federated rounds: ``rng.round_seed(...)``);
                :meth:`step` then applies with it. Every estimate of one
                accumulation must use the same seed.
            weight: this micro-batch's weight in the mean (a positive finite
                number, default 1; e.g. its token count). The accumulated scalar
                is Σ w·g / Σ w, across micro-batches and, in data parallel, ranks.
            restore: ``False`` leaves the (in-place perturbed) weights at the last
                probe point, saving one pass: the next ``estimate`` moves them on
                from there and ``step()`` fuses the restore into its update. Until
                then anything that reads the weights (an evaluation, a checkpoint
                of the model) must call :meth:`restore_weights` first. Errors and
                non-finite losses still restore. No effect in transient mode.
        """
        if not isinstance(restore, bool):
            raise TypeError(f"Invalid restore: {restore!r} (True or False)")
        with self._guard.exclusive("estimate"):
            try:
                return self._estimate(closure, keep_perturbed=not restore, seed=seed, weight=weight)
            except BaseException as e:
                # a refusal before the probes (seed mismatch, frozen parameter, ...) after a deferred restore:
                # the weights come back to θ; the pending estimate is kept
                self._take_back(e, self._perturbation.restore)
                raise

    def step(  # type: ignore[override]
        self, closure: Closure | None = None, *, seed: int | None = None, weight: Any = None
    ) -> torch.Tensor | None:
        """One ZO step: ``estimate(closure, seed=seed, weight=weight)`` (if given), then the update from the estimate.

        Returns the loss estimate of this call's closure (None without closure).
        """
        with self._guard.exclusive("step"), torch.no_grad():
            loss = None
            if closure is None and self._acc is None:
                raise TypeError(CLOSURE_HELP.format(name=type(self).__name__))
            if closure is None and (seed is not None or weight is not None):
                raise TypeError("seed= and weight= describe the closure's estimate; pass them with a closure")
            # From the first perturbation until the fused update has run, any error (a bad
            # closure output, a mismatched micro-batch, an interrupted all-reduce, ...) restores
            # the weights before it propagates.
            try:
                if closure is not None:
                    loss = self._estimate(closure, keep_perturbed=True, seed=seed, weight=weight)
                self._update_from_pending(precond_checked=closure is not None)
            except BaseException as e:
                self._take_back(e, self._perturbation.restore)
                raise
        return loss

    def take_estimate(self) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        """Hand back the pending estimate (seed, g [q], extra scalars) without applying it.

        The step counter does not move; apply an aggregated version later with
        :meth:`apply_update` (federated clients build on this).
        """
        with self._guard.exclusive("take_estimate"):
            if self._acc is None:
                raise RuntimeError("no pending estimate: call estimate(closure) first")
            if self._acc.applied is not None:
                raise RuntimeError(self._partial_help())  # part of it is applied: it must not be applied again
            self._inplace.restore()  # after estimate(..., restore=False): the update is applied elsewhere
            grads, extras = self._acc.mean()
            seed = self._acc.seed
            self._acc = None
            return seed, grads, extras

    @torch.no_grad()
    def apply_update(self, seed: int, projected_grads: torch.Tensor | Iterable[float], **extra_scalars: Any) -> None:
        """Apply one step from its scalars, with no forwards (replay primitive).

        ``projected_grads`` are the q raw projected gradients g_k (not divided by
        q, not negated for ``maximize``) measured with ``seed``; ``extra_scalars``
        are the algorithm's extra per-query scalars (see the class docstring).
        State advances exactly as in :meth:`step` (the step counter included), so
        a replica that replays the (seed, scalars) of a run reproduces it.
        """
        with self._guard.exclusive("apply_update"):
            self._update_from_scalars(seed, projected_grads, extra_scalars)
