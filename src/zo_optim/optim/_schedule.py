r"""``lr_decay_steps``: the lr decayed linearly to 0 over T steps, read from the step counter.

The update of step t (the optimizer's ``step_count`` when it is applied, skipped steps included, so the
t of the step's seed) uses

.. math::
    \gamma_t = \gamma \cdot \max\!\left(0,\; 1 - \frac{t}{T}\right)

with γ the group's ``lr`` and T its ``lr_decay_steps`` (0, the default: γ_t = γ, a constant lr). Every
use of the lr in the update reads γ_t: the algorithm's step and the ``anchor_decay`` pull (whose factor
is lr·λ_a, as AdamW's decoupled weight decay follows the scheduled lr). From step T on γ_t = 0: the
weights stay where they are while the step counter and the algorithm's statistics (moments, Hessian
EMAs) still advance.

It is the schedule of transformers' ``get_linear_schedule_with_warmup`` without warm-up (the
``Trainer``'s default, ``lr_scheduler_type="linear"``), and equal, bit for bit, to
``torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / T))`` stepped once per step (the
same float products). Why an option as well: a torch scheduler writes ``group["lr"]`` from outside the
optimizer, so a federated replica that replays past rounds with ``apply_update``, or a node that joins
late, would apply every round with the lr of *now*; here γ_t is a function of the step being applied,
so replay, catch-up and resume are exact, and the federated handshake pins T with the other
hyper-parameters (a replica with another T is another run).

Why linear decay: on the encoder fine-tune of ``zo-optim bench convergence``, MeZO with γ decayed to 0
over a 500-forward budget ends above constant-lr MeZO tuned for 1000 forwards (docs/convergence.md,
"An lr that decays"): a decaying γ lets the run start at a step size that a constant lr cannot keep
(the zeroth-order noise floor of a constant γ is ∝ γ), the usual argument for annealing SGD (Robbins &
Monro 1951; for fine-tuning, the linear schedule of Devlin et al. 2019, BERT).

A private helper of :class:`~.base.ZOOptimizer`: ``_passes`` reads each group through :func:`scheduled`.
"""

from __future__ import annotations

from typing import Any

from ._validation import is_int

__all__ = ["check_lr_decay_steps", "scheduled"]


def _steps(group: dict[str, Any]) -> int:
    return group.get("lr_decay_steps", 0)


def check_lr_decay_steps(group: dict[str, Any]) -> None:
    """The group's value: an int >= 0 (called by ``_check_group``: at construction, load and before every step)."""
    steps = _steps(group)
    if not is_int(steps) or steps < 0:
        raise ValueError(
            f"Invalid lr_decay_steps: {steps!r} (an int >= 0: the steps over which the lr decays linearly to 0; "
            "0 keeps it constant)"
        )


def scheduled(group: dict[str, Any], t: int) -> dict[str, Any]:
    """``group`` as the update of step ``t`` reads it: itself when its lr is constant, else a copy with lr = γ_t."""
    steps = _steps(group)
    if steps == 0:
        return group
    return {**group, "lr": float(group["lr"]) * max(0.0, 1.0 - t / steps)}
