r"""The one step protocol shared by every zeroth-order optimizer.

Subclasses only declare their hyper-parameters (torch-style ``defaults``), their
per-parameter float32 buffers, the extra scalars they need, and which fused op
applies the update (:meth:`ZOOptimizer._apply`). Everything else — seeds,
estimators, the pass schedule, safety, accumulation, data parallel, state dicts —
lives here and is never overridden.

Step schedule (in-place perturbation, ``q = num_queries``; a *pass* is one
elementwise sweep over the trainable weights):

==============================  ===========================  =====================
estimator                       forwards per step            passes per step
==============================  ===========================  =====================
central (MeZO, ZOAdam, HELENE)  2q                           3q (+ε, −2ε, then +ε
                                                             restore of all but the
                                                             last query; the last
                                                             restore is fused into
                                                             the update)
forward (HiSo default)          q + 1 (L0 first)             2q
central + L0 (HiZOO)            2q + 1                       3q
==============================  ===========================  =====================

``estimate(closure)`` alone leaves the weights restored (one more pass) and
``step()`` then runs the update pass. ``estimate(closure, restore=False)`` skips
that pass: the weights stay at the last probe point until the next ``estimate``
(which moves them on from there, −ε → +ε in one pass), ``step()`` (which fuses the
restore into the update, as ``step(closure)`` does) or ``restore_weights()``; the
split form then costs the passes of ``step(closure)`` (``ZOTrainer`` does this).

Seeds: step ``t`` (steps already taken, skipped ones included) uses
``rng.step_seed(base_seed, t)``; query ``k`` of that step is the contract's
``query`` slot ``k``; the update pass stores low-precision weights with
stochastic rounding slot 0 (perturbation passes round to nearest).

Non-finite losses: with ``on_nonfinite="skip"`` the weights are restored, no
state changes, ``skipped_steps`` grows by one and the step counter still
advances (the skipped step's seed is consumed), so a run is a deterministic
function of (base seed, data) whatever happens. With ``"raise"`` the weights are
restored, the pending estimate is discarded and :class:`NonFiniteLossError` is
raised; the counter does not advance. "Non-finite" covers the losses and every
scalar derived from them (g_k, HiZOO's curvature, ...), checked in one host sync.
In data parallel the flag travels in the same all-reduce as the scalars, so all
ranks skip, or restore and raise, together (at ``step``, not inside ``estimate``).

Errors: from the first perturbation until the fused update has run, any
exception (KeyboardInterrupt included) restores the weights before it
propagates. Every pass is all or nothing across the (group, device) chunks:
backends and per-tensor settings are validated before the first pass, a
perturbation pass that fails on a later chunk takes back the earlier ones, and
an update that fails part-way restores only the chunks the fused op has not
processed (those it processed are restored and updated).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import random
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch

from .. import ops, rng
from ..ops import _checks as ops_checks
from . import _distributed
from ._estimate import Accumulator, Probes
from ._interrupts import SignalGate
from ._perturbation import InPlacePerturbation, TransientPerturbation

__all__ = ["NonFiniteLossError", "ZOOptimizer"]

Closure = Callable[[], Any]

ESTIMATORS = ("central", "forward")
PERTURBATIONS = ("inplace", "transient")
NONFINITE = ("skip", "raise")
# The accepted perturbation scales. Below 1e-18, 2ε² (HiZOO's curvature denominator) nears the float32
# underflow (1.2e-38) and every derived scalar overflows, so every step would be skipped; above 100, ε·|u|
# reaches ~600, whose float32 ulp (6e-5) makes the in-place ±ε round trip move the weights by more than a
# typical update (and 1e30 destroys them). Typical values are 1e-4 .. 1e-1.
ZO_EPS_RANGE = (1e-18, 100.0)
ROUNDINGS = ("stochastic", "nearest")

_CLOSURE_HELP = (
    "{name}.step() needs a closure that returns the loss (zeroth-order optimizers evaluate it at "
    "perturbed weights), e.g.\n"
    "    def closure():\n"
    "        return model(**batch).loss   # scalar, or a [B] vector of per-example losses\n"
    "    opt.step(closure)\n"
    "or, for gradient accumulation, call opt.estimate(closure) one or more times before opt.step()."
)


def _outside_stacklevel() -> int:
    """``stacklevel`` of the first caller outside zo_optim and torch: a warning names the user's line
    (``opt.step(...)``, ``estimate(...)``; transformers' loop under a Trainer), whatever path led there."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("zo_optim", "torch"):
        frame, level = frame.f_back, level + 1
    return level


class NonFiniteLossError(RuntimeError):
    """A closure returned a non-finite loss and ``on_nonfinite="raise"``."""


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}")
    if value < 0.0 or (value == 0.0 and not allow_zero):
        raise ValueError(f"Invalid {name}: {value}")


def _check_betas(betas: Any) -> None:
    """A pair of decay rates in [0, 1), checked as torch.optim.Adam does."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (a pair)")
    for i, b in enumerate(betas):
        if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r}")


def _as_zo_eps(value: Any) -> float:
    _check_positive("zo_eps", value)
    lo, hi = ZO_EPS_RANGE
    if not lo <= value <= hi:
        raise ValueError(
            f"Invalid zo_eps: {value!r} (the perturbation scale must lie in [{lo:g}, {hi:g}]: smaller values underflow "
            "the float32 scalars so every step is skipped, larger ones make the ±ε round trip destroy the weights; "
            "typical values are 1e-4 .. 1e-1)"
        )
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose from {', '.join(map(repr, choices))})")


def _as_seed(value: Any) -> int:
    """A uint64 seed from an int-like value (Python or NumPy integer), else ValueError."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        seed = int(value)
        if 0 <= seed < 2**64:
            return seed
    raise ValueError(f"Invalid seed: {value!r} (an int in [0, 2**64))")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_weight(value: Any) -> float:
    """A micro-batch weight: a positive finite number (a one-element tensor is read on the host)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        w = float(value)
        if math.isfinite(w) and w > 0.0:
            return w
    raise ValueError(f"Invalid weight: {value!r} (a positive finite number, e.g. the micro-batch's token count)")


class ZOOptimizer(torch.optim.Optimizer):
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
    ) -> None:
        _as_zo_eps(zo_eps)
        if not isinstance(data_parallel, bool):
            raise TypeError(f"Invalid data_parallel: {data_parallel!r} (True or False)")
        if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
            raise ValueError(f"Invalid num_queries: {num_queries!r} (an int >= 1)")
        _check_choice("estimator", estimator, self.estimators)
        _check_choice("distribution", distribution, ("gaussian", "rademacher"))
        _check_choice("backend", backend, ops.BACKENDS)
        _check_choice("on_nonfinite", on_nonfinite, NONFINITE)
        _check_choice("perturbation", perturbation, PERTURBATIONS)
        _check_choice("rounding", rounding, ROUNDINGS)
        seed = random.getrandbits(64) if seed is None else _as_seed(seed)
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
        # held while a step is in flight (estimate, step, apply_update, state-dict calls): a second call from
        # the closure or from another thread is refused instead of moving weights under the running step
        self._in_flight = threading.Lock()
        # closed (signals deferred) while a call is in flight, opened only around the closure and blocking waits
        self._gate: SignalGate | None = None
        self._transient_names: dict[int, str] = {}
        self._warned_slow_fallback = False
        super().__init__(params, defaults)
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

    # ------------------------------------------------------------------ copies

    def _refuse_copy(self, how: str) -> TypeError:
        name = type(self).__name__
        return TypeError(
            f"{name} cannot be {how}: a copy would lose the zeroth-order state (seed, step counter, lock, hooks) "
            f"and would not share the model's parameters. Use the state dict instead: "
            f"torch.save(opt.state_dict(), path), then opt2 = {name}(model2.parameters(), ...) and "
            "opt2.load_state_dict(torch.load(path, weights_only=True)) (resumes bit for bit)"
        )

    def __getstate__(self) -> dict[str, Any]:
        raise self._refuse_copy("pickled (pickle.dumps, torch.save(opt))")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise self._refuse_copy("pickled or copied (pickle.dumps, torch.save(opt), copy.copy)")

    def __deepcopy__(self, memo: Any) -> Any:
        raise self._refuse_copy("deep-copied (copy.deepcopy)")

    # ------------------------------------------------------------------ hooks for subclasses

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one param group's hyper-parameters (ValueError in torch style)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            # torch.optim accepts a Tensor lr (for capturable/compiled steps); ours is read as a host float
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"Invalid learning rate: {lr!r} (a Tensor lr must hold one floating value)")
            lr = float(lr)
        _check_positive("learning rate", lr, allow_zero=True)
        _check_positive("weight_decay value", group.get("weight_decay", 0.0), allow_zero=True)

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

    def _prepare(self) -> None:
        """Validate per-tensor settings of every group before the first pass of a step.

        Anything that can fail must fail here, while no weight is perturbed yet.
        """

    def _apply(
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
        self._zo_eps = _as_zo_eps(value)

    @property
    def step_count(self) -> int:
        """Steps taken so far (skipped ones included) = the ``t`` of the next seed."""
        return self._t

    @property
    def current_seed(self) -> int:
        """The seed of the step the next ``estimate``/``step`` works on."""
        return rng.step_seed(self.base_seed, self._t)

    @property
    def perturbation(self) -> str:
        return self._perturbation.mode

    def attach(self, module: torch.nn.Module, *, check_uses: bool = True) -> None:
        """Switch to ``perturbation="transient"``: perturb ``module``'s sub-modules one at a time from hooks.

        Every optimised parameter must be registered on a module inside ``module``, and must be
        read only inside the forward of a module that registers it (there it is perturbed): with
        ``check_uses=True`` the first estimate after this call watches the forwards' torch calls
        and raises ``ValueError`` (weights untouched, no estimate recorded) when one reads an
        optimised parameter elsewhere, e.g. ``nn.MultiheadAttention``'s ``out_proj.weight`` or a
        tied ``F.linear(h, emb.weight)``, whose share of the estimate would silently be zero.
        ``check_uses=False`` skips the check (a hook that only logs a parameter's values).
        """
        owned = {id(p) for m in module.modules() for p in m._parameters.values() if p is not None}
        missing = [i for i, p in enumerate(self._trainable()) if id(p) not in owned]
        if missing:
            raise ValueError(
                f"{len(missing)} optimised parameters (trainable positions {missing[:5]}) are not registered "
                "on any sub-module of the attached module; attach the model that owns all of them"
            )
        # not while a step is in flight (from a closure): switching modes would strand its perturbation
        with self._exclusive("attach"):
            self._inplace.restore()  # an estimate(..., restore=False) offset belongs to the in-place mode
            if self._transient.attached:
                self._transient.detach()
            self._transient_names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
            self._transient.attach(module.modules())
            self._transient.checked = not check_uses
            self._perturbation = self._transient

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach` and return to in-place perturbation."""
        with self._exclusive("detach"):
            self._inplace.restore()
            self._transient.detach()
            self._perturbation = self._inplace

    @property
    def weights_perturbed(self) -> bool:
        """Whether the stored weights are off θ now (after ``estimate(..., restore=False)``, before ``step()``)."""
        return self._inplace.scale != 0.0

    def restore_weights(self) -> None:
        """Bring the weights back to θ if ``estimate(..., restore=False)`` left them perturbed (else nothing).

        One pass over the trainable weights; the pending estimate is kept, and ``step()``
        then applies it with a separate update pass. Call it before reading or saving the
        weights between a deferred-restore estimate and ``step()``.
        """
        with self._exclusive("restore_weights"):
            self._inplace.restore()

    @property
    def pending_seed(self) -> int | None:
        """The seed of the pending (accumulated, not yet applied) estimate; None when nothing is pending."""
        return None if self._acc is None else self._acc.seed

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """Refuse ``what`` while another call of this optimizer is in flight (re-entrant or concurrent).

        The call runs with signals deferred (see :mod:`._interrupts`): a Ctrl-C that arrives
        during a pass or its bookkeeping surfaces when the gate next opens (before a closure,
        around a blocking all-reduce) or when the call returns, never between a write and
        the record of it. The lock is taken and released inside the gate for the same reason.
        """
        with SignalGate() as gate:
            if not self._in_flight.acquire(blocking=False):
                raise RuntimeError(
                    f"{type(self).__name__}.{what}() was called while a step of this optimizer is in flight (from "
                    "inside the closure, or from another thread); the optimizer is not re-entrant: call it only "
                    "after estimate()/step() have returned"
                )
            try:
                self._gate = gate
                yield
            finally:
                self._gate = None
                self._in_flight.release()

    def _ungated(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run user code or a blocking wait with the user's signal handlers live (Ctrl-C interrupts it)."""
        gate = self._gate
        if gate is None:
            return fn(*args)
        gate.open()  # deferred signals are delivered here, before the call, where the step is consistent
        try:
            return fn(*args)
        finally:
            gate.close()

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
        with self._exclusive("estimate"):
            try:
                return self._estimate(closure, keep_perturbed=not restore, seed=seed, weight=weight)
            except BaseException:
                # a refusal before the probes (seed mismatch, frozen parameter, ...) after a deferred restore:
                # the weights come back to θ; the pending estimate is kept
                self._perturbation.restore()
                raise

    def step(  # type: ignore[override]
        self, closure: Closure | None = None, *, seed: int | None = None, weight: Any = None
    ) -> torch.Tensor | None:
        """One ZO step: ``estimate(closure, seed=seed, weight=weight)`` (if given), then apply the estimate.

        Returns the loss estimate of this call's closure (None without closure).
        """
        with self._exclusive("step"), torch.no_grad():
            loss = None
            if closure is None and self._acc is None:
                raise TypeError(_CLOSURE_HELP.format(name=type(self).__name__))
            if closure is None and (seed is not None or weight is not None):
                raise TypeError("seed= and weight= describe the closure's estimate; pass them with a closure")
            # From the first perturbation until the fused update has run, any error (a bad
            # closure output, a mismatched micro-batch, an interrupted all-reduce, ...) restores
            # the weights before it propagates.
            try:
                if closure is not None:
                    loss = self._estimate(closure, keep_perturbed=True, seed=seed, weight=weight)
                self._apply_pending(precond_checked=closure is not None)
            except BaseException:
                self._perturbation.restore()
                raise
        return loss

    def take_estimate(self) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        """Hand back the pending estimate (seed, g [q], extra scalars) without applying it.

        The step counter does not move; apply an aggregated version later with
        :meth:`apply_update` (federated clients build on this).
        """
        with self._exclusive("take_estimate"):
            if self._acc is None:
                raise RuntimeError("no pending estimate: call estimate(closure) first")
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
        with self._exclusive("apply_update"):
            self._apply_update(seed, projected_grads, extra_scalars)

    def _apply_update(self, seed: Any, projected_grads: Any, extra_scalars: dict[str, Any]) -> None:
        if self._acc is not None:
            raise RuntimeError("an estimate is pending; apply it with step() or drop it with take_estimate() first")
        seed = _as_seed(seed)
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
        self._update(seed, grads, extras, restore=(0.0, 0))
        self._t += 1

    def state_bytes(self) -> int:
        """Bytes held in per-parameter optimizer state (all fp32 buffers)."""
        self._ensure_state()
        tensors = [v for st in self.state.values() for v in st.values() if torch.is_tensor(v)]
        return sum(v.numel() * v.element_size() for v in tensors)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (tensors and Python scalars only; loadable with ``weights_only=True``).

        Refused while an estimate is pending (``estimate()`` called, ``step()`` not yet): the
        pending scalars belong to a step that has not happened, so a checkpoint is taken
        after ``step()`` (as ``transformers.Trainer`` does) or after ``take_estimate()``.
        """
        with self._exclusive("state_dict"):
            if self._acc is not None:
                raise RuntimeError(
                    f"{type(self).__name__}.state_dict() was called while an estimate is pending (estimate() without "
                    "step()); apply it with step() (or drop it with take_estimate()) before saving"
                )
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        self._ensure_state()
        sd = super().state_dict()
        sd["zo"] = {
            "algorithm": self.algorithm,
            "rng_version": rng.RNG_VERSION,
            "base_seed": self.base_seed,
            "step": self._t,
            "skipped_steps": self.skipped_steps,
            "zo_eps": self.zo_eps,
            "num_queries": self.num_queries,
            "estimator": self.estimator,
            "distribution": self.distribution,
            # constructor-level settings of the subclass, recorded for information (like zo_eps)
            "settings": self._settings(),
            # runtime flags that change the next steps; restored by load_state_dict
            "runtime": self._runtime_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` of the same optimizer class.

        Atomic: everything is validated before anything changes (the ``zo`` section, the
        param groups and their hyper-parameters, every state tensor, the runtime flags), so a
        refused state dict (``TypeError``/``ValueError``) leaves the optimizer exactly as it was.
        """
        with self._exclusive("load_state_dict"):
            self._load_state_dict(state_dict)

    def _load_state_dict(self, state_dict: Any) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{type(self).__name__}.load_state_dict() takes the dict returned by state_dict(), got a "
                f"{type(state_dict).__name__}; load it with opt.load_state_dict(torch.load(path, weights_only=True))"
            )
        zo = state_dict.get("zo")
        if not isinstance(zo, Mapping):
            raise ValueError(
                "not a zo-optim state dict (no 'zo' entry); "
                f"load a state dict saved by {type(self).__name__}.state_dict()"
            )
        if zo.get("algorithm") != self.algorithm:
            raise ValueError(
                f"state dict is from optimizer {zo.get('algorithm')!r}, cannot load it into {self.algorithm!r}; "
                "construct the same optimizer class that saved it"
            )
        if zo.get("rng_version") != rng.RNG_VERSION:
            raise ValueError(
                f"state dict was saved with RNG contract {zo.get('rng_version')!r} but this zo-optim uses "
                f"{rng.RNG_VERSION!r}; perturbations would differ, so resuming is refused"
            )
        if self._acc is not None:
            raise RuntimeError("an estimate is pending; apply it with step() before loading a state dict")
        # ---- validate everything; nothing below changes the optimizer until every check has passed
        base_seed, t, skipped = self._checked_counters(zo)
        runtime = zo.get("runtime", {})
        if not isinstance(runtime, Mapping):
            raise ValueError(f"Invalid state dict: zo['runtime'] is a {type(runtime).__name__}, not a dict")
        self._check_runtime_state(runtime)
        groups = self._checked_groups(state_dict)
        state = self._checked_state(state_dict, groups)
        # ---- apply (torch's own load for the groups; rolled back if anything still fails)
        old = {k: self.__dict__[k] for k in ("state", "param_groups")}
        old_attrs = (self.base_seed, self._t, self.skipped_steps, self._seed_synced, self._runtime_state())
        try:
            super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
            for p, entry in state.items():
                self.state[p] = entry
            self.base_seed, self._t, self.skipped_steps = base_seed, t, skipped
            self._load_runtime_state(runtime)
            self._seed_synced = True
        except BaseException:
            self.__dict__.update(old)
            self.base_seed, self._t, self.skipped_steps, self._seed_synced = old_attrs[:4]
            self._load_runtime_state(old_attrs[4])
            raise

    def _checked_counters(self, zo: Mapping[str, Any]) -> tuple[int, int, int]:
        """base_seed, step and skipped_steps of a state dict's ``zo`` section, validated."""
        for key in ("base_seed", "step", "skipped_steps"):
            if key not in zo:
                raise ValueError(
                    f"Invalid state dict: zo[{key!r}] is missing; load a complete state dict saved by "
                    f"{type(self).__name__}.state_dict()"
                )
        try:
            base_seed = _as_seed(zo["base_seed"])
        except ValueError:
            raise ValueError(
                f"Invalid state dict: zo['base_seed'] = {zo['base_seed']!r} (an int in [0, 2**64))"
            ) from None
        t, skipped = zo["step"], zo["skipped_steps"]
        if not _is_int(t) or not 0 <= t < 2**64:
            raise ValueError(f"Invalid state dict: zo['step'] = {t!r} (the step counter, an int >= 0)")
        if not _is_int(skipped) or not 0 <= skipped <= t:
            raise ValueError(
                f"Invalid state dict: zo['skipped_steps'] = {skipped!r} (an int in [0, step = {t}])"
            )
        return base_seed, int(t), int(skipped)

    def _checked_groups(self, state_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The param groups as a load would make them (saved hyper-parameters, current params), validated."""
        saved = state_dict.get("param_groups")
        if not isinstance(saved, (list, tuple)) or not all(isinstance(g, Mapping) for g in saved):
            raise ValueError("Invalid state dict: 'param_groups' must be a list of dicts (as saved by state_dict())")
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"Invalid state dict: it has {len(saved)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}; construct the optimizer with the same groups that saved it"
            )
        out = []
        for i, (own, sg) in enumerate(zip(self.param_groups, saved, strict=True)):
            ids = sg.get("params")
            if not isinstance(ids, (list, tuple)) or not all(_is_int(j) for j in ids):
                raise ValueError(f"Invalid state dict: param_groups[{i}]['params'] must be a list of int ids")
            if len(ids) != len(own["params"]):
                raise ValueError(
                    f"Invalid state dict: param_groups[{i}] has {len(ids)} parameters, this optimizer's group {i} "
                    f"has {len(own['params'])}; construct the optimizer with the same parameters that saved it"
                )
            missing = [k for k in own if k not in ("params", "param_names") and k not in sg]
            if missing:
                raise ValueError(f"Invalid state dict: param_groups[{i}] lacks the hyper-parameters {missing}")
            names = sg.get("param_names")
            if names is not None and (
                not isinstance(names, (list, tuple))
                or len(names) != len(ids)
                or not all(isinstance(n, str) for n in names)
            ):
                raise ValueError(f"Invalid state dict: param_groups[{i}]['param_names'] must list one str per param")
            group = {**sg, "params": own["params"]}
            if names is None and "param_names" in own:
                group["param_names"] = own["param_names"]
            try:
                self._check_group(group)
            except (ValueError, TypeError) as e:
                raise type(e)(f"Invalid state dict: param_groups[{i}]: {e}") from None
            out.append(group)
        all_ids = [j for sg in saved for j in sg["params"]]
        if len(set(all_ids)) != len(all_ids):
            raise ValueError("Invalid state dict: a parameter id appears twice in 'param_groups'")
        return out

    def _checked_state(
        self, state_dict: Mapping[str, Any], groups: list[dict[str, Any]]
    ) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-parameter state a load would install (fp32 copies on the params' devices), validated."""
        saved = state_dict.get("state")
        if not isinstance(saved, Mapping):
            raise ValueError("Invalid state dict: 'state' must be a dict (param id -> buffers)")
        id_map: dict[Any, tuple[int, torch.Tensor, dict[str, Any]]] = {}
        pos = 0
        for sg, group in zip(state_dict["param_groups"], groups, strict=True):
            for j, p in zip(sg["params"], group["params"], strict=True):
                id_map[j] = (pos, p, group)
                pos += 1
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for key, entry in saved.items():
            if key not in id_map:
                raise ValueError(f"Invalid state dict: state[{key!r}] belongs to no parameter of 'param_groups'")
            if not isinstance(entry, Mapping):
                raise ValueError(f"Invalid state dict: state[{key!r}] is a {type(entry).__name__}, not a dict")
            i, p, group = id_map[key]
            known = set(self._buffers(group))
            new: dict[str, torch.Tensor] = {}
            for name, v in entry.items():
                where = f"state[{key!r}][{name!r}] (parameter {i}, shape {tuple(p.shape)})"
                if name not in known:
                    raise ValueError(
                        f"Invalid state dict: {where} is not a buffer of {type(self).__name__} with this group's "
                        f"settings (expected {sorted(known)})"
                    )
                if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                    got = f"a {v.dtype} tensor" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
                    raise ValueError(f"Invalid state dict: {where} is {got}; it must be a floating tensor")
                if v.layout != torch.strided or tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"Invalid state dict: {where} has shape {tuple(v.shape)}; it must have its parameter's shape"
                    )
                # torch casts floating state to the param dtype on load; ZO buffers are always fp32
                v = v.detach().to(device=p.device, dtype=torch.float32).clone()
                self._check_state_buffer(where, name, v)
                new[name] = v
            out[p] = new
        return out

    def _check_state_buffer(self, where: str, name: str, value: torch.Tensor) -> None:
        """A loaded buffer must be finite and in its valid range (``buffer_ranges``; the preconditioner > 0)."""
        if value.numel() == 0:
            return
        lo, strict = (0.0, True) if name == self.precond_buffer else self.buffer_ranges.get(name, (-math.inf, True))
        lo_v, hi_v = (float(x) for x in torch.aminmax(value))
        finite = bool(torch.isfinite(value).all())
        if not finite or lo_v < lo or (strict and lo_v == lo):
            need = "finite" if lo == -math.inf else f"finite and {'>' if strict else '>='} {lo:g}"
            raise ValueError(
                f"Invalid state dict: {where} has values outside its range (min {lo_v:g}, max {hi_v:g}"
                f"{'' if finite else ', non-finite values'}); it must be {need}"
            )

    def _check_runtime_state(self, runtime: Mapping[str, Any]) -> None:
        """Validate a state dict's ``zo["runtime"]`` before it is loaded (ValueError)."""
        unknown = set(runtime) - set(self._runtime_state())
        if unknown:
            raise ValueError(
                f"Invalid state dict: zo['runtime'] has unknown entries {sorted(unknown)} for {type(self).__name__} "
                f"(known: {sorted(self._runtime_state())})"
            )

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
        with self._exclusive("add_param_group"):
            super().add_param_group(param_group)
            try:
                self._check_group(self.param_groups[-1])
                self._check_memory()
            except BaseException:
                self.param_groups.pop()  # a refused group is not kept
                raise

    def _check_memory(self) -> None:
        """Every parameter owns its memory: no stride-0 expand, no tensor twice, no overlapping views."""
        params = self._all_params()
        try:
            for i, p in enumerate(params):
                ops_checks.check_self_overlap(f"params[{i}]", p)
            ops_checks.check_no_overlap(params, "params")
        except ValueError as e:
            raise ValueError(
                f"{type(self).__name__}: {e} (params[i] = position in the optimizer's parameter list); "
                "nothing was written"
            ) from None

    # ------------------------------------------------------------------ internals

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
                        self.state[p][name] = torch.full(p.shape, init, dtype=torch.float32, device=p.device)

    def _data_parallel_world(self) -> bool:
        """Whether this step is one replica of a data-parallel step (collectives are entered)."""
        return self.data_parallel and _distributed.world_size() > 1

    def _sync_seed(self) -> None:
        if self.data_parallel and not self._seed_synced:
            self.base_seed = self._ungated(_distributed.broadcast_seed, self.base_seed, self._trainable()[0].device)
            self._seed_synced = True

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
            ops.resolve_backend(self.backend, ps[0].device, dtypes)
            if self._warned_slow_fallback:
                continue
            notice = ops.slow_fallback_notice(self.backend, ps[0].device, dtypes)
            if notice is not None:
                self._warned_slow_fallback = True  # once per optimizer, not once per step
                warnings.warn(notice, stacklevel=_outside_stacklevel())

    def _call_closure(self, closure: Closure, device: torch.device, probes: Probes) -> torch.Tensor:
        """The closure's loss as a 1-D vector; records in ``probes`` whether it was per-example (1-D).

        float64 losses (and Python floats, which are doubles) stay float64 so that loss
        differences keep their precision; every other floating dtype becomes float32.
        """
        with torch.no_grad():
            loss = self._ungated(closure)
        if type(loss).__module__ == "numpy" and getattr(loss, "dtype", None) is not None and loss.dtype.kind == "f":
            loss = torch.as_tensor(loss)  # a NumPy floating scalar/array keeps its dtype, like a tensor
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            probes.per_example.append(False)
            return torch.tensor([float(loss)], dtype=torch.float64, device=device)
        if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
            got = (
                f"a {loss.dtype} tensor" if isinstance(loss, torch.Tensor)
                else f"a {type(loss).__name__} of dtype {loss.dtype}" if hasattr(loss, "dtype")
                else f"a {type(loss).__name__}"
            )
            raise TypeError(
                "the closure must return the loss as a float tensor (scalar or [B] per-example), "
                f"got {got}; return e.g. loss.float() (an integer or complex loss has no usable difference)"
            )
        if loss.dim() > 1:
            raise ValueError(f"the closure returned a loss of shape {tuple(loss.shape)}; return a scalar or [B] vector")
        if loss.numel() == 0:
            raise ValueError(
                "the closure returned an empty loss vector (shape (0,)); return a scalar or a non-empty [B] vector "
                "(an empty micro-batch must not be passed to the optimizer)"
            )
        probes.per_example.append(loss.dim() == 1)
        dtype = torch.float64 if loss.dtype == torch.float64 else torch.float32
        return loss.detach().reshape(-1).to(device=device, dtype=dtype)

    def _estimate(self, closure: Closure, keep_perturbed: bool, seed: Any = None, weight: Any = None) -> torch.Tensor:
        if closure is None or not callable(closure):
            raise TypeError(_CLOSURE_HELP.format(name=type(self).__name__))
        if self._perturbation is self._transient and not self._transient.attached:
            raise RuntimeError("perturbation='transient' needs the model: call opt.attach(model) or pass module=model")
        w = 1.0 if weight is None else _as_weight(weight)
        self._require_trainable()
        layout = self._layout()  # the parameters this estimate perturbs (a closure may change requires_grad)
        if self._acc is not None:
            self._check_layout(self._acc.layout, "estimate")
        self._sync_seed()
        seed = self.current_seed if seed is None else _as_seed(seed)
        if self._acc is not None and seed != self._acc.seed:
            raise ValueError(
                f"estimate(seed={seed}) does not match the pending estimate's seed {self._acc.seed}: every "
                "micro-batch of one step must use the same seed; call step() (or take_estimate()) first"
            )
        self._refresh_layout()
        self._ensure_state()
        self._check_backends()
        self._prepare()
        self._check_step_inputs()
        device = self._trainable()[0].device
        pert = self._perturbation
        if self._acc is None:
            pert.passes = 0
        eps = self.zo_eps
        probes = Probes(self.estimator, eps)
        distributed = self._data_parallel_world()
        # the first estimate after attach(): every optimised parameter the forwards read must be perturbed there
        watch = pert is self._transient and not self._transient.checked
        try:
            with self._transient.watch(set(self._tensor_ids)) if watch else contextlib.nullcontext():
                if self.needs_center_loss or self.estimator == "forward":
                    pert.restore()  # L(θ) at θ: a deferred restore left the weights at the last probe point
                    probes.center = self._call_closure(closure, device, probes)
                for k in range(self.num_queries):
                    pert.move_to(seed, k, eps)
                    probes.plus.append(self._call_closure(closure, device, probes))
                    if self.estimator == "central":
                        pert.move_to(seed, k, -eps)
                        probes.minus.append(self._call_closure(closure, device, probes))
            if watch:
                self._check_transient_uses()
            # the scalars are formed in the losses' dtype, then kept (and sent) as float32
            grads = probes.projected_grads().float()
            extras = {k: v.float() for k, v in self._extras_from_probes(probes).items()}
            # the one host sync of a step: losses and every scalar derived from them (an overflowing
            # curvature is as unusable as a NaN loss)
            checked = torch.cat([*probes.all_losses(), grads, *extras.values()])
            finite = bool(torch.isfinite(checked).all())
            if not finite or not keep_perturbed:
                pert.restore()
            # in data parallel every rank must reach the all-reduce: the flag travels with the
            # scalars and all ranks raise (or skip) together in _apply_pending
            if not finite and self.on_nonfinite == "raise" and not distributed:
                self._acc = None
                raise NonFiniteLossError(
                    f"{type(self).__name__}: the closure returned a non-finite loss at step {self._t}; weights "
                    "restored (use on_nonfinite='skip' to skip such steps)"
                )
            if self._acc is None:
                self._acc = Accumulator(seed, self.summed_extras)
                self._acc.layout = layout
            self._acc.add(grads, extras, nonfinite=not finite, weight=w)
        except BaseException:
            pert.restore()
            raise
        return probes.loss()

    def _check_transient_uses(self) -> None:
        uses = self._transient.unperturbed_uses
        if not uses:
            self._transient.checked = True
            return
        names = self._transient_names
        where = [f"{names.get(pid, '?')} (read by {func})" for pid, func in uses.items()]
        raise ValueError(
            f"{type(self).__name__}: perturbation='transient' perturbs a parameter only inside the forward of the "
            f"module that registers it, but the forwards read {len(where)} optimised parameter(s) outside it: "
            f"{', '.join(where[:5])}{', ...' if len(where) > 5 else ''}. Their share of the gradient estimate would "
            "silently be zero (e.g. nn.MultiheadAttention reads out_proj.weight in its own forward; a tied output "
            "layer F.linear(h, emb.weight); a regulariser in the closure). Nothing was changed (weights restored, "
            "no estimate recorded). Fix: use perturbation='inplace' (opt.detach()), freeze those parameters, or "
            "call the module that owns them (self.out_proj(h)) instead of reading its weight"
        )

    def _apply_pending(self, precond_checked: bool = False) -> None:
        # hyper-parameters may have changed since the estimate (a scheduler, a user): checked before the
        # pending estimate is taken, so a refused step() can be retried once they are fixed
        assert self._acc is not None
        self._check_layout(self._acc.layout, "step")
        self._check_step_inputs(precond=not precond_checked)
        acc, self._acc = self._acc, None
        assert acc is not None and acc.grads is not None
        seed = acc.seed
        nonfinite = acc.nonfinite
        if self._data_parallel_world():
            # one all-reduce (SUM) of the weighted sums Σ w·g, Σ w·x (Σ x for summed extras), Σ w and the
            # non-finite flag: the mean is weighted across micro-batches AND ranks
            names = sorted(acc.extras)
            device = acc.grads.device
            tail = torch.tensor([acc.weight, 1.0 if nonfinite else 0.0], dtype=torch.float32, device=device)
            packed = self._ungated(
                _distributed.sum_across_ranks, torch.cat([acc.grads, *(acc.extras[k] for k in names), tail])
            )
            q = acc.grads.numel()
            total = packed[-2]
            grads = packed[:q] / total
            sums = {k: packed[q * (i + 1): q * (i + 2)] for i, k in enumerate(names)}
            extras = {k: v if k in self.summed_extras else v / total for k, v in sums.items()}
            nonfinite = bool(packed[-1] > 0)
        else:
            grads, extras = acc.mean()
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
        self._update(seed, grads, extras, restore=self._perturbation.pending_restore())
        self._perturbation.mark_restored()
        self._t += 1

    def _update(
        self, seed: int, grads: torch.Tensor, extras: dict[str, torch.Tensor], restore: tuple[float, int]
    ) -> None:
        self.last_projected_grads = grads
        self.last_extra_scalars = extras
        q = grads.numel()
        coeffs = grads / q
        if self.maximize:
            coeffs = -coeffs
        restore_scale, restore_query = restore
        op_kwargs = dict(restore_scale=restore_scale, restore_query=restore_query, distribution=self.distribution,
                         rounding=self.rounding, backend=self.backend)
        chunks = self._chunks()
        done = 0
        try:
            for group, params, ids in chunks:
                dev = params[0].device
                self._apply(group, params, ids, seed, coeffs.to(dev), {k: v.to(dev) for k, v in extras.items()},
                            self._t + 1, op_kwargs)
                done += 1
        except BaseException:
            # chunks the fused op has processed are restored (and updated); restore only the others
            if restore_scale != 0.0:
                for _, params, ids in chunks[done:]:
                    self._perturb_chunk(params, ids, seed, restore_query, restore_scale)
                self._perturbation.mark_restored()
            raise

    def _check_scalars(self, grads: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        """Replayed scalars must be finite (one host sync): a NaN/inf g would be written into every weight."""
        values = {"projected_grads": grads, **extras}
        finite = torch.stack([torch.isfinite(v).all() for v in values.values()]).tolist()
        bad = [name for name, ok in zip(values, finite, strict=True) if not ok]
        if bad:
            raise ValueError(
                f"{type(self).__name__}.apply_update: non-finite {', '.join(bad)} "
                f"({', '.join(str(values[n].tolist()) for n in bad)}); nothing was applied. A step whose loss was "
                "non-finite is skipped, not replayed: skip it, or replay it with the scalars of a finite estimate"
            )

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
        bufs = [(i, self.state[p][self.precond_buffer]) for i, p in enumerate(self._trainable())]
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
