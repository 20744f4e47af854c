"""Run by tests/test_hf_sharded.py under ``python -m torch.distributed.run --nproc_per_node 2`` (gloo, CPU).

The user-applied FSDP2 path of ZOTrainer: a tiny GPT-2 whose blocks and root are passed through
``fully_shard`` before the Trainer is built (accelerate 1.15 turns ``fsdp=`` into FSDP only on accelerators,
see docs/sharded.md), trained with per-rank batches. ``--replicated`` skips ``fully_shard`` (the data-parallel
run to compare with). Saves the gathered full weights and the projected gradients to ``<out>/rank<r>.pt``.
``--resume``: the Trainer's checkpoints of the sharded model (ZO-Adam, checkpoints every 2 of 4 steps), a fresh
sharded model resumed from checkpoint-2, and ``save_model`` read back by ``from_pretrained``; saves both runs'
final weights and optimizer state.

On 2 CUDA GPUs (``benchmarks/gpu_check.sh``): ``--gpu-check OUT`` runs the Trainer's own FSDP2 path
(``fsdp="full_shard"``, ``fsdp_config={"fsdp_version": 2, ...}``, nccl) and the replicated run under
torchrun and exits 1 unless they end bit-identical (both on the chunked backend, so that the check is about the
Trainer's path: z differs across backends by a few ulp; Triton's shard kernels are checked by ``zo-optim check``
and tests/test_ops_sharding.py on the GPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
from recording import RecordG, SequentialZOTrainer, leave_process_group

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
        try:  # the Trainer's best-model loader would write full tensors into the shards: refused, before any step
            SequentialZOTrainer(model=model, args=T.zo_args(out, save_strategy="steps", save_steps=1,
                                                            eval_strategy="steps", load_best_model_at_end=True),
                                train_dataset=T.causal_lm_rows(4, seed=3), eval_dataset=T.causal_lm_rows(2, seed=4))
            raise AssertionError("load_best_model_at_end was accepted on a sharded model")
        except ValueError as e:
            assert "load_best_model_at_end" in str(e), e
    rec = RecordG()
    trainer = SequentialZOTrainer(model=model, args=args, train_dataset=T.causal_lm_rows(24, seed=3), callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    full = {}
    for k, v in trainer.model.state_dict().items():
        full[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
    kinds = sorted({type(p).__name__ for p in trainer.zo_optimizer.param_groups[0]["params"]})
    return {"weights": full, "grads": torch.stack(rec.grads).cpu(), "kinds": kinds}


def _sharded_gpt2():
    from torch.distributed.fsdp import fully_shard

    model = T.tiny_gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model, reshard_after_forward=True)
    return model


def _final(trainer) -> dict:
    def full(v):
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()

    opt = trainer.zo_optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    state = {f"{names[id(p)]}.{k}": full(v) for p, st in opt.state.items() for k, v in st.items()}
    return {"weights": {k: full(v) for k, v in trainer.model.state_dict().items()}, "state": state,
            "step": opt.step_count, "lr": opt.param_groups[0]["lr"]}


def resume_check(out: str) -> dict:
    """4 steps with checkpoints at 2 and 4, then a fresh sharded model resumed from checkpoint-2 for 2 steps."""
    args = dict(per_device_train_batch_size=2, max_steps=4, zo_eps=1e-2, ddp_backend="gloo", zo_optimizer="zoadam",
                zo_optimizer_kwargs={"backend": "chunked"}, save_strategy="steps", save_steps=2,
                lr_scheduler_type="linear")
    data = T.causal_lm_rows(24, seed=3)
    first = SequentialZOTrainer(model=_sharded_gpt2(), args=T.zo_args(os.path.join(out, "a"), **args),
                                train_dataset=data)
    first.train()
    whole = _final(first)
    first.save_model(os.path.join(out, "final"))  # gathered: a plain HF model
    ckpt = os.path.join(out, "a", "checkpoint-2")
    files = sorted(os.listdir(ckpt))
    resumed = SequentialZOTrainer(model=_sharded_gpt2(), args=T.zo_args(os.path.join(out, "b"), **args),
                                  train_dataset=data)
    resumed.train(resume_from_checkpoint=ckpt)
    torch.distributed.barrier()
    from transformers import GPT2LMHeadModel

    loaded = GPT2LMHeadModel.from_pretrained(os.path.join(out, "final")).state_dict()
    return {"whole": whole, "resumed": _final(resumed), "files": files,
            "pretrained": {k: v.clone() for k, v in loaded.items()}}


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
    p.add_argument("--resume", action="store_true", help="checkpoints and resume of the sharded model")
    a = p.parse_args()
    if a.gpu_check:
        sys.exit(gpu_check(a.out))
    if a.resume:
        result = resume_check(a.out)
        torch.save(result, os.path.join(a.out, f"rank{int(os.environ.get('RANK', 0))}.pt"))
        leave_process_group()
        sys.exit(0)
    result = run(a.out, sharded=not (a.replicated or a.trainer_fsdp), gpu=a.gpu or a.trainer_fsdp,
                 trainer_fsdp=a.trainer_fsdp)
    torch.save(result, os.path.join(a.out, f"rank{int(os.environ.get('RANK', 0))}.pt"))
    leave_process_group()
