"""ZOTrainer through a real transformers.Trainer on tiny random-init models (CPU, offline).

Covers issue 11 items 1, 2 and 4: training_step / create_optimizer / logging, the ZOTrainingArguments,
optimizers=(opt, None) and optimizer_cls_and_kwargs, refusals, fp16, dropout "off" / "shared".
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from transformers import TrainerCallback, TrainingArguments

import hf_tiny as T
import zo_optim
from hf_tiny import REF
from zo_optim.integrations.hf import ZOTrainer, ZOTrainingArguments, label_count


def _train(model, tmp_path, data=None, callbacks=None, **kw):
    kw.setdefault("zo_optimizer_kwargs", REF)
    trainer = ZOTrainer(model=model, args=T.zo_args(tmp_path, **kw), train_dataset=data or T.causal_lm_rows(16),
                        callbacks=callbacks)
    trainer.train()
    return trainer


def test_trains_forward_only_and_logs_honestly(tmp_path, caplog):
    model = T.tiny_gpt2()
    before = T.weights(model)
    with caplog.at_level(logging.WARNING):
        trainer = _train(model, tmp_path, max_steps=3, max_grad_norm=1.0)
    assert "max_grad_norm=1.0 is ignored" in caplog.text
    assert trainer.args.max_grad_norm == 0
    opt = trainer.zo_optimizer
    assert isinstance(opt, zo_optim.MeZO) and opt is not trainer.optimizer  # accelerate wraps it
    assert opt.step_count == 3
    assert all(p.grad is None for p in model.parameters())  # no backward ran
    assert any(not torch.equal(before[k], v) for k, v in T.weights(model).items())
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    assert all("grad_norm" not in h for h in trainer.state.log_history)
    assert [h["zo/step"] for h in train_logs] == [1.0, 2.0, 3.0]
    assert all(h["zo/skipped_steps"] == 0.0 for h in train_logs)
    assert train_logs[-1]["zo/projected_grad"] == pytest.approx(float(opt.last_projected_grads.mean()))


def test_create_optimizer_uses_the_trainer_settings(tmp_path):
    model = T.tiny_bert()
    args = T.zo_args(tmp_path, learning_rate=3e-4, weight_decay=0.1, zo_optimizer="zoadam", zo_eps=2e-3,
                     zo_num_queries=2, zo_optimizer_kwargs={**REF, "betas": (0.8, 0.9)})
    trainer = ZOTrainer(model=model, args=args, train_dataset=T.classification_rows(8))
    opt = trainer.create_optimizer()
    assert isinstance(opt, zo_optim.ZOAdam)
    assert (opt.zo_eps, opt.num_queries) == (2e-3, 2)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    # the Trainer's own split: biases and LayerNorm weights do not decay; names reach the optimizer
    assert any(n.endswith("bias") for n in no_decay["param_names"])
    assert any("LayerNorm" in n for n in no_decay["param_names"])
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decay["param_names"])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable
    # the seed is a function of args.seed (not of Python's random state)
    same = ZOTrainer(model=T.tiny_bert(), args=T.zo_args(tmp_path, zo_optimizer_kwargs=REF)).create_optimizer()
    other = ZOTrainer(model=T.tiny_bert(), args=T.zo_args(tmp_path, seed=1, zo_optimizer_kwargs=REF))
    assert same.base_seed == opt.base_seed != other.create_optimizer().base_seed


def test_transient_perturbation_attaches_the_model(tmp_path):
    model = T.tiny_opt()
    trainer = _train(model, tmp_path, max_steps=2, zo_perturbation="transient")
    assert trainer.zo_optimizer.perturbation == "transient"
    ref = _train(T.tiny_opt(), tmp_path / "b", max_steps=2)
    # transient and in-place perturbations measure the same losses up to rounding
    assert torch.allclose(trainer.zo_optimizer.last_projected_grads, ref.zo_optimizer.last_projected_grads,
                          rtol=1e-3, atol=1e-3)


def test_optimizers_tuple_and_cls_and_kwargs_match_the_named_optimizer(tmp_path):
    named = _train(T.tiny_gpt2(), tmp_path / "a", max_steps=2, learning_rate=2e-3)
    seed = named.zo_optimizer.base_seed

    model = T.tiny_gpt2()
    opt = zo_optim.MeZO(model.parameters(), lr=2e-3, zo_eps=1e-3, seed=seed, backend="reference")
    tup = ZOTrainer(model=model, args=T.zo_args(tmp_path / "b", max_steps=2, learning_rate=2e-3),
                    train_dataset=T.causal_lm_rows(16), optimizers=(opt, None))
    tup.train()
    assert tup.zo_optimizer is opt and opt.step_count == 2
    # one group in its own parameter order (no decay split): other tensor ids, so other directions
    assert not torch.equal(opt.last_projected_grads, named.zo_optimizer.last_projected_grads)

    # optimizer_cls_and_kwargs: lr comes from args.learning_rate (it was silently ignored before)
    model_c = T.tiny_gpt2()
    cls_kw = ZOTrainer(model=model_c, args=T.zo_args(tmp_path / "c", max_steps=2, learning_rate=2e-3),
                       train_dataset=T.causal_lm_rows(16),
                       optimizer_cls_and_kwargs=(zo_optim.MeZO, {"zo_eps": 1e-3, "backend": "reference"}))
    cls_kw.train()
    assert all(g["initial_lr"] == 2e-3 for g in cls_kw.zo_optimizer.param_groups)  # the scheduler's base lr
    assert cls_kw.zo_optimizer.base_seed == seed  # and the seed from args.seed, as for the named optimizer
    for k, v in T.weights(named.model).items():
        assert torch.equal(v, cls_kw.model.state_dict()[k]), k


def test_first_order_optimizers_are_refused(tmp_path):
    model = T.tiny_gpt2()
    args = T.zo_args(tmp_path)
    with pytest.raises(TypeError, match=r"needs a zo-optim optimizer.*AdamW"):
        ZOTrainer(model=model, args=args, optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(TypeError, match="needs a zo-optim optimizer"):
        ZOTrainer(model=model, args=args, optimizer_cls_and_kwargs=(torch.optim.AdamW, {}))
    with pytest.raises(ValueError, match="Invalid zo_optimizer: 'adamw'"):
        T.zo_args(tmp_path, zo_optimizer="adamw")
    with pytest.raises(ValueError, match="Invalid zo_loss_weighting"):
        T.zo_args(tmp_path, zo_loss_weighting="sum")
    with pytest.raises(ValueError, match="Invalid zo_dropout"):
        T.zo_args(tmp_path, zo_dropout="on")
    with pytest.raises(ValueError, match="Invalid zo_eps"):
        T.zo_args(tmp_path, zo_eps=0.0)


def test_plain_training_arguments_get_the_defaults(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, max_grad_norm=1.0,
                             per_device_train_batch_size=4, disable_tqdm=True, save_strategy="no")
    trainer = ZOTrainer(model=T.tiny_gpt2(), args=args, train_dataset=T.causal_lm_rows(8))
    assert args.max_grad_norm == 0
    trainer.train()
    assert isinstance(trainer.zo_optimizer, zo_optim.MeZO) and trainer.zo_optimizer.step_count == 1


def test_defaults_are_quiet_and_an_unused_optim_is_named(tmp_path, caplog):
    """ZOTrainingArguments default max_grad_norm to 0 (no warning on every run); a chosen args.optim is
    not used, and one warning says so (none when the optimizer is passed in)."""
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        args = T.zo_args(tmp_path, max_grad_norm=ZOTrainingArguments.max_grad_norm)  # the default, spelled out
        ZOTrainer(model=T.tiny_gpt2(), args=args, train_dataset=T.causal_lm_rows(8))
    assert args.max_grad_norm == 0.0 and "zo-optim" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        ZOTrainer(model=T.tiny_gpt2(), args=T.zo_args(tmp_path, optim="adamw_torch", zo_optimizer="hiso"),
                  train_dataset=T.causal_lm_rows(8))
    assert caplog.text.count("optim='adamw_torch' is not used") == 1 and "zo_optimizer='hiso'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zo_optim"):
        model = T.tiny_gpt2()
        opt = zo_optim.MeZO(model.parameters(), lr=1e-3, backend="reference")
        ZOTrainer(model=model, args=T.zo_args(tmp_path, optim="adamw_torch"), train_dataset=T.causal_lm_rows(8),
                  optimizers=(opt, None))
    assert "is not used" not in caplog.text


def test_fp16_is_refused_with_a_bf16_recommendation(tmp_path):
    args = T.zo_args(tmp_path, fp16=True)
    with pytest.raises(ValueError, match=r"fp16=True.*bf16=True.*transient"):
        ZOTrainer(model=T.tiny_gpt2(), args=args, train_dataset=T.causal_lm_rows(8))


def test_command_line_parsing(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ZOTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_optimizer", "hizoo", "--zo_eps", "0.01", "--zo_loss_weighting",
         "tokens", "--zo_optimizer_kwargs", '{"hessian_smooth": 1e-6}', "--use_cpu", "True"])
    assert (args.zo_optimizer, args.zo_eps, args.zo_loss_weighting) == ("hizoo", 0.01, "tokens")
    assert args.zo_optimizer_kwargs == {"hessian_smooth": 1e-6}
    assert "zo_optimizer" in args.to_json_string()


class _TrainingFlags(TrainerCallback):
    def __init__(self):
        self.flags = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.flags.append((model.training, all(m.training for m in model.modules())))


def test_dropout_off_probes_in_eval_mode_and_restores_training(tmp_path):
    flags = _TrainingFlags()
    data = T.classification_rows(8)
    with_dropout = _train(T.tiny_bert(dropout=0.3), tmp_path / "a", data=data, max_steps=2, callbacks=[flags])
    no_dropout = _train(T.tiny_bert(dropout=0.0), tmp_path / "b", data=data, max_steps=2)
    # the probes saw no dropout: the same projected gradients as the dropout-free twin, bit for bit
    assert torch.equal(with_dropout.zo_optimizer.last_projected_grads, no_dropout.zo_optimizer.last_projected_grads)
    assert flags.flags == [(True, True), (True, True)]  # every module back in train mode after the probes


def test_dropout_shared_gives_every_probe_the_same_masks(tmp_path):
    model = T.tiny_bert(dropout=0.3)
    trainer = ZOTrainer(model=model, args=T.zo_args(tmp_path, zo_dropout="shared", zo_optimizer_kwargs=REF),
                        train_dataset=T.classification_rows(8))
    opt = trainer.create_optimizer()
    batch = torch.utils.data.default_collate([T.classification_rows(4)[i] for i in range(4)])
    model.train()
    closure = trainer._zo_closure(model, batch, opt)
    rng_before = torch.get_rng_state()
    first, second = closure(), closure()
    assert torch.equal(first, second)  # same masks at the same weights
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream did not move
    plain = [trainer.compute_loss(model, batch) for _ in range(2)]
    assert not torch.equal(plain[0], plain[1])  # dropout is active: unshared masks differ
    trainer._zo_micro = 1  # another micro-batch of the step gets other masks
    assert not torch.equal(trainer._zo_closure(model, batch, opt)(), first)
    trainer.train()  # and the whole loop runs with shared masks
    assert opt.step_count == 3


def test_label_count_shifts_for_causal_lm():
    labels = torch.tensor([[5, 6, -100, -100], [7, 8, 9, -100]])
    assert label_count({"labels": labels}, shift=False) == 5
    assert label_count({"labels": labels}, shift=True) == 3  # position 0 predicts nothing
    assert label_count({"labels": labels, "shift_labels": labels}, shift=True) == 5
    with pytest.raises(ValueError, match="needs 'labels'"):
        label_count({"input_ids": labels}, shift=True)


# ---------------------------------------------------------------- deferred restore (3 passes per step, not 4)


class _BetweenEstimateAndStep(TrainerCallback):
    """Acts between the last training_step of a step and the Trainer's optimizer.step() (``on_pre_optimizer_step``;
    since issue 22 the weights are restored to θ before this event runs)."""

    def __init__(self, use: str, batch: dict[str, torch.Tensor]) -> None:
        self.use, self.batch = use, batch
        self.seen: list[tuple[bool, float, bool, float]] = []
        self.passes: list[int] = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.theta = [p.detach().clone() for p in model.parameters()]

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        opt = optimizer.optimizer  # accelerate's wrapper
        off = max(float((p.detach() - t).abs().max()) for p, t in zip(model.parameters(), self.theta, strict=True))
        perturbed = opt.weights_perturbed
        if self.use == "forward":
            with torch.no_grad():
                model(**self.batch)
        elif self.use == "state_dict":
            model.state_dict()
        elif self.use == "raise":
            raise KeyboardInterrupt
        after = max(float((p.detach() - t).abs().max()) for p, t in zip(model.parameters(), self.theta, strict=True))
        self.seen.append((perturbed, off, opt.weights_perturbed, after))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.passes.append(optimizer.optimizer._inplace.passes)


class _PeekingTrainer(ZOTrainer):
    """Looks at the weights right after each training_step, inside the window the deferred restore opens (only
    code in training_step itself can run there: callbacks get θ first, tests/test_hf_edges.py)."""

    use, batch = "nothing", None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.zo_optimizer.pending_seed is None:  # the first micro-batch of a step: θ
            self.theta = [p.detach().clone() for p in self.model.parameters()]
        loss = super().training_step(model, inputs, num_items_in_batch)
        opt, m = self.zo_optimizer, self.model
        off = max(float((p.detach() - t).abs().max()) for p, t in zip(m.parameters(), self.theta, strict=True))
        perturbed = opt.weights_perturbed
        if self.use == "forward":
            with torch.no_grad():
                m(**self.batch)
        elif self.use == "state_dict":
            m.state_dict()
        after = max(float((p.detach() - t).abs().max()) for p, t in zip(m.parameters(), self.theta, strict=True))
        self.seen.append((perturbed, off, opt.weights_perturbed, after))
        return loss


class _Passes(TrainerCallback):
    def __init__(self):
        self.passes = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):  # after the update: nothing to restore
        self.passes.append(optimizer.optimizer._inplace.passes)


@pytest.mark.parametrize("use", ["nothing", "forward", "state_dict"])
def test_the_split_step_defers_its_restore_and_a_forward_or_state_dict_restores_first(tmp_path, use):
    """GA = 2: 2 + 2 perturbation passes then the fused update (the restoring form: 3 + 3 + a separate update);
    a forward or a state_dict() of the model in that window restores θ first (hooks on the model)."""
    data = T.classification_rows(16)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    passes = _Passes()
    trainer = _PeekingTrainer(model=T.tiny_bert(), args=T.zo_args(tmp_path, max_steps=3, gradient_accumulation_steps=2,
                                                                  zo_optimizer_kwargs=REF),
                              train_dataset=data, callbacks=[passes])
    trainer.use, trainer.batch, trainer.seen = use, batch, []
    trainer.train()
    assert len(trainer.seen) == 6
    for perturbed, off, still, after in trainer.seen:
        assert perturbed and off > 1e-4  # the window is real: θ ± ε·u (ε = 1e-3)
        if use == "nothing":
            assert still and after == off
        else:
            assert not still and after < 1e-6  # back at θ (up to the float32 round trip)
    if use == "nothing":
        assert passes.passes == [4, 4, 4] and trainer._zo_callback.restores == 0
    assert not trainer.zo_optimizer.weights_perturbed
    model = trainer.model  # handed back without our hooks: it pickles whole, like any model
    assert not model._forward_pre_hooks and not model._state_dict_pre_hooks
    torch.save(model, tmp_path / "model.pt")


def test_an_interrupt_between_estimate_and_step_leaves_theta(tmp_path):
    data = T.classification_rows(16)
    probe = _BetweenEstimateAndStep("raise", {})
    model = T.tiny_bert()
    with pytest.raises(KeyboardInterrupt):
        _train(model, tmp_path, data=data, callbacks=[probe], max_steps=3)
    opt_params = list(model.parameters())
    assert max(float((p.detach() - t).abs().max()) for p, t in zip(opt_params, probe.theta, strict=True)) < 1e-6


def test_a_compute_loss_that_pops_the_labels_gets_them_in_every_probe(tmp_path):
    """Trainer.compute_loss pops "labels" when label smoothing or a compute_loss_func is set: every probe of a
    step must still see them (the second probe of a step used to get none)."""
    calls = []

    def causal_lm_loss(outputs, labels, num_items_in_batch=None):
        calls.append(labels is not None)
        logits = outputs["logits"][..., :-1, :].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1),
                                                 ignore_index=-100)

    custom = ZOTrainer(model=T.tiny_gpt2(), args=T.zo_args(tmp_path / "custom", max_steps=2, zo_optimizer_kwargs=REF),
                       train_dataset=T.causal_lm_rows(16), compute_loss_func=causal_lm_loss)
    custom.train()
    assert calls == [True] * 4  # 2 steps x 2 probes, each with its labels
    # the same loss as the model's own: the same steps
    own = _train(T.tiny_gpt2(), tmp_path / "own", max_steps=2)
    torch.testing.assert_close(custom.zo_optimizer.last_projected_grads, own.zo_optimizer.last_projected_grads)

    smoothed = _train(T.tiny_gpt2(), tmp_path / "smoothed", max_steps=2, label_smoothing_factor=0.1)
    assert smoothed.zo_optimizer.step_count == 2
    assert torch.isfinite(smoothed.zo_optimizer.last_projected_grads).all()
    assert not torch.equal(smoothed.zo_optimizer.last_projected_grads, own.zo_optimizer.last_projected_grads)


def test_the_mixin_composes_with_seq2seq_trainer(tmp_path):
    """The recipe of docs/integrations.md: Seq2SeqTrainer + the mixin, arguments combined under @dataclass;
    an encoder-decoder's labels are not shifted for the token count; eval with predict_with_generate at θ."""
    from dataclasses import dataclass

    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

    from zo_optim.integrations.hf import ZOTrainerMixin

    class ZOSeq2SeqTrainer(ZOTrainerMixin, Seq2SeqTrainer):
        pass

    @dataclass
    class ZOSeq2SeqTrainingArguments(ZOTrainingArguments, Seq2SeqTrainingArguments):
        pass

    cfg = T5Config(vocab_size=T.VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, dropout_rate=0.0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg)
    rows = [{**r, "labels": r["labels"][:6]} for r in T.causal_lm_rows(16).rows]
    args = ZOSeq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=2,
        learning_rate=1e-3, save_strategy="no", disable_tqdm=True, zo_optimizer_kwargs=REF,
        zo_loss_weighting="tokens", gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=1,
        predict_with_generate=True, generation_max_length=5)
    trainer = ZOSeq2SeqTrainer(model=model, args=args, train_dataset=T.ListDataset(rows),
                               eval_dataset=T.ListDataset(rows[:4]))
    trainer.train()
    assert trainer.zo_optimizer.step_count == 2 and not trainer._zo_loss_shifts_labels()
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 2
    assert all(p.grad is None for p in model.parameters())
