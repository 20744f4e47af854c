"""What the torchrun scripts (ddp_train.py, fsdp_train.py) share: a ZOTrainer that feeds batches in dataset
order, a callback that records every step's projected gradients, and the clean exit of a rank."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from zo_optim.integrations.hf import ZOTrainer


class SequentialZOTrainer(ZOTrainer):
    """Batches in dataset order, so one process with batch 4 sees what two ranks with batch 2 see together."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class RecordG(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.grads = []

    def on_optimizer_step(self, args, state, control, **kw):
        self.grads.append(self.trainer.zo_optimizer.last_projected_grads.clone())


def leave_process_group() -> None:
    """Destroy the process group before the interpreter exits. Without it gloo's worker threads are torn down
    during finalization and a rank can die of SIGABRT ("terminate called without an active exception") after its
    work is done; fresh-clone CI saw that once in the replicated run of test_hf_sharded.py."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
