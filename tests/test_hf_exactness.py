"""Exactness through a real transformers.Trainer (issue 11 item 3), tiny random-init models, CPU, offline.

* gradient accumulation with zo_loss_weighting="tokens" equals one big batch (causal LM, uneven label counts);
* checkpoint + resume_from_checkpoint in a fresh process is bit-identical, for all five optimizers;
* evaluation during training leaves the weights bit-identical;
* lr schedulers reach the optimizer (the run replays from (seed, g, lr) with apply_update);
* torchrun with 2 gloo ranks: bit-identical across ranks, matching one process over the same global batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch
from transformers import TrainerCallback

import hf_resume_common as C
import hf_tiny as T
from gloo import free_port
from hf_tiny import REF
from zo_optim.integrations.hf import ZOTrainer
from zo_optim.optim.registry import OPTIMIZERS as REGISTRY

TESTS = Path(__file__).resolve().parent
ALL = tuple(REGISTRY)  # the names ZOTrainingArguments takes


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _first_g(tmp_path, batch: int, ga: int, weighting: str) -> torch.Tensor:
    data = T.causal_lm_rows(8, seq=12, seed=1, min_len=2)
    args = T.zo_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=1,
                     zo_loss_weighting=weighting, zo_eps=1e-2, zo_optimizer_kwargs=REF)
    trainer = ZOTrainer(model=T.tiny_gpt2(), args=args, train_dataset=data)
    trainer.train()
    return trainer.zo_optimizer.last_projected_grads


def test_gradient_accumulation_with_token_weighting_equals_one_big_batch(tmp_path):
    big = _first_g(tmp_path / "big", batch=4, ga=1, weighting="tokens")
    tokens = _first_g(tmp_path / "ga", batch=2, ga=2, weighting="tokens")
    mean = _first_g(tmp_path / "mean", batch=2, ga=2, weighting="mean")
    # float32 rounding of the two losses (~4.2, a mean over ~25 tokens), divided by 2ε
    tol = 64 * torch.finfo(torch.float32).eps * 4.2 / (2 * 1e-2)
    assert abs(float(tokens - big)) <= tol, (float(tokens), float(big))
    # the mean of micro-batch means is a different (biased) estimate: far outside that tolerance
    assert abs(float(mean - big)) > 20 * tol, (float(mean), float(big))


class _Record(TrainerCallback):
    def __init__(self):
        self.trainer, self.rows = None, []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        opt = self.trainer.zo_optimizer
        self.rows.append([opt.current_seed, [g["lr"] for g in opt.param_groups]])

    def on_optimizer_step(self, args, state, control, **kw):
        self.rows[-1].append(self.trainer.zo_optimizer.last_projected_grads.clone())


@pytest.mark.parametrize("name", ["mezo", "zoadam"])
def test_lr_scheduler_reaches_the_optimizer(tmp_path, name):
    rec = _Record()
    args = T.zo_args(tmp_path, max_steps=4, lr_scheduler_type="cosine", warmup_steps=1, learning_rate=1e-2,
                     zo_optimizer=name, zo_optimizer_kwargs=REF, zo_perturbation="transient")
    # transient: the stored weights are never perturbed, so apply_update replays the run bit for bit
    trainer = ZOTrainer(model=T.tiny_gpt2(), args=args, train_dataset=T.causal_lm_rows(16), callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    lrs = [row[1][0] for row in rec.rows]
    assert len(set(lrs)) == 4 and lrs[1] == pytest.approx(1e-2)  # warm-up, then cosine decay
    # replay (seed, g) with those lrs on a fresh copy: bit-identical weights, so the schedule was what moved them
    replica = T.tiny_gpt2()
    opt = ZOTrainer(model=replica, args=args).create_optimizer()
    for seed, group_lrs, g in rec.rows:
        for group, lr in zip(opt.param_groups, group_lrs, strict=True):
            group["lr"] = lr
        opt.apply_update(seed, g)
    for k, v in T.weights(trainer.model).items():
        assert torch.equal(v, replica.state_dict()[k]), k
    # the same (seed, g) at a constant lr give other weights: the test can tell
    flat = T.tiny_gpt2()
    opt = ZOTrainer(model=flat, args=args).create_optimizer()
    for seed, _, g in rec.rows:
        opt.apply_update(seed, g)
    assert not torch.equal(flat.transformer.wte.weight, replica.transformer.wte.weight)


@pytest.mark.parametrize("dropout", ["off", "shared"])
def test_evaluation_during_training_leaves_weights_bit_identical(tmp_path, dropout):
    data, held_out = T.classification_rows(16, seed=2), T.classification_rows(8, seed=9)
    finals = []
    for strategy in ("no", "steps"):
        args = T.zo_args(tmp_path / strategy, max_steps=4, eval_strategy=strategy, eval_steps=1, zo_dropout=dropout,
                         per_device_eval_batch_size=4, zo_optimizer_kwargs=REF)
        trainer = ZOTrainer(model=T.tiny_bert(dropout=0.1), args=args, train_dataset=data, eval_dataset=held_out)
        trainer.train()
        finals.append(T.weights(trainer.model))
        if strategy == "steps":
            assert sum("eval_loss" in h for h in trainer.state.log_history) == 4
    for k, v in finals[0].items():
        assert torch.equal(v, finals[1][k]), k


@pytest.mark.slow
def test_resume_from_checkpoint_in_a_fresh_process_is_bit_identical(tmp_path):
    finals = {}
    for name in ALL:
        trainer = C.make_trainer(str(tmp_path / name), name)
        trainer.train()
        assert (tmp_path / name / f"checkpoint-{C.SAVE_AT}").is_dir()
        finals[name] = T.weights(trainer.model)
    proc = subprocess.run([sys.executable, str(TESTS / "hf_scripts" / "resume.py"), str(tmp_path), str(C.SAVE_AT),
                           *ALL], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ALL:
        resumed = torch.load(tmp_path / name / "resumed.pt", weights_only=True)
        assert resumed["step"] == C.STEPS
        for k, v in finals[name].items():
            assert torch.equal(v, resumed["weights"][k]), (name, k)



@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_gloo_ranks_bit_identical_and_match_one_process(tmp_path):
    script = TESTS / "hf_scripts" / "ddp_train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), str(tmp_path / "ddp")]
    (tmp_path / "ddp").mkdir()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert torch.equal(r0["grads"], r1["grads"])
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    sys.path.insert(0, str(TESTS / "hf_scripts"))
    try:
        import ddp_train
    finally:
        sys.path.remove(str(TESTS / "hf_scripts"))
    single = ddp_train.run(str(tmp_path / "single"), batch=4)
    assert single["world"] == 1
    # the same global batches: ranks' token-weighted all-reduce == one process's token mean (float32 rounding)
    torch.testing.assert_close(r0["grads"], single["grads"], rtol=1e-3, atol=2e-3)
    for k, v in r0["weights"].items():
        torch.testing.assert_close(v, single["weights"][k], rtol=1e-5, atol=1e-6)
