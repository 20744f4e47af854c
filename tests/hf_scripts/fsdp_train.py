"""Run by tests/test_hf_sharded.py under ``python -m torch.distributed.run --nproc_per_node 2`` (gloo, CPU).

The user-applied FSDP2 path of ZOTrainer: a tiny GPT-2 whose blocks and root are passed through
``fully_shard`` before the Trainer is built (accelerate 1.15 turns ``fsdp=`` into FSDP only on accelerators,
see docs/sharded.md), trained with per-rank batches. ``--replicated`` skips ``fully_shard`` (the data-parallel
run to compare with). Saves the gathered full weights and the projected gradients to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
from transformers import TrainerCallback

import hf_tiny as T
from zo_optim.integrations.hf import ZOTrainer


class SequentialZOTrainer(ZOTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class RecordG(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.grads = []

    def on_optimizer_step(self, args, state, control, **kw):
        self.grads.append(self.trainer.zo_optimizer.last_projected_grads.clone())


def run(out: str, sharded: bool, steps: int = 3) -> dict:
    args = T.zo_args(out, per_device_train_batch_size=2, max_steps=steps, zo_eps=1e-2,
                     zo_optimizer_kwargs={"backend": "chunked"}, ddp_backend="gloo")
    model = T.tiny_gpt2()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        # the root must reshard after forward: ZO forwards have no backward to do it (docs/sharded.md)
        fully_shard(model, reshard_after_forward=True)
        try:  # the Trainer's own checkpoints would hold rank 0's shards only: refused, before any step
            SequentialZOTrainer(model=model, args=T.zo_args(out, save_strategy="steps", save_steps=1),
                                train_dataset=T.causal_lm_rows(4, seed=3))
            raise AssertionError("save_strategy='steps' was accepted on a sharded model")
        except ValueError as e:
            assert "torch.distributed.checkpoint" in str(e), e
    rec = RecordG()
    trainer = SequentialZOTrainer(model=model, args=args, train_dataset=T.causal_lm_rows(24, seed=3), callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    full = {}
    for k, v in trainer.model.state_dict().items():
        full[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    kinds = sorted({type(p).__name__ for p in trainer.zo_optimizer.param_groups[0]["params"]})
    return {"weights": full, "grads": torch.stack(rec.grads), "kinds": kinds}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--replicated", action="store_true")
    a = p.parse_args()
    result = run(a.out, sharded=not a.replicated)
    torch.save(result, os.path.join(a.out, f"rank{int(os.environ.get('RANK', 0))}.pt"))
