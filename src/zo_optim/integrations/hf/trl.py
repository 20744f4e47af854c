"""TRL: ``ZOSFTTrainer(ZOTrainerMixin, SFTTrainer)`` and ``ZOSFTConfig(ZOArgumentsMixin, SFTConfig)``.

Imported on its own (``from zo_optim.integrations.hf.trl import ZOSFTTrainer``) so that
``zo_optim.integrations.hf`` never needs trl.

TRL's ``SFTTrainer.compute_loss`` files its metrics (``entropy``, ``mean_token_accuracy``,
``num_tokens``) under ``"train"`` or ``"eval"`` by ``self.model.training``, and counts the
micro-batch's tokens on every call. Under ZO each micro-batch runs 2q (or q + 1) forwards, with
dropout "off" in eval mode, so :class:`ZOSFTTrainer`:

* runs those probes with the root model's ``training`` flag set (its sub-modules stay in eval mode:
  no dropout), so the probe metrics stay under the train keys;
* counts each micro-batch's tokens once (on its first forward);
* leaves ``entropy`` / ``mean_token_accuracy`` as TRL computes them: averaged over the probes,
  i.e. measured at the perturbed weights θ ± εz (they differ from the metrics at θ by O(ε²) for the
  central estimator). Evaluation metrics are measured at θ, as usual.

The same pattern works for TRL's other trainers built on ``transformers.Trainer``:
``class ZODPOTrainer(ZOTrainerMixin, DPOTrainer)`` (check how that trainer files its metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl import SFTConfig, SFTTrainer

from ._args import ZOArgumentsMixin
from ._trainer import ZOTrainerMixin

__all__ = ["ZOSFTConfig", "ZOSFTTrainer"]


@dataclass
class ZOSFTConfig(ZOArgumentsMixin, SFTConfig):
    """TRL's ``SFTConfig`` plus the ``zo_*`` fields (see :class:`~zo_optim.integrations.hf.ZOArgumentsMixin`)."""


class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with a zeroth-order optimizer: forward passes only."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        if not self._zo_probing:  # evaluation, or a caller outside training_step
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        root = self.model
        flag, tokens = root.training, self._total_train_tokens
        root.training = True  # only the root's flag: TRL reads it to pick "train"; the layers keep their mode
        try:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        finally:
            root.training = flag
        if self._zo_probe_index > 0:  # the same micro-batch again: its tokens were counted by the first forward
            self._total_train_tokens = tokens
            self._metrics["train"]["num_tokens"] = [tokens]
        return out
