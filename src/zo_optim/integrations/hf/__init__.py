"""``transformers.Trainer`` integration: forward-only fine-tuning with a zo-optim optimizer.

The two-line swap for an existing Trainer script::

    from zo_optim.integrations.hf import ZOTrainer, ZOTrainingArguments   # was: Trainer, TrainingArguments
    args = ZOTrainingArguments(..., zo_optimizer="mezo", zo_eps=1e-3)     # the Trainer's own fields still apply

Public API:

* :class:`ZOTrainerMixin` — overrides ``training_step`` (the forwards of one ZO estimate per
  micro-batch, no backward), ``create_optimizer`` (the Trainer's decay split, ``args.learning_rate``,
  ``args.weight_decay``, a seed derived from ``args.seed``) and the gradient-norm logging
  (no fake ``grad_norm``; ``zo/projected_grad`` and ``zo/projected_grad_abs`` averaged over the logging
  window, ``zo/skipped_steps``, ``zo/step`` instead), and first-run guidance (``_guidance``: the ZO lr when
  ``learning_rate`` was left at its AdamW default, the loss-window warning, θ before every callback event);
* :class:`ZOTrainer` = ``ZOTrainerMixin`` + ``transformers.Trainer``;
* :class:`ZOArgumentsMixin` (the ``zo_*`` fields) and :class:`ZOTrainingArguments`;
* ``zo_optim.integrations.hf.trl`` — ``ZOSFTTrainer`` / ``ZOSFTConfig`` on TRL's ``SFTTrainer``
  (imported on its own, so this module never needs trl).

See docs/integrations.md for loss weighting, dropout, PEFT, TRL and torchrun.
"""

from ._args import LOSS_WEIGHTINGS, OPTIMIZERS, ZO_DROPOUT, ZOArgumentsMixin, ZOTrainingArguments, resolve_optimizer
from ._trainer import ZOTrainer, ZOTrainerMixin, label_count, unwrap_zo_optimizer

__all__ = [
    "LOSS_WEIGHTINGS",
    "OPTIMIZERS",
    "ZO_DROPOUT",
    "ZOArgumentsMixin",
    "ZOTrainer",
    "ZOTrainerMixin",
    "ZOTrainingArguments",
    "label_count",
    "resolve_optimizer",
    "unwrap_zo_optimizer",
]
