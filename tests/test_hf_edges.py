"""The edges users hit with ZOTrainer (issue 22), each through a real transformers.Trainer on tiny models.

* Ctrl-C in the second micro-batch of a gradient-accumulation step: nothing pending afterwards, saving works,
  the next train() measures that step afresh (it used to fold the stale micro-batch in: weight 3 instead of 2);
* callbacks between micro-batches see θ (parameters, a submodule's state_dict, a submodule's forward);
* resume from a checkpoint without optimizer state (save_only_model=True): counters from the Trainer state;
* an optimizer over another model's parameters is refused;
* optimizer-argument mistakes are refused when ZOTrainingArguments is built;
* first-run guidance: the ZO learning rate when the AdamW default was left, the loss window warning, the
  windowed zo/projected_grad, the notices (max_grad_norm, gradient_checkpointing, bf16, the args dump).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from transformers import TrainerCallback

import hf_tiny as T
import zo_optim
from hf_tiny import REF
from zo_optim.integrations.hf import ZOTrainer
from zo_optim.integrations.hf._guidance import LossWatch
from zo_optim.optim.registry import recommended_lr


def _max_off(params, theta) -> float:
    return max(float((p.detach() - t).abs().max()) for p, t in zip(params, theta, strict=True))


# ---------------------------------------------------------------- 1. Ctrl-C between the micro-batches of a step


class _InterruptingTrainer(ZOTrainer):
    """Raises a real KeyboardInterrupt from inside the closure at the ``at``-th probe forward."""

    at = 0

    def compute_loss(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == self.at:
            raise KeyboardInterrupt
        return super().compute_loss(*args, **kwargs)


class _InterruptAfterFirstMicroBatch(TrainerCallback):
    def on_substep_end(self, args, state, control, **kw):
        raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["closure", "callback"])
def test_ctrl_c_in_the_second_micro_batch_leaves_nothing_pending(tmp_path, where, caplog):
    data = T.classification_rows(16)
    args = dict(max_steps=1, gradient_accumulation_steps=2, zo_optimizer_kwargs=REF, save_strategy="no")
    model = T.tiny_bert()
    theta = [p.detach().clone() for p in model.parameters()]
    if where == "closure":
        # probes 1, 2 are micro-batch 1; probe 3 is the first forward of micro-batch 2
        cls = type("Interrupting", (_InterruptingTrainer,), {"at": 3, "calls": 0})
        trainer = cls(model=model, args=T.zo_args(tmp_path, **args), train_dataset=data)
    else:
        trainer = ZOTrainer(model=model, args=T.zo_args(tmp_path, **args), train_dataset=data,
                            callbacks=[_InterruptAfterFirstMicroBatch()])
    with caplog.at_level(logging.WARNING, logger="zo_optim"), pytest.raises(KeyboardInterrupt):
        trainer.train()
    opt = trainer.zo_optimizer
    assert opt.pending_seed is None and opt.step_count == 0 and not opt.weights_perturbed
    assert "partial estimate is discarded" in caplog.text
    # θ back up to the float32 round trip of ±ε·z (ε = 1e-3, |z| < 6: below 1e-6)
    assert _max_off(model.parameters(), theta) < 1e-6
    # saving works: the checkpoint has the optimizer (it used to raise after writing the model only)
    trainer._save_checkpoint(trainer.model, trial=None)
    ckpt = os.path.join(tmp_path, "checkpoint-0")
    assert os.path.isfile(os.path.join(ckpt, "optimizer.pt")), os.listdir(ckpt)
    # the next train() measures step 1 afresh: the same estimate as a clean run of that step (2 micro-batches)
    if where == "callback":
        trainer.pop_callback(_InterruptAfterFirstMicroBatch)
    else:
        type(trainer).at = -1
    trainer.train()
    clean = ZOTrainer(model=T.tiny_bert(), args=T.zo_args(tmp_path / "clean", **args), train_dataset=data)
    clean.train()
    assert opt.step_count == 1
    # the restored θ differs from the clean θ by the round trip (< 1e-6), so the losses agree to ~1e-6 / ε;
    # a stale third micro-batch changes the mean by a whole micro-batch's share (differences of order g)
    torch.testing.assert_close(opt.last_projected_grads, clean.zo_optimizer.last_projected_grads,
                               rtol=1e-3, atol=1e-3)


def test_a_failed_take_back_inside_train_keeps_its_error_and_removes_the_hooks(tmp_path, monkeypatch):
    """Ctrl-C in micro-batch 2, and the pass that takes the probe back fails too: the weights are unknown. train()
    must raise the optimizer's WeightsNotRestoredError (before: the discard of the pending estimate and the final
    restore were refused in turn, so a RuntimeError replaced it and the model kept our hooks) and leave no hook of
    ours on the model; the optimizer keeps refusing until a checkpoint is loaded."""
    data = T.classification_rows(16)
    args = dict(max_steps=1, gradient_accumulation_steps=2, zo_optimizer_kwargs=REF, save_strategy="no")
    model = T.tiny_bert()
    hooks = (len(model._forward_pre_hooks), len(model._state_dict_pre_hooks))
    armed: list[int] = []
    real = zo_optim.MeZO._perturb_chunk

    def perturb_chunk(self, *a, **k):
        if armed:
            raise RuntimeError("restore pass failed (injected)")
        return real(self, *a, **k)

    monkeypatch.setattr(zo_optim.MeZO, "_perturb_chunk", perturb_chunk)
    class FailingTakeBack(ZOTrainer):
        calls = 0

        def compute_loss(self, *a, **k):
            # probes 1, 2 are micro-batch 1 (left at θ − ε·z: the restore is deferred); at probe 3, a Ctrl-C whose
            # take-back pass fails
            type(self).calls += 1
            if type(self).calls == 3:
                armed.append(1)
                raise KeyboardInterrupt
            return super().compute_loss(*a, **k)

    trainer = FailingTakeBack(model=model, args=T.zo_args(tmp_path, **args), train_dataset=data)
    with pytest.raises(zo_optim.WeightsNotRestoredError, match="may still be perturbed") as err:
        trainer.train()
    assert "injected" in str(err.value.__cause__)
    assert (len(model._forward_pre_hooks), len(model._state_dict_pre_hooks)) == hooks
    opt = trainer.zo_optimizer
    assert opt.refusal is not None
    with pytest.raises(RuntimeError, match="refuses"):
        opt.state_dict()


# ---------------------------------------------------------------- 2. θ at every callback event


class _Observer(TrainerCallback):
    """Reads the weights in the window between micro-batches and before optimizer.step()."""

    def __init__(self, batch, look: bool = True) -> None:
        self.batch, self.look = batch, look
        self.offsets: list[float] = []
        self.passes: list[int] = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.theta = [p.detach().clone() for p in model.parameters()]
        self.sub_theta = {k: v.clone() for k, v in model.bert.encoder.state_dict().items()}
        with torch.no_grad():
            self.emb_theta = model.bert.embeddings(input_ids=self.batch["input_ids"]).clone()

    def _look(self, model):
        self.offsets.append(_max_off(model.parameters(), self.theta))
        sub = model.bert.encoder.state_dict()  # a submodule: no hook of the whole model runs
        self.offsets.append(max(float((sub[k] - v).abs().max()) for k, v in self.sub_theta.items()))
        with torch.no_grad():  # a submodule's forward: no hook of the whole model runs either
            emb = model.bert.embeddings(input_ids=self.batch["input_ids"])
        self.offsets.append(float((emb - self.emb_theta).abs().max()))

    def on_substep_end(self, args, state, control, model=None, **kw):
        self._look(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self._look(model)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.passes.append(optimizer.optimizer._inplace.passes)


class _Quiet(_Observer):
    # implements no event inside the window: the deferred restore stays fused into the update
    on_substep_end = TrainerCallback.on_substep_end
    on_pre_optimizer_step = TrainerCallback.on_pre_optimizer_step


def test_callbacks_between_micro_batches_see_theta(tmp_path):
    data = T.classification_rows(16)
    batch = {"input_ids": torch.stack([data[i]["input_ids"] for i in range(4)])}
    looking, quiet = _Observer(batch), _Quiet(batch)
    runs = {}
    for name, cb in (("looking", looking), ("quiet", quiet)):
        runs[name] = ZOTrainer(model=T.tiny_bert(), args=T.zo_args(tmp_path / name, max_steps=3,
                                                                   gradient_accumulation_steps=2,
                                                                   zo_optimizer_kwargs=REF),
                               train_dataset=data, callbacks=[cb])
        runs[name].train()
    # 3 steps x 2 events x 3 looks, every one at θ (the float32 round trip of ±ε·z stays below 1e-6;
    # the perturbed weights were off by ε·|z| ~ 1e-3)
    assert len(looking.offsets) == 18 and max(looking.offsets) < 1e-5, looking.offsets
    # the cost: one restore pass at each of the 2 events of every step (2 x 3), none without such a callback
    assert runs["looking"]._zo_callback.restores == 6 and runs["quiet"]._zo_callback.restores == 0
    assert quiet.passes == [4, 4, 4]  # per step: 2 + 2 perturbation passes (the fused update is not counted)
    assert looking.passes == [6, 6, 6]  # + the 2 restores
    # and the training is the same either way (up to the round trips)
    for a, b in zip(runs["looking"].model.parameters(), runs["quiet"].model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 3. resume without optimizer state


def test_resume_without_optimizer_state_takes_the_step_from_the_trainer_state(tmp_path, caplog):
    """save_only_model=True: no optimizer.pt, no scheduler.pt, no RNG state. MeZO keeps no other state and the
    seeds are step_seed(base_seed(args.seed), t): with t from global_step (and the linear lr schedule advanced)
    the resumed run is the uninterrupted one, bit for bit. Before, t restarted at 0 (the seeds of steps 1..3
    were reused) and the lr schedule restarted: the final weights differed."""
    data = T.causal_lm_rows(16, seed=5)

    def trainer(out, model, **kw):
        args = T.zo_args(out, max_steps=6, save_strategy="steps", save_steps=3, save_only_model=True,
                         zo_optimizer_kwargs=REF, lr_scheduler_type="linear", **kw)
        return ZOTrainer(model=model, args=args, train_dataset=data)

    full = trainer(tmp_path / "a", T.tiny_gpt2())
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert not (ckpt / "optimizer.pt").exists() and (ckpt / "trainer_state.json").exists()
    resumed = trainer(tmp_path / "b", T.tiny_gpt2(seed=1))  # other initial weights: the checkpoint's must load
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        resumed.train(resume_from_checkpoint=str(ckpt))
    for k, v in T.weights(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.zo_optimizer.step_count == 6
    assert "set to the Trainer's global_step 3" in caplog.text and "the resumed run is the uninterrupted" in caplog.text

    # an optimizer with state: the counter is right, and the warning says what is not exact
    caplog.clear()
    adam = trainer(tmp_path / "c", T.tiny_gpt2(), zo_optimizer="zoadam")
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        adam.train(resume_from_checkpoint=str(ckpt))
    assert adam.zo_optimizer.step_count == 6 and "differs from an uninterrupted one" in caplog.text


# ---------------------------------------------------------------- 4, 5. refusals


def test_an_optimizer_over_another_models_parameters_is_refused(tmp_path):
    model, other = T.tiny_gpt2(), T.tiny_gpt2()
    opt = zo_optim.MeZO(other.parameters(), lr=1e-3, backend="reference")
    with pytest.raises(ValueError, match=r"of the optimizer's \d+ parameters are not parameters of the model"):
        ZOTrainer(model=model, args=T.zo_args(tmp_path), train_dataset=T.causal_lm_rows(8), optimizers=(opt, None))
    # a partial overlap is refused too (those tensors would be "trained" without effect on the loss)
    mixed = zo_optim.MeZO([*model.parameters(), next(other.parameters())], lr=1e-3, backend="reference")
    with pytest.raises(ValueError, match=r"^1 of the optimizer's"):
        ZOTrainer(model=model, args=T.zo_args(tmp_path), optimizers=(mixed, None))


@pytest.mark.parametrize(("kw", "match"), [
    ({"zo_eps": 1000.0}, r"Invalid zo_eps: 1000\.0 \(the perturbation scale must lie in"),
    ({"zo_eps": 1e-30}, "Invalid zo_eps"),
    ({"zo_num_queries": 0}, "Invalid zo_num_queries: 0"),
    ({"zo_optimizer_kwargs": {"betaz": 0.9}}, r"Invalid zo_optimizer_kwargs for MeZO: .*'betaz'"),
    ({"zo_optimizer": "zoadam", "zo_optimizer_kwargs": {"betas": (1.5, 0.9)}}, "Invalid beta parameter at index 0"),
    ({"zo_optimizer_kwargs": {"backend": "gpu"}}, "Invalid backend: 'gpu'"),
    ({"zo_optimizer_kwargs": {"zo_eps": 1e-2}}, "'zo_eps' is set by the zo_eps argument"),
    ({"zo_loss_window": -1}, "Invalid zo_loss_window"),
])
def test_optimizer_argument_mistakes_are_refused_when_the_arguments_are_built(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        T.zo_args(tmp_path, **kw)


# ---------------------------------------------------------------- 6. first-run guidance


def test_the_adamw_default_lr_becomes_the_registrys_zo_lr(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        t = ZOTrainer(model=T.tiny_gpt2(), args=T.zo_args(tmp_path, learning_rate=5e-5, max_steps=1,
                                                          zo_optimizer="zoadam", zo_optimizer_kwargs=REF),
                      train_dataset=T.causal_lm_rows(8))
        t.train()
    want = recommended_lr("zoadam", "finetune-clm/full")  # a causal LM: the classifier's lr diverges there
    assert want != 5e-5 and want != recommended_lr("zoadam", "finetune/full") and t.args.learning_rate == want
    assert all(g["initial_lr"] == want for g in t.zo_optimizer.param_groups)  # what the scheduler starts from
    assert "learning_rate was left at 5e-05, the AdamW default" in caplog.text and "finetune-clm/full" in caplog.text
    # any other value, or zo_default_lr=False, is the user's
    for kw, lr in (({"learning_rate": 2e-3}, 2e-3), ({"learning_rate": 5e-5, "zo_default_lr": False}, 5e-5)):
        t = ZOTrainer(model=T.tiny_gpt2(), args=T.zo_args(tmp_path, **kw, zo_optimizer_kwargs=REF))
        assert all(g["lr"] == lr for g in t.create_optimizer().param_groups)


def test_loss_watch_window():
    watch = LossWatch(4)
    assert [watch.add(s, v) for s, v in enumerate([5.0, 4.0, 3.0, 2.0, 1.5], 1)] == [None] * 5  # improving
    # steps 5..8: earlier half (5, 6] = 1.5, 1.5; recent (6, 8] = 1.5, 1.5 -> not improved, once per window
    msgs = [watch.add(s, 1.5) for s in (6, 7, 8)]
    assert msgs[:2] == [None, None] and "has not improved over the last 4 steps" in msgs[2]
    assert watch.add(9, 1.5) is None  # not again within the window
    rising = LossWatch(2)
    rising.add(1, 1.0)
    assert "is rising" in rising.add(2, 2.0)
    assert LossWatch(0).add(100, 1.0) is None


def test_a_flat_loss_is_reported_through_the_trainer(tmp_path, caplog):
    """lr = 0 on one repeated batch: the logged loss is exactly constant, so the window check must fire."""
    row = T.causal_lm_rows(1)[0]
    data = T.ListDataset([row] * 4)
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        _ = ZOTrainer(model=T.tiny_gpt2(), args=T.zo_args(tmp_path, learning_rate=0.0, max_steps=6,
                                                          zo_loss_window=4, zo_optimizer_kwargs=REF),
                      train_dataset=data).train()
    assert caplog.text.count("has not improved over the last 4 steps") == 1


class _Grads(TrainerCallback):
    def __init__(self):
        self.g = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.g.append(optimizer.optimizer.last_projected_grads.clone())


def test_projected_grad_is_the_mean_over_the_logging_window(tmp_path):
    grads = _Grads()
    t = ZOTrainer(model=T.tiny_gpt2(), args=T.zo_args(tmp_path, max_steps=6, logging_steps=3, zo_num_queries=2,
                                                      zo_optimizer_kwargs=REF),
                  train_dataset=T.causal_lm_rows(32), callbacks=[grads])
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 2 and len(grads.g) == 6
    for log, window in zip(logs, (grads.g[:3], grads.g[3:]), strict=True):
        # the mean over the window's steps of each step's mean over its q = 2 queries, like "loss"
        assert log["zo/projected_grad"] == pytest.approx(sum(float(g.mean()) for g in window) / 3, rel=1e-6)
        assert log["zo/projected_grad_abs"] == pytest.approx(sum(float(g.abs().mean()) for g in window) / 3,
                                                             rel=1e-6)
    assert logs[1]["zo/projected_grad"] != pytest.approx(float(grads.g[-1].mean()), rel=1e-6)  # not the last only


def test_notices_come_from_the_trainer_not_the_parser(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        args = T.zo_args(tmp_path, max_grad_norm=1.0, gradient_checkpointing=True, max_steps=1,
                         zo_optimizer_kwargs=REF)
    assert "zo-optim" not in caplog.text and args.max_grad_norm == 0  # parse time: quiet (logging not set up yet)
    assert "optim=<not used: zo_optimizer trains>," in str(args)
    assert "adamw" not in next(line for line in str(args).splitlines() if line.startswith("optim=")).lower()
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        model = T.tiny_gpt2()
        t = ZOTrainer(model=model, args=args, train_dataset=T.causal_lm_rows(8))
        t.train()
    assert caplog.text.count("max_grad_norm=1.0 is ignored") == 1
    assert "gradient_checkpointing=True is turned off" in caplog.text
    assert not args.gradient_checkpointing and not model.is_gradient_checkpointing


@pytest.mark.parametrize("perturbation", ["inplace", "transient"])
def test_bf16_weights_perturbed_in_place_get_the_transient_hint(tmp_path, caplog, perturbation):
    model = T.tiny_gpt2().to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        ZOTrainer(model=model, args=T.zo_args(tmp_path, zo_perturbation=perturbation, zo_optimizer_kwargs=REF),
                  train_dataset=T.causal_lm_rows(8)).create_optimizer()
    assert ("zo_perturbation='transient'" in caplog.text) == (perturbation == "inplace")


def test_the_default_lr_follows_the_arguments_class_and_peft(tmp_path):
    """TRL's SFTConfig defaults learning_rate to 2e-5 (not 5e-5): left as is, it is not the user's choice
    either. A PEFT model gets the registry's LoRA value."""
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    from zo_optim.integrations.hf._guidance import zo_default_lr
    from zo_optim.integrations.hf.trl import ZOSFTConfig

    sft_default = next(f.default for f in dataclasses.fields(trl.SFTConfig) if f.name == "learning_rate")
    cfg = ZOSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], zo_optimizer_kwargs=REF)
    assert cfg.learning_rate == sft_default != 5e-5
    # causal LMs (GPT-2 here, PEFT-wrapped or not) get the finetune-clm values, a classifier the finetune ones
    assert zo_default_lr(cfg, "mezo", T.tiny_gpt2()) == recommended_lr("mezo", "finetune-clm/full")
    assert zo_default_lr(cfg, "mezo", T.tiny_bert()) == recommended_lr("mezo", "finetune/full")
    assert recommended_lr("mezo", "finetune-clm/full") != recommended_lr("mezo", "finetune/full")
    lora = peft.get_peft_model(T.tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    assert zo_default_lr(cfg, "mezo", lora) == recommended_lr("mezo", "finetune-clm/lora")
    assert recommended_lr("mezo", "finetune-clm/lora") != recommended_lr("mezo", "finetune/lora")
    cfg.learning_rate = 1e-4
    assert zo_default_lr(cfg, "mezo", lora) is None
