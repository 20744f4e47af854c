"""Run by tests/test_hf_exactness.py under ``python -m torch.distributed.run --nproc_per_node 2`` (gloo, CPU).

Trains a tiny GPT-2 with ZOTrainer (per-device batch 2, token weighting) and saves, per rank, the final
weights and the projected gradient of every step to ``<out>/rank<r>.pt``. Also runnable without torchrun
(one process, ``--batch 4``): the same global batches.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
from recording import RecordG, SequentialZOTrainer, leave_process_group

import hf_tiny as T


def run(out: str, batch: int, steps: int = 3) -> dict:
    rec = RecordG()
    args = T.zo_args(out, per_device_train_batch_size=batch, max_steps=steps, zo_loss_weighting="tokens",
                     zo_eps=1e-2, zo_optimizer_kwargs={"backend": "reference"},
                     ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None)
    trainer = SequentialZOTrainer(model=T.tiny_gpt2(), args=args, train_dataset=T.causal_lm_rows(24, seed=3),
                                  callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    return {"weights": T.weights(trainer.model), "grads": torch.stack(rec.grads), "world": args.world_size}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args()
    result = run(a.out, a.batch)
    torch.save(result, os.path.join(a.out, f"rank{int(os.environ.get('RANK', 0))}.pt"))
    leave_process_group()
