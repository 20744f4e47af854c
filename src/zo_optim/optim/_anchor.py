r"""``anchor_decay``: a decoupled pull of the weights toward their starting point (L2-SP), for every optimizer.

After the algorithm's own update of a parameter in a step,

.. math::
    \theta \leftarrow \theta + a\,(\theta_a - \theta), \qquad a = \gamma\,\lambda_a

with γ the group's ``lr``, λ_a its ``anchor_decay`` and θ_a the parameter as it was when the optimizer was
constructed (or its group added): ``p.lerp_(anchor, a)``, in place. It is L2-SP's penalty
λ_a/2·‖θ − θ_a‖² (Li, Grandvalet, Davoine 2018, "Explicit Inductive Bias for Transfer Learning with
Convolutional Networks", ICML, arXiv 1802.01483) applied decoupled, as AdamW applies weight decay
(Loshchilov & Hutter 2019): the step of the penalty is taken apart from the algorithm's preconditioner.

Why: a zeroth-order step moves θ along every direction z, also the many the loss barely sees, so θ
random-walks there and its variance grows with t (MeZO: by γ²‖ĝ‖² per step), raising the curvature the
walk meets and capping the stable lr. With the pull the walk is an AR(1) process whose per-coordinate
variance stays bounded, ≈ γ‖g_B‖²/(2λ_a) for MeZO, instead of growing with t.

Protocol (``_passes.UpdatePasses._update_pass``): a unit is decayed right after its fused update, in the same
iteration, so a unit that the progress (``applied``) counts as done is updated *and* decayed, and one that
failed is restored and neither; ``step()`` finishing a part-way update decays only the remaining units.
``apply_update`` runs the same pass, so replicas replaying (seed, scalars) stay bit-identical. A skipped
(non-finite) step does not decay. Everything the decay reads is checked before the first write: the group's
value (0 ≤ lr·anchor_decay < 1, else ``ValueError``) and each anchor (present, the parameter's shape, dtype
and device). The anchor is per-parameter state (``state[p]["anchor"]``, the parameter's dtype): saved by
``state_dict()``, required by ``load_state_dict()`` for a group with ``anchor_decay > 0``.

Cost: one more elementwise pass over the updated weights per step (a read of θ_a, a read and write of θ) and
one copy of the group's parameters in their own dtype (e.g. +2 bytes/param for bf16 weights, +4 for fp32).
Rounding: ``lerp_`` rounds to nearest in the parameter's dtype, so in bf16/fp16 a pull smaller than half an
ulp of θ is lost (the update pass's stochastic rounding does not cover it).

A private mixin of :class:`~.base.ZOOptimizer`: it reads the optimizer's groups and state.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..ops import _checks as ops_checks
from ..ops import chunked

__all__ = ["ANCHOR", "AnchorDecay"]

#: the state key of a parameter's anchor θ_a
ANCHOR = "anchor"


def _decay(group: dict[str, Any]) -> float:
    return group.get("anchor_decay", 0.0)


class AnchorDecay:
    """``anchor_decay``: the anchors, their checks and the decay of one unit (mixed into ``ZOOptimizer``)."""

    param_groups: list[dict[str, Any]]
    state: Any

    def _check_anchor_decay(self, group: dict[str, Any]) -> None:
        """The group's value (called by ``_check_group``: at construction, load and before every step)."""
        lam = _decay(group)
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0.0:
            raise ValueError(f"Invalid anchor_decay: {lam!r} (a finite number >= 0; 0 turns the pull off)")
        lr = float(group["lr"])  # (a Tensor lr is checked by _check_group before this)
        if not lr * lam < 1.0:
            raise ValueError(
                f"Invalid anchor_decay: {lam!r} with lr {lr!r}: the pull's factor lr·anchor_decay = {lr * lam:g} must "
                "be < 1 (at 1 a step puts the weights back on their anchor, beyond it overshoots it); lower "
                "anchor_decay or the lr. Nothing was changed"
            )

    def _take_anchors(self, group: dict[str, Any]) -> None:
        """θ_a ← a copy of every parameter of a group with ``anchor_decay > 0`` (all or none of them)."""
        if _decay(group) == 0.0:
            return
        with torch.no_grad():
            anchors = {p: p.detach().clone() for p in group["params"]}
        for p, a in anchors.items():
            self.state[p][ANCHOR] = a

    def _check_anchors(self, group: dict[str, Any], ps: list[torch.Tensor], ids: list[int]) -> None:
        """Before the first write: every parameter of a decayed chunk has an anchor like itself."""
        if _decay(group) == 0.0:
            return
        for p, tid in zip(ps, ids, strict=True):
            a = self.state[p].get(ANCHOR)
            if isinstance(a, torch.Tensor) and a.shape == p.shape and a.dtype == p.dtype and a.device == p.device:
                continue
            got = "none" if a is None else (ops_checks.describe(a) if isinstance(a, torch.Tensor) else repr(a))
            raise ValueError(
                f"{type(self).__name__}: trainable parameter {tid} ({ops_checks.describe(p)}) is in a group with "
                f"anchor_decay={_decay(group)!r} but its anchor state[p][{ANCHOR!r}] is {got}: it needs a copy of "
                "the weights to pull toward, of the parameter's shape, dtype and device (taken when the group is "
                "constructed with anchor_decay > 0). Nothing was changed. Construct the optimizer (or add the group) "
                f"with anchor_decay > 0, or set opt.state[p][{ANCHOR!r}] = p.detach().clone()"
            )

    def _check_anchors_loaded(self, state_dict: Any, groups: list[dict[str, Any]],
                              state: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """On load (``_checkpoint``), before anything changes: a group with ``anchor_decay > 0`` needs every
        parameter's anchor in the loaded state."""
        for g, (sg, group) in enumerate(zip(state_dict["param_groups"], groups, strict=True)):
            if _decay(group) == 0.0:
                continue
            lacking = [j for j, p in zip(sg["params"], group["params"], strict=True) if ANCHOR not in state.get(p, {})]
            if lacking:
                raise ValueError(
                    f"Invalid state dict: param_groups[{g}] has anchor_decay={group['anchor_decay']!r} but the state "
                    f"of its parameters {lacking} lacks {ANCHOR!r}, the weights the decay pulls toward (saved by "
                    f"state_dict() with the other buffers). Nothing was changed. Load a state dict saved with its "
                    f"anchors, or set param_groups[{g}]['anchor_decay'] = 0.0 in it to load it without the pull"
                )

    def _decay_unit(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """θ ← θ + a(θ_a − θ) on one unit just updated (a = lr·anchor_decay; checked before the pass)."""
        a = float(group["lr"]) * _decay(group)
        if a == 0.0:
            return
        try:
            for p in params:
                p.lerp_(self.state[p][ANCHOR], a)  # in place, no allocation
        except BaseException as e:
            # the unit is updated (its state moved too) and maybe part-decayed: neither can be taken back, so
            # its weights are unknown, as after an op that could not repair its own partial write (refusal)
            raise chunked.PartialWriteError(f"the anchor decay of an updated unit failed: {e!r}") from e
