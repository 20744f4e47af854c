"""PEFT adapters and TRL's SFTTrainer through ZOTrainer (issue 11 items 1 and 5); tiny models, CPU, offline."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch

import hf_tiny as T
from hf_tiny import REF
from zo_optim.integrations.hf import ZOTrainer


def _train_peft(model, tmp_path, **kw):
    trainer = ZOTrainer(model=model, args=T.zo_args(tmp_path, max_steps=3, learning_rate=1e-2,
                                                     zo_optimizer_kwargs=REF, **kw),
                        train_dataset=T.causal_lm_rows(16))
    trainer.train()
    return trainer


def _split(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return trainable, {k: v for k, v in T.weights(model).items()}


@pytest.mark.parametrize("perturbation", ["inplace", "transient"])
def test_lora_trains_only_the_adapters(tmp_path, perturbation):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(T.tiny_opt(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                              target_modules=["q_proj", "v_proj"]))
    trainable, before = _split(model)
    assert trainable and all("lora_" in n for n in trainable)
    trainer = _train_peft(model, tmp_path, zo_perturbation=perturbation)
    n_opt = sum(len(g["params"]) for g in trainer.zo_optimizer.param_groups)
    assert n_opt == len(trainable)  # only the adapters reach the optimizer
    after = T.weights(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved)  # the base is bit-identical
    assert any("lora_B" in k for k in moved)  # B starts at zero: the adapter really learned something


def test_prefix_tuning_trains_only_the_prefix(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(T.tiny_gpt2(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    trainable, before = _split(model)
    assert trainable and all("prompt_encoder" in n for n in trainable)
    _train_peft(model, tmp_path)
    after = T.weights(model)
    base = [k for k in before if "prompt_encoder" not in k]
    assert base and all(torch.equal(before[k], after[k]) for k in base)
    assert any(not torch.equal(before[k], after[k]) for k in before if "prompt_encoder" in k)


def test_zo_sft_trainer_keeps_train_metrics_under_train_keys(tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from zo_optim.integrations.hf.trl import ZOSFTConfig, ZOSFTTrainer

    tok = T.tiny_tokenizer()
    train = datasets.Dataset.from_dict({"text": T.tiny_texts(16, seed=0)})
    held_out = datasets.Dataset.from_dict({"text": T.tiny_texts(8, seed=1)})
    args = ZOSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                       per_device_eval_batch_size=4, max_steps=2, logging_steps=1, eval_strategy="steps",
                       eval_steps=2, save_strategy="no", learning_rate=1e-3, disable_tqdm=True, max_length=32,
                       zo_optimizer="zoadam", zo_loss_weighting="tokens", zo_optimizer_kwargs=REF,
                       dataset_num_proc=None)
    model = T.tiny_gpt2(dropout=0.1)
    before = T.weights(model)
    trainer = ZOSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tok)
    trainer.train()
    assert trainer.zo_optimizer.step_count == 2
    assert any(not torch.equal(before[k], v) for k, v in T.weights(trainer.model).items())
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) == 2 and len(eval_logs) == 1
    for h in train_logs:
        assert {"entropy", "mean_token_accuracy", "num_tokens", "zo/projected_grad"} <= set(h)
        assert not any(k.startswith("eval_") for k in h)
    assert {"eval_entropy", "eval_mean_token_accuracy"} <= set(eval_logs[0])
    # each micro-batch's tokens counted once, although the probes ran it 2 times
    tokens = sum(len(tok(t)["input_ids"]) + 1 for t in train["text"][:8])  # + the EOS TRL appends
    assert train_logs[-1]["num_tokens"] == tokens
