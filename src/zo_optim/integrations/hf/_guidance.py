"""What ``ZOTrainer`` keeps an eye on for the user: θ at every callback, the logged ĝ, the loss trend, first-run hints.

* :class:`ZOCallback` — the trainer's own callback, first in the list. Before any event that another
  callback implements it brings deferred-restore weights back to θ (so ``on_substep_end`` /
  ``on_pre_optimizer_step`` callbacks read θ, never θ ± ε·u: one extra weight pass in the steps where
  such a callback exists, none otherwise); after each optimizer step it adds the step's projected
  gradients to the logging window's sums (``zo/projected_grad`` is then the window's mean, like
  ``loss``, and ``zo/projected_grad_abs`` its mean |g|).
* :class:`LossWatch` — a warning when the logged training loss has not improved over a window of
  steps (``zo_loss_window``), or is rising.
* :func:`zo_default_lr` — the registry's recommended learning rate when ``learning_rate`` was left at
  the arguments class's AdamW default (5e-5; TRL's SFTConfig 2e-5), 6-200x too small for a zeroth-order
  step.
* :func:`first_run_hints` — warnings for settings that cost without helping (bf16 weights perturbed in
  place).
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import fields
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from ...optim import ZOOptimizer
from ...optim.registry import recommended_lr

__all__ = ["ADAMW_DEFAULT_LR", "LossWatch", "ZOCallback", "first_run_hints", "zo_default_lr"]

logger = logging.getLogger(__name__)

#: TrainingArguments' default learning rate (tuned for AdamW): left as is, it stands for "not chosen"
ADAMW_DEFAULT_LR = next(f.default for f in fields(TrainingArguments) if f.name == "learning_rate")


def _default_lr_of(args: Any) -> Any:
    """The ``learning_rate`` default of the arguments' own class (TRL's SFTConfig: 2e-5), else TrainingArguments'."""
    try:
        return next(f.default for f in fields(type(args)) if f.name == "learning_rate")
    except (TypeError, StopIteration):
        return ADAMW_DEFAULT_LR

_EVENTS = tuple(name for name in vars(TrainerCallback) if name.startswith("on_"))


def _implements(callback: Any, event: str) -> bool:
    """Whether ``callback`` runs code of its own at ``event`` (the base class's methods do nothing)."""
    return getattr(type(callback), event, None) is not getattr(TrainerCallback, event)


class ZOCallback(TrainerCallback):
    """ZOTrainer's own callback (inserted first): θ before other callbacks' events; ĝ sums per logging window."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)  # the trainer holds the callback: no cycle through a strong ref
        self.restores = 0  # restores done for a callback (tests and the docs' pass count read it)
        self.reset_window()

    def reset_window(self) -> None:
        self.g_sum = 0.0
        self.g_abs_sum = 0.0
        self.g_steps = 0

    def _before(self, event: str) -> None:
        trainer = self._trainer()
        if trainer is None:
            return
        others = [cb for cb in trainer.callback_handler.callbacks if cb is not self]
        if any(_implements(cb, event) for cb in others) and trainer._zo_restore_weights():
            self.restores += 1

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before("on_optimizer_step")
        trainer = self._trainer()
        opt = trainer._zo_optimizer_or_none() if trainer is not None else None
        if opt is not None and opt.last_projected_grads is not None:
            g = opt.last_projected_grads.detach().float()
            self.g_sum += float(g.mean())
            self.g_abs_sum += float(g.abs().mean())
            self.g_steps += 1


def _make_event(event: str) -> Any:
    def handler(self: ZOCallback, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before(event)

    handler.__name__ = event
    return handler


for _event in _EVENTS:
    if _event not in vars(ZOCallback):
        setattr(ZOCallback, _event, _make_event(_event))


class LossWatch:
    """Warns when the logged training loss has not improved over ``window`` steps, or rises.

    At every training log at step ``s >= window``: ``recent`` is the mean of the losses logged in
    ``(s - window/2, s]``, ``earlier`` the mean of those in ``(s - window, s - window/2]``. When
    ``recent >= earlier`` a warning names both (``rising`` when ``recent`` exceeds ``earlier`` by more than
    5%), at most once per ``window`` steps. ZO losses are noisy step to step; halves of a window average that
    out while a too-small learning rate (the AdamW default) or a diverging one still shows. It needs a log
    in each half-window (``logging_steps <= window / 2``); with sparser logs it stays silent.
    """

    def __init__(self, window: int) -> None:
        self.window = int(window)
        self.history: list[tuple[int, float]] = []
        self._last_warned = -(10**18)

    def add(self, step: int, loss: float) -> str | None:
        """Record one logged loss; returns the warning text (also logged) or None."""
        if self.window <= 0 or not math.isfinite(loss):
            return None
        self.history.append((step, loss))
        if step < self.window or step - self._last_warned < self.window:
            return None
        half = step - self.window / 2
        self.history = [(s, v) for s, v in self.history if s > step - self.window]
        earlier = [v for s, v in self.history if s <= half]
        recent = [v for s, v in self.history if s > half]
        if not earlier or not recent:
            return None
        e, r = sum(earlier) / len(earlier), sum(recent) / len(recent)
        if r < e:
            return None
        self._last_warned = step
        trend = "is rising" if r > 1.05 * e else "has not improved"
        msg = (f"zo-optim: the training loss {trend} over the last {self.window} steps (mean {e:.4g} -> {r:.4g} at "
               f"step {step}). A zeroth-order run needs a larger learning rate and more steps than AdamW (see the "
               "table in docs/integrations.md); a rising loss means the learning rate is too large. Set "
               "zo_loss_window=0 to silence this check")
        logger.warning(msg)
        return msg


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` (or the base model under a PEFT wrapper) is one of transformers' causal-LM classes: the
    classifier learning rates diverge there (``zo-optim bench finetune-clm``, docs/integrations.md)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def zo_default_lr(args: Any, optimizer: str | type[ZOOptimizer], model: Any) -> float | None:
    """The recommended lr when ``args.learning_rate`` is its class's (AdamW) default (None: the user's value stands).

    LoRA/PEFT models get the registry's ``finetune/lora`` value, others ``finetune/full``; causal LMs (transformers'
    ``*ForCausalLM`` / ``*LMHeadModel`` classes) the ``finetune-clm/`` ones instead. The log says which.
    """
    default = _default_lr_of(args)
    if getattr(args, "learning_rate", None) != default or not getattr(args, "zo_default_lr", True):
        return None
    task = "finetune-clm" if is_causal_lm(model) else "finetune"
    use = f"{task}/lora" if hasattr(model, "peft_config") else f"{task}/full"
    lr = recommended_lr(optimizer, use)
    name = getattr(optimizer, "__name__", optimizer)
    logger.warning(
        "zo-optim: learning_rate was left at %g, the AdamW default, which barely moves a zeroth-order run; using "
        "%s's recommended %g for %s (zo_optim.optim.registry, measured: docs/integrations.md). Set learning_rate "
        "to any other value to choose it yourself (zo_default_lr=False keeps %g)",
        default, name, lr, use, default)
    return lr


def first_run_hints(opt: ZOOptimizer) -> None:
    """Warnings for settings that work but cost without helping."""
    low = {p.dtype for g in opt.param_groups for p in g["params"] if p.requires_grad} & {torch.bfloat16,
                                                                                          torch.float16}
    if low and opt.perturbation == "inplace":
        logger.warning(
            "zo-optim: the trainable weights are %s and are perturbed in place: every probe rounds θ ± ε·u to %s, so "
            "the restore does not give θ back exactly and the estimate is noisier. zo_perturbation='transient' "
            "keeps the stored weights untouched (docs/integrations.md)",
            "/".join(sorted(str(d).removeprefix("torch.") for d in low)),
            "/".join(sorted(str(d).removeprefix("torch.") for d in low)))
