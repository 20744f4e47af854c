"""Resuming from a checkpoint that holds no optimizer state (``save_only_model=True``).

The Trainer then loads the model and ``trainer_state.json`` but silently leaves the optimizer and the lr
scheduler as freshly built: the optimizer's step counter would restart at 0, so step ``t`` of the
resumed run would reuse the perturbation seed of step ``t`` of the first run, and the lr schedule would
restart. :func:`step_from_trainer_state` instead sets the step counter to ``state.global_step`` (the seeds
are ``step_seed(base_seed, t)`` and the base seed comes from ``args.seed``, so they are the ones an
uninterrupted run uses) and advances the lr scheduler by as many steps. What is exact then:

* MeZO (no per-parameter state), with ``zo_dropout`` "off" or "shared" (no RNG state needed): the resumed
  run equals the uninterrupted one bit for bit (``tests/test_hf_resume_model_only.py``);
* optimizers with state (ZO-Adam's moments, HiZOO's / HiSo's / HELENE's preconditioners) restart that state
  from its initial values, and ``zo/skipped_steps`` restarts at 0: the run continues correctly seeded but
  differs from an uninterrupted one. A warning says so.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from typing import Any

import torch

from ...optim import ZOOptimizer

__all__ = ["step_from_trainer_state"]

logger = logging.getLogger(__name__)

_STATE = "trainer_state.json"
_SCHEDULER = "scheduler.pt"


def _has_optimizer_state(checkpoint: str) -> bool:
    # optimizer.pt / optimizer.bin, the per-rank files of sharded saves, SageMaker's optimizer.pt_*, and the
    # shards ZOTrainer writes with torch.distributed.checkpoint for a model sharded by fully_shard
    return bool(glob.glob(os.path.join(checkpoint, "*optimizer.pt*")) or glob.glob(os.path.join(checkpoint,
                "optimizer.bin")) or os.path.isdir(os.path.join(checkpoint, "zo_optimizer_dcp")))


def step_from_trainer_state(opt: ZOOptimizer, scheduler: Any, checkpoint: str) -> None:
    """After the Trainer's own load: a checkpoint without optimizer state gets its counters from the Trainer state."""
    if _has_optimizer_state(checkpoint) or not os.path.isfile(os.path.join(checkpoint, _STATE)):
        return
    from transformers import TrainerState

    global_step = int(TrainerState.load_from_json(os.path.join(checkpoint, _STATE)).global_step)
    sd = opt.state_dict()
    stateful = any(torch.is_tensor(v) for st in sd["state"].values() for v in st.values())
    if opt.step_count != global_step:
        sd["zo"]["step"] = global_step  # through the validated load: the counter is checked like any state dict
        opt.load_state_dict(sd)
    advanced = 0
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler steps only on sync
    if (inner is not None and not os.path.isfile(os.path.join(checkpoint, _SCHEDULER))
            and isinstance(inner, torch.optim.lr_scheduler.LRScheduler)
            and inner.last_epoch < global_step):
        with warnings.catch_warnings():
            # "lr_scheduler.step() before optimizer.step()": intended, the steps happened in the first run
            warnings.simplefilter("ignore", UserWarning)
            while inner.last_epoch < global_step:
                inner.step()
                advanced += 1
    logger.warning(
        "zo-optim: %s has no optimizer state (save_only_model=True?): the optimizer's step counter is set to the "
        "Trainer's global_step %d, so the resumed steps use the perturbation seeds of an uninterrupted run%s. %s",
        checkpoint, global_step,
        f", and the lr scheduler is advanced by {advanced} steps" if advanced else "",
        f"{type(opt).__name__}'s own state (moments / preconditioner) and zo/skipped_steps restart from their "
        "initial values: the run continues, but differs from an uninterrupted one (save the optimizer too to "
        "resume exactly)" if stateful else
        f"{type(opt).__name__} keeps no other state: the resumed run is the uninterrupted one (zo/skipped_steps "
        "restarts at 0)")
