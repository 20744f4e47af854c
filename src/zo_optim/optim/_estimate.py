r"""Estimates: the forwards of a step, probe losses → projected-gradient scalars, and their accumulation.

For query :math:`k` with direction :math:`u_k` and scale :math:`\epsilon`:

* central:  :math:`g_k = (L(\theta+\epsilon u_k) - L(\theta-\epsilon u_k)) / 2\epsilon`
* forward:  :math:`g_k = (L(\theta+\epsilon u_k) - L(\theta)) / \epsilon`

Losses are 1-D tensors (a scalar loss is a vector of length 1; a closure may
return a ``[B]`` vector of per-example losses) in float32, or float64 when the
closure returned float64: loss differences are taken in the loss's precision, so
``1000 + ||w - c||^2`` with ε = 1e-6 keeps its signal (float32 would round the
difference of two losses near 1000 to 0). Whether the losses
are per-example is decided by the closure's output rank, not by its length: a
1-D output is per-example even when B = 1 (the last, short micro-batch of an
epoch), so every micro-batch and every rank produces the same kinds of scalars.
:class:`Probes` and :class:`Accumulator` keep everything on the device (no host sync).

:class:`MeasuredEstimate` runs the forwards of an estimate on the optimizer: the closure at each
probe point of the schedule below, the scalars formed from its losses, the step's one host sync
(the non-finite check), and the result added to the pending :class:`Accumulator`. It is a private
mixin of :class:`~.base.ZOOptimizer` rather than a collaborator because it drives the optimizer's
perturbation mode, seed, layout and subclass hooks (``_extras_from_probes``, ``_prepare``) as one
sequence, with the restore-on-error of the whole estimate around them.

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _distributed
from ._validation import as_seed, as_weight

__all__ = [
    "CLOSURE_HELP", "Accumulator", "Closure", "MeasuredEstimate", "NonFiniteLossError", "PartialUpdate", "Probes",
]

Closure = Callable[[], Any]


class NonFiniteLossError(RuntimeError):
    """A closure returned a non-finite loss and ``on_nonfinite="raise"``."""


@dataclass
class Probes:
    """The losses measured for one estimate (one closure, one micro-batch)."""

    estimator: str
    zo_eps: float
    center: torch.Tensor | None = None  # L(θ), [B] or [1]
    plus: list[torch.Tensor] = field(default_factory=list)  # L(θ + ε u_k)
    minus: list[torch.Tensor] = field(default_factory=list)  # L(θ − ε u_k) (central only)
    per_example: list[bool] = field(default_factory=list)  # one per closure call: returned a 1-D vector

    def all_losses(self) -> list[torch.Tensor]:
        return ([self.center] if self.center is not None else []) + self.plus + self.minus

    def per_example_grads(self) -> torch.Tensor:
        """[q, B] per-example projected gradients (B = 1 for a scalar loss)."""
        plus = torch.stack(self.plus)
        if self.estimator == "central":
            return (plus - torch.stack(self.minus)) / (2.0 * self.zo_eps)
        assert self.center is not None
        return (plus - self.center.unsqueeze(0)) / self.zo_eps

    def projected_grads(self) -> torch.Tensor:
        """[q] projected gradients of the mean loss."""
        plus = torch.stack([p.mean() for p in self.plus])
        if self.estimator == "central":
            return (plus - torch.stack([m.mean() for m in self.minus])) / (2.0 * self.zo_eps)
        assert self.center is not None
        return (plus - self.center.mean()) / self.zo_eps

    def has_per_example(self) -> bool:
        return bool(self.per_example) and all(self.per_example)

    def loss(self) -> torch.Tensor:
        """Estimate of L(θ): L0 when measured, else the mean of the probes."""
        if self.center is not None:
            return self.center.mean()
        return torch.stack([t.mean() for t in self.plus + self.minus]).mean()


@dataclass
class PartialUpdate:
    """An update pass that failed part-way: its scalars, how many of its units (``units``: the tensor ids of
    each, in pass order) were applied, and how many leading flat elements of the next one (``elements``: a
    ``chunked`` unit, one tensor, fails between slices). Kept with the pending estimate until ``step()`` applies
    the rest."""

    grads: torch.Tensor
    extras: dict[str, torch.Tensor]
    units: list[tuple[int, ...]]
    done: int
    elements: int = 0


class Accumulator:
    """Weighted running sums of the scalars of several estimates of one step (gradient accumulation).

    Each estimate carries a weight w (default 1, e.g. a micro-batch's token count);
    :meth:`mean` is the weighted mean Σ w·g / Σ w of the projected gradients and of
    the averaged extras. The extras named in ``summed`` (sums over examples, e.g.
    HELENE's Σ_b g_b², which must not depend on how a batch is split) are summed
    unweighted. All estimates of one step share one seed. Sums are kept in the
    scalars' dtype (float32, or float64 for float64 losses).
    """

    def __init__(self, seed: int, summed: frozenset[str] = frozenset()) -> None:
        self.seed = seed
        self.summed = summed
        self.count = 0
        self.weight = 0.0
        self.grads: torch.Tensor | None = None  # Σ w·g
        self.extras: dict[str, torch.Tensor] = {}  # Σ w·x (Σ x for summed extras)
        self.nonfinite = False
        # positions of the trainable parameters when the first estimate was measured
        self.layout: tuple[int, ...] = ()
        # set when the update pass of this estimate failed part-way (see UpdatePasses._update_pass)
        self.applied: PartialUpdate | None = None

    def add(self, grads: torch.Tensor, extras: dict[str, torch.Tensor], nonfinite: bool, weight: float = 1.0) -> None:
        if self.count and set(extras) != set(self.extras):
            raise ValueError(
                f"micro-batches of one step produced different scalars ({sorted(extras)} vs {sorted(self.extras)}); "
                "return the same kind of loss (scalar or per-example vector) from every closure"
            )
        self.nonfinite |= nonfinite
        wg = grads * weight
        self.grads = wg if self.grads is None else self.grads + wg
        weighted = {k: v if k in self.summed else v * weight for k, v in extras.items()}
        self.extras = {k: v if k not in self.extras else self.extras[k] + v for k, v in weighted.items()}
        self.weight += weight
        self.count += 1

    def mean(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.grads is not None and self.count > 0
        return self.grads / self.weight, {
            k: v if k in self.summed else v / self.weight for k, v in self.extras.items()
        }


CLOSURE_HELP = (
    "{name}.step() needs a closure that returns the loss (zeroth-order optimizers evaluate it at "
    "perturbed weights), e.g.\n"
    "    def closure():\n"
    "        return model(**batch).loss   # scalar, or a [B] vector of per-example losses\n"
    "    opt.step(closure)\n"
    "or, for gradient accumulation, call opt.estimate(closure) one or more times before opt.step()."
)


class MeasuredEstimate:
    """The forwards of one estimate (mixed into :class:`~.base.ZOOptimizer`)."""

    def _sync_seed(self) -> None:
        """In data parallel, adopt rank 0's base seed (once: a loaded state dict's seed is already shared)."""
        if self.data_parallel and not self._seed_synced:
            self.base_seed = self._guard.ungated(
                _distributed.broadcast_seed, self.base_seed, self._trainable()[0].device
            )
            self._seed_synced = True

    def _call_closure(self, closure: Closure, device: torch.device, probes: Probes) -> torch.Tensor:
        """The closure's loss as a 1-D vector; records in ``probes`` whether it was per-example (1-D).

        float64 losses (and Python floats, which are doubles) stay float64 so that loss
        differences keep their precision; every other floating dtype becomes float32.
        """
        with torch.no_grad():
            loss = self._guard.ungated(closure)
        if type(loss).__module__ == "numpy" and getattr(loss, "dtype", None) is not None and loss.dtype.kind == "f":
            loss = torch.as_tensor(loss)  # a NumPy floating scalar/array keeps its dtype, like a tensor
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self._check_same_batch(probes, torch.tensor(0.0))
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
        self._check_same_batch(probes, loss)
        probes.per_example.append(loss.dim() == 1)
        dtype = torch.float64 if loss.dtype == torch.float64 else torch.float32
        return loss.detach().reshape(-1).to(device=device, dtype=dtype)

    def _check_same_batch(self, probes: Probes, loss: torch.Tensor) -> None:
        """Every closure call of one estimate must return the same kind of loss over the same examples: the
        differences L+_b − L−_b pair example b of one probe with example b of the other (HELENE's per-example
        scalars), and means over different batches would difference two different losses."""
        first = next(iter(probes.all_losses()), None)
        if first is None:
            return
        shape = tuple(loss.shape)
        was = (first.numel(),) if probes.per_example[0] else ()
        if shape != was:
            def kind(s: tuple[int, ...]) -> str:
                return f"{s[0]} per-example losses (shape {s})" if s else "a scalar loss"

            raise ValueError(
                f"{type(self).__name__}: the closure returned {kind(shape)} at call {len(probes.per_example) + 1} "
                f"of this estimate but {kind(was)} at its first call: every call of one estimate must evaluate the "
                "same batch (the loss differences pair them example by example). Nothing was changed (weights "
                "restored, no estimate recorded); make the closure use one fixed batch per estimate"
            )

    def _estimate(self, closure: Closure, keep_perturbed: bool, seed: Any = None, weight: Any = None) -> torch.Tensor:
        if closure is None or not callable(closure):
            raise TypeError(CLOSURE_HELP.format(name=type(self).__name__))
        if self._perturbation is self._transient and not self._transient.attached:
            raise RuntimeError("perturbation='transient' needs the model: call opt.attach(model) or pass module=model")
        w = 1.0 if weight is None else as_weight(weight)
        self._require_trainable()
        layout = self._layout()  # the parameters this estimate perturbs (a closure may change requires_grad)
        if self._acc is not None and self._acc.applied is not None:
            raise RuntimeError(self._partial_help())
        if self._acc is not None:
            self._check_layout(self._acc.layout, "estimate")
        self._sync_seed()
        seed = self.current_seed if seed is None else as_seed(seed)
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
        distributed = _distributed.active(self.data_parallel)
        # the first estimate after attach(): every optimised parameter the forwards read must be perturbed there
        watch = pert is self._transient and not self._transient.checked
        if pert is self._transient:
            self._transient.make_compile_safe()  # torch.compile may have come into use since attach()
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
            # scalars and all ranks raise (or skip) together in _update_from_pending
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
        except BaseException as e:
            self._take_back(e, pert.restore)
            raise
        return probes.loss()

    def _check_transient_uses(self) -> None:
        uses = self._transient.unperturbed_uses
        if not uses:
            self._transient.checked = True
            return
        names = self._transient_names
        where = [f"{names.get(pid) or self._param_label(pid)} (read by {func})" for pid, func in uses.items()]
        raise ValueError(
            f"{type(self).__name__}: perturbation='transient' perturbs a parameter only inside the forward of the "
            f"module that registers it, but the forwards read {len(where)} optimised parameter(s) outside it: "
            f"{', '.join(where[:5])}{', ...' if len(where) > 5 else ''}. Their share of the gradient estimate would "
            "silently be zero (e.g. nn.MultiheadAttention reads out_proj.weight in its own forward; a tied output "
            "layer F.linear(h, emb.weight); a regulariser in the closure). Nothing was changed (weights restored, "
            "no estimate recorded). Fix: use perturbation='inplace' (opt.detach()), freeze those parameters, or "
            "call the module that owns them (self.out_proj(h)) instead of reading its weight"
        )
