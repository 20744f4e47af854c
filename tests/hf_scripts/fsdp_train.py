"""Run by tests/test_hf_sharded.py under ``python -m torch.distributed.run --nproc_per_node 2`` (gloo, CPU).

The user-applied FSDP2 path of ZOTrainer: a tiny GPT-2 whose blocks and root are passed through
``fully_shard`` before the Trainer is built (accelerate 1.15 turns ``fsdp=`` into FSDP only on accelerators,
see docs/sharded.md), trained with per-rank batches. ``--replicated`` skips ``fully_shard`` (the data-parallel
run to compare with). Saves the gathered full weights and the projected gradients to ``<out>/rank<r>.pt``.

On 2 CUDA GPUs (``benchmarks/gpu_check.sh``): ``--gpu-check OUT`` runs the Trainer's own FSDP2 path
(``fsdp="full_shard"``, ``fsdp_config={"fsdp_version": 2, ...}``, nccl) and the replicated run under
torchrun and exits 1 unless they end bit-identical (both on the chunked backend: Triton does not take
shards yet, and z differs across backends by a few ulp).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
from recording import RecordG, SequentialZOTrainer

import hf_tiny as T


def run(out: str, sharded: bool, steps: int = 3, gpu: bool = False, trainer_fsdp: bool = False) -> dict:
    extra = dict(use_cpu=False, ddp_backend=None) if gpu else dict(ddp_backend="gloo")
    if trainer_fsdp:  # the Trainer's own FSDP2 path (accelerate shards the model in prepare); accelerators only
        extra.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                     "transformer_layer_cls_to_wrap": ["GPT2Block"]})
    args = T.zo_args(out, per_device_train_batch_size=2, max_steps=steps, zo_eps=1e-2,
                     zo_optimizer_kwargs={"backend": "chunked"}, **extra)
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
        full[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
    kinds = sorted({type(p).__name__ for p in trainer.zo_optimizer.param_groups[0]["params"]})
    return {"weights": full, "grads": torch.stack(rec.grads).cpu(), "kinds": kinds}


def gpu_check(out: str) -> int:
    """The Trainer's FSDP2 path vs the replicated run on 2 GPUs: 0 when bit-identical."""
    runs = {"fsdp": ["--trainer-fsdp"], "ddp": ["--replicated", "--gpu"]}
    for name, flags in runs.items():
        os.makedirs(os.path.join(out, name), exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.abspath(__file__),
               os.path.join(out, name), *flags]
        if subprocess.run(cmd).returncode != 0:
            print(f"fsdp2 trainer check: the {name} run failed")
            return 1
    a, b = (torch.load(os.path.join(out, n, "rank0.pt"), weights_only=True) for n in runs)
    same = a["weights"].keys() == b["weights"].keys() and all(
        torch.equal(a["weights"][k], v) for k, v in b["weights"].items())
    print(f"fsdp2 trainer check: optimizer params {a['kinds']} vs {b['kinds']}; weights bit-identical: {same}; "
          f"projected grads equal: {torch.equal(a['grads'], b['grads'])}")
    return 0 if same and a["kinds"] == ["DTensor"] else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--replicated", action="store_true")
    p.add_argument("--gpu", action="store_true", help="CUDA + nccl instead of CPU + gloo")
    p.add_argument("--trainer-fsdp", action="store_true", help="the Trainer's fsdp= path (implies --gpu)")
    p.add_argument("--gpu-check", action="store_true", help="run --trainer-fsdp and --replicated --gpu, compare")
    a = p.parse_args()
    if a.gpu_check:
        sys.exit(gpu_check(a.out))
    result = run(a.out, sharded=not (a.replicated or a.trainer_fsdp), gpu=a.gpu or a.trainer_fsdp,
                 trainer_fsdp=a.trainer_fsdp)
    torch.save(result, os.path.join(a.out, f"rank{int(os.environ.get('RANK', 0))}.pt"))
