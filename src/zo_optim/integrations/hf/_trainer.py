"""``ZOTrainerMixin``: a ``transformers.Trainer`` that steps a zo-optim optimizer with forwards only.

How one optimizer step runs through the stock training loop (verified on transformers 5.24 /
accelerate 1.15):

* ``training_step`` (once per micro-batch) prepares the inputs and calls
  ``opt.estimate(closure, weight=w)``: the closure computes ``compute_loss`` under ``no_grad`` and
  ``compute_loss_context_manager()`` (autocast). No backward runs, no gradient is stored.
* The Trainer's own ``optimizer.step()`` (accelerate's wrapper → our ``step()`` without closure)
  then applies the accumulated estimate, so gradient accumulation, lr schedulers, evaluation,
  checkpoints and ``resume_from_checkpoint`` keep their usual meaning.
* The estimate defers its restore (``estimate(..., restore=False)``): the weights stay at the last
  probe point between ``training_step`` and ``optimizer.step()``, which fuses the restore into the
  update, so a step costs the 3 weight passes of ``step(closure)`` instead of 4 (measured with
  ``zo-optim bench trainer-overhead``: full-parameter MiniLM 1.16× → 1.01× the raw loop).
  User code never sees those weights: before any callback event that a callback other than
  ZOTrainer's own implements (``on_substep_end``, ``on_pre_optimizer_step``, ...), the weights are
  restored to θ (one extra pass in such steps; none when no callback looks), a forward of the model
  and ``model.state_dict()`` restore them first (hooks on the model), and ``train()`` restores them
  when it ends, normally or by an exception. Only code running inside ``training_step`` itself (a
  subclass that overrides it and reads the weights after ``super().training_step``) sees θ ± ε·u.
* ``train()`` ending by an exception (Ctrl-C) in the middle of a gradient-accumulation step discards
  that step's partial estimate: nothing is pending afterwards (saving works), and the next ``train()``
  measures that step afresh.

Loss weighting: the Trainer's ``num_items_in_batch`` is never passed to the loss (it is the token
count of the whole accumulated batch, multiplied by the world size under
``average_tokens_across_devices``): each micro-batch's loss is its own mean. ``"mean"`` gives every
micro-batch weight 1 (a mean of means); ``"tokens"`` weighs it by its label count (``labels != -100``,
shifted like the causal-LM loss), and the optimizer forms Σ w·g / Σ w across micro-batches and
ranks — exactly the token mean of one big batch.

Dropout: ``"off"`` runs the probes in eval mode and restores every module's ``training`` flag;
``"shared"`` keeps train mode and seeds torch's RNG (forked, so the global stream is untouched)
from the step seed and the micro-batch index before each probe, so both probes — and all ranks —
see the same masks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ... import rng
from ...optim import ZOOptimizer
from . import _sharded
from ._args import force_no_clipping, no_gradient_checkpointing, resolve_optimizer, warn_unused_optim, zo_settings
from ._guidance import LossWatch, ZOCallback, first_run_hints, zo_default_lr
from ._resume import step_from_trainer_state
from ._sharded import prepare_sharded

__all__ = ["ZOTrainer", "ZOTrainerMixin", "label_count", "unwrap_zo_optimizer"]

logger = logging.getLogger(__name__)

_SEED_SALT = 0x7A6F_2D68_665F_7365  # "zo-hf_se": keeps the optimizer's stream apart from other uses of args.seed


def unwrap_zo_optimizer(optimizer: Any) -> ZOOptimizer:
    """The zo-optim optimizer inside accelerate's (or any) ``.optimizer`` wrappers, else TypeError."""
    opt = optimizer
    for _ in range(8):  # AcceleratedOptimizer, and wrappers of wrappers
        if isinstance(opt, ZOOptimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
        if opt is None:
            break
    raise TypeError(
        f"ZOTrainer needs a zo-optim optimizer (zo_optim.MeZO, ZOAdam, HiZOO, HELENE, HiSo), got "
        f"{type(optimizer).__name__}: a first-order optimizer needs the backward pass that ZOTrainer skips. "
        "Use transformers.Trainer for it, or pass zo_optimizer=... / optimizers=(zo_optim.MeZO(...), None)"
    )


def label_count(inputs: dict[str, Any], shift: bool) -> int:
    """Labels the loss of this micro-batch averages over: ``labels != -100`` (``labels[..., 1:]`` when ``shift``).

    A collator's ``shift_labels`` (padding-free collators) is counted as given.
    """
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    elif "labels" in inputs:
        labels = inputs["labels"][..., 1:] if shift else inputs["labels"]
    else:
        raise ValueError(
            "zo_loss_weighting='tokens' needs 'labels' in the batch (to count them); "
            "use zo_loss_weighting='mean' for a model that computes its loss without labels"
        )
    if not torch.is_tensor(labels):
        labels = torch.as_tensor(labels)
    return int(labels.ne(-100).sum())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every sub-module in eval mode; each one's own ``training`` flag restored afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _refuse_fp16(args: Any) -> None:
    if args is None or getattr(args, "fp16", False):
        raise ValueError(
            "ZOTrainer cannot train with fp16=True: the fp16 GradScaler unscales and checks gradients that a "
            "zeroth-order step never computes. Use bf16=True (with zo_perturbation='transient' when the weights "
            "themselves are bf16: perturbations then never round the stored weights), or full precision"
        )


def _refuse_foreign_params(opt: ZOOptimizer, model: nn.Module) -> None:
    """ValueError when the optimizer holds tensors that are not parameters of the model the Trainer trains."""
    own = {id(p) for p in model.parameters()}
    mine = [p for g in opt.param_groups for p in g["params"]]
    foreign = sum(id(p) not in own for p in mine)
    if foreign:
        raise ValueError(
            f"{foreign} of the optimizer's {len(mine)} parameters are not parameters of the model this ZOTrainer "
            f"trains (model={type(model).__name__}): they would be updated while the model's loss does not depend "
            "on them, so the model would not train. Build the optimizer over this model, "
            "e.g. zo_optim.MeZO(model.parameters(), ...) with the same model passed to ZOTrainer(model=model)"
        )


class ZOTrainerMixin:
    """Mix into ``transformers.Trainer`` (or a subclass, e.g. TRL's ``SFTTrainer``) *before* it.

    The optimizer comes from, in this order: ``optimizers=(opt, None)``;
    ``optimizer_cls_and_kwargs=(cls, kwargs)`` (a ZO class; ``lr`` defaults to
    ``args.learning_rate``); the ``zo_*`` arguments (:class:`ZOTrainingArguments`; defaults when
    the arguments are a plain ``TrainingArguments``). Anything else is refused.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if train_args is not None:  # before the Trainer builds its accelerator (and GradScaler)
            _refuse_fp16(train_args)
            force_no_clipping(train_args)
            no_gradient_checkpointing(train_args)
        super().__init__(*args, **kwargs)
        trainer: Any = self
        self.zo_settings = zo_settings(trainer.args)
        _refuse_fp16(trainer.args)
        force_no_clipping(trainer.args)
        no_gradient_checkpointing(trainer.args)
        if trainer.optimizer is None and trainer.optimizer_cls_and_kwargs is None:
            warn_unused_optim(trainer.args)  # with an optimizer passed in, args.optim is not the user's choice
        if trainer.optimizer is not None:
            opt = unwrap_zo_optimizer(trainer.optimizer)  # refuse a first-order optimizer now, not at step 1
            if trainer.model is not None:
                _refuse_foreign_params(opt, trainer.model)
        if trainer.optimizer_cls_and_kwargs is not None:
            cls = trainer.optimizer_cls_and_kwargs[0]
            if not (isinstance(cls, type) and issubclass(cls, ZOOptimizer)):
                unwrap_zo_optimizer(cls)  # raises the same TypeError
        if getattr(trainer.accelerator, "scaler", None) is not None:
            _refuse_fp16(None)
        prepare_sharded(trainer)  # a model sharded with fully_shard (FSDP2) before the Trainer: see _sharded
        self._zo_micro = 0
        self._zo_shift: bool | None = None
        self._zo_probing = False  # True while the forwards of one estimate run (compute_loss may ask)
        self._zo_probe_index = -1
        self._zo_hooks: dict[int, list[Any]] = {}  # id(model) -> handles of its restore-before-use hooks
        # first in the list: it restores θ before the other callbacks of an event run
        self._zo_callback = ZOCallback(self)
        trainer.callback_handler.callbacks.insert(0, self._zo_callback)
        self._zo_loss_watch = LossWatch(self.zo_settings["zo_loss_window"])

    # ------------------------------------------------------------------ optimizer

    @property
    def zo_optimizer(self) -> ZOOptimizer:
        """The zo-optim optimizer (unwrapped from accelerate's ``AcceleratedOptimizer``)."""
        return unwrap_zo_optimizer(self.optimizer)  # type: ignore[attr-defined]

    def _zo_optimizer_or_none(self) -> ZOOptimizer | None:
        opt = getattr(self, "optimizer", None)
        if opt is None:
            return None
        try:
            return unwrap_zo_optimizer(opt)
        except TypeError:
            return None

    def _zo_param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The Trainer's decay / no-decay split, as (name, tensor) pairs so names reach the optimizer."""
        trainer: Any = self
        decay = set(trainer.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [(n, p) for n, p in named if n in decay], "weight_decay": trainer.args.weight_decay},
            {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def _zo_default_seed(self) -> int:
        # the Trainer seeds Python's random with args.seed, so the optimizer's seed=None would not be random
        # anyway; derive it explicitly so the run is a function of args.seed
        return rng.splitmix64((int(self.args.seed) ^ _SEED_SALT) % 2**64)  # type: ignore[attr-defined]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        trainer: Any = self
        opt_model = trainer.model if model is None else model
        if trainer.optimizer is None:
            s = self.zo_settings
            cls = (trainer.optimizer_cls_and_kwargs[0] if trainer.optimizer_cls_and_kwargs is not None
                   else resolve_optimizer(s["zo_optimizer"]))
            own_lr = trainer.optimizer_cls_and_kwargs is not None and "lr" in trainer.optimizer_cls_and_kwargs[1]
            lr = None if own_lr else zo_default_lr(trainer.args, cls, opt_model)
            if lr is not None:  # the AdamW default was left: the registry's value, in args too (logs, scheduler)
                trainer.args.learning_rate = lr
            if trainer.optimizer_cls_and_kwargs is not None:
                user_kwargs = trainer.optimizer_cls_and_kwargs[1]
                kwargs: dict[str, Any] = {"lr": trainer.args.learning_rate, "seed": self._zo_default_seed(),
                                          **dict(user_kwargs)}
            else:
                kwargs = {"lr": trainer.args.learning_rate, "zo_eps": s["zo_eps"], "num_queries": s["zo_num_queries"],
                          "seed": self._zo_default_seed(), **s["zo_optimizer_kwargs"]}
                if s["zo_perturbation"] == "transient":
                    kwargs["module"] = opt_model
            trainer.optimizer = cls(self._zo_param_groups(opt_model), **kwargs)
            first_run_hints(unwrap_zo_optimizer(trainer.optimizer))
        unwrap_zo_optimizer(trainer.optimizer)
        return trainer.optimizer

    # ------------------------------------------------------------------ deferred restore

    def _zo_restore_weights(self) -> bool:
        """Bring perturbed weights back to θ (after a deferred-restore estimate), unless a probe is running.

        Returns whether a restore pass ran.
        """
        if self._zo_probing:
            return False
        opt = self._zo_optimizer_or_none()
        # refusing (after a WeightsNotRestoredError): the weights are unknown and only a checkpoint brings them back
        if opt is None or opt.refusal is not None or not opt.weights_perturbed:
            return False
        opt.restore_weights()
        return True

    def _zo_discard_pending(self) -> None:
        """After ``train()`` ended by an exception: drop the partial estimate of the step it was in (and restore θ).

        Kept, it would make the optimizer refuse ``state_dict()`` (a checkpoint folder with the model and no
        optimizer), and the next ``train()`` would fold the stale micro-batches into its first step.
        """
        opt = self._zo_optimizer_or_none()
        if opt is None or opt.pending_seed is None or opt.refusal is not None:
            return  # refusing: take_estimate would raise over the WeightsNotRestoredError the user must see
        opt.take_estimate()  # restores the weights and empties the accumulator; the step counter stays
        logger.warning(
            "zo-optim: train() stopped in the middle of step %d after %d of its micro-batches; their partial "
            "estimate is discarded (the weights are θ, the step counter stays at %d): saving works, and the next "
            "train() or resume measures that step afresh", opt.step_count + 1, self._zo_micro, opt.step_count)
        self._zo_micro = 0

    def _zo_guard(self, model: nn.Module) -> None:
        """Hooks that restore the weights before any use outside the probes: a forward, a ``state_dict()``.

        Registered for the duration of ``train()`` only, so the model handed back carries no closure of
        ours (``torch.save(model)`` pickles its hooks).
        """
        if id(model) in self._zo_hooks:
            return
        ref = weakref.ref(self)

        def restore(*_: Any) -> None:
            trainer = ref()
            if trainer is not None:
                trainer._zo_restore_weights()

        self._zo_hooks[id(model)] = [model.register_forward_pre_hook(restore),
                                     model.register_state_dict_pre_hook(restore)]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._zo_callback.reset_window()
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            self._zo_discard_pending()  # Ctrl-C between the micro-batches of one step
            raise
        finally:
            try:
                self._zo_restore_weights()  # an interrupted step leaves θ, never θ ± ε·u
            finally:  # the hooks go even if that restore fails: the model handed back carries no closure of ours
                for handles in self._zo_hooks.values():
                    for handle in handles:
                        handle.remove()
                self._zo_hooks.clear()

    # ------------------------------------------------------------------ one micro-batch

    def _zo_loss_shifts_labels(self) -> bool:
        """Whether the model's loss shifts labels (causal LM): then position 0 of each row predicts nothing.

        The Trainer's own ``_loss_shifts_labels`` looks at ``model.loss_type``, which is None for a model built
        from a config (transformers 5.24: a GPT-2 from ``GPT2Config`` was miscounted), so the model's
        ``loss_function`` and the causal-LM class table are asked too.
        """
        if self._zo_shift is None:
            trainer: Any = self
            shift = bool(getattr(trainer, "_loss_shifts_labels", False))
            model = trainer.accelerator.unwrap_model(trainer.model)
            if hasattr(model, "get_base_model"):  # PEFT
                model = model.get_base_model()
            if not shift and not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
                try:
                    from transformers.loss.loss_utils import ForCausalLMLoss

                    shift = getattr(model, "loss_function", None) is ForCausalLMLoss
                except ImportError:  # transformers < 4.46
                    pass
                if not shift:
                    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

                    shift = type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            self._zo_shift = shift
        return self._zo_shift

    def _zo_weight(self, inputs: dict[str, Any]) -> float | None:
        if self.zo_settings["zo_loss_weighting"] == "mean":
            return None
        n = label_count(inputs, shift=self._zo_loss_shifts_labels())
        if n <= 0:
            raise ValueError(
                "a micro-batch has no labels to learn from (every label is -100), so zo_loss_weighting='tokens' gives "
                "it weight 0; drop such examples from the dataset"
            )
        return float(n)

    def _zo_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """One probe: the micro-batch's own mean loss (never scaled by the Trainer's ``num_items_in_batch``)."""
        trainer: Any = self
        self._zo_probe_index += 1  # which forward of this micro-batch is running (subclasses read it)
        with self.compute_loss_context_manager():  # type: ignore[attr-defined]
            # a shallow copy per probe: Trainer.compute_loss pops "labels" when label smoothing or a
            # compute_loss_func is set, which left the second probe without labels (an error, or a loss
            # function called with labels=None)
            loss = trainer.compute_loss(model, copy.copy(inputs), num_items_in_batch=None)
        if trainer.args.n_gpu > 1 and loss.dim() > 0:
            loss = loss.mean()  # torch.nn.DataParallel returns one loss per device
        return loss

    def _zo_closure(self, model: nn.Module, inputs: dict[str, Any], opt: ZOOptimizer) -> Callable[[], torch.Tensor]:
        if self.zo_settings["zo_dropout"] == "off":
            return lambda: self._zo_loss(model, inputs)
        # "shared": the same masks in every probe of this micro-batch (and on every rank), independent masks for
        # different micro-batches and steps; forked so the Trainer's own RNG stream does not move
        mask_seed = rng.splitmix64(opt.current_seed ^ self._zo_micro)
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})

        def closure() -> torch.Tensor:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(mask_seed)
                return self._zo_loss(model, inputs)

        return closure

    def _zo_probes(self, run: Callable[[], torch.Tensor], model: nn.Module) -> torch.Tensor:
        """Run ``run`` (the estimate); with dropout "off", in eval mode with ``training`` flags restored after."""
        if self.zo_settings["zo_dropout"] == "off":
            with _eval_mode(model):
                return run()
        return run()

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One micro-batch: ``opt.estimate(closure, weight=...)``; the Trainer's ``optimizer.step()`` applies it.

        ``num_items_in_batch`` is not used (see the module docstring). Returns the loss estimate divided by the
        number of micro-batches of this step, which is how the Trainer sums it into the logged ``loss``.
        """
        trainer: Any = self
        model.train()
        opt = self.zo_optimizer
        if opt.pending_seed is None:
            self._zo_micro = 0
        inputs = trainer._prepare_inputs(inputs)
        weight = self._zo_weight(inputs)
        closure = self._zo_closure(model, inputs, opt)
        self._zo_guard(trainer.model)
        self._zo_probe_index, self._zo_probing = -1, True
        try:
            loss = self._zo_probes(lambda: opt.estimate(closure, weight=weight, restore=False), model)
        finally:
            self._zo_probing = False
        self._zo_micro += 1
        steps = getattr(trainer, "current_gradient_accumulation_steps", None)
        steps = steps or trainer.args.gradient_accumulation_steps
        return (loss.detach().float() / steps).to(trainer.args.device)

    # ------------------------------------------------------------------ logging

    # ------------------------------------------------------------------ resume

    # A model sharded by fully_shard: the model gathered to rank 0 (a plain HF checkpoint), the optimizer's
    # shards written by every rank with torch.distributed.checkpoint (see _sharded)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        trainer: Any = self
        if not _sharded.is_sharded(trainer.model):
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        _sharded.save_model(trainer, output_dir if output_dir is not None else trainer.args.output_dir)
        if trainer.args.push_to_hub and not _internal_call:
            trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        trainer: Any = self
        if not _sharded.is_sharded(trainer.model):
            return super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        _sharded.save_optimizer_and_scheduler(trainer, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        trainer: Any = self
        if model is None and _sharded.is_sharded(trainer.model):
            return _sharded.load_model(trainer, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        trainer: Any = self
        if checkpoint is not None and _sharded.is_sharded(trainer.model):
            _sharded.load_optimizer_and_scheduler(trainer, checkpoint)
        else:
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if checkpoint is not None:
            trainer: Any = self
            step_from_trainer_state(self.zo_optimizer, trainer.lr_scheduler, checkpoint)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        # no gradients exist: log no grad_norm at all rather than the 0.0 of empty .grad fields
        return None

    def _clip_grad_norm(self, model: nn.Module) -> None:
        return None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):  # a training log
            logs.pop("grad_norm", None)
            try:
                opt = self.zo_optimizer
            except TypeError:
                opt = None
            if opt is not None:
                cb = self._zo_callback
                if cb.g_steps:  # the mean over the steps of this logging window, like "loss"
                    logs["zo/projected_grad"] = cb.g_sum / cb.g_steps
                    logs["zo/projected_grad_abs"] = cb.g_abs_sum / cb.g_steps
                cb.reset_window()
                logs["zo/skipped_steps"] = float(opt.skipped_steps)
                logs["zo/step"] = float(opt.step_count)
            self._zo_loss_watch.add(int(self.state.global_step), float(logs["loss"]))  # type: ignore[attr-defined]
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class ZOTrainer(ZOTrainerMixin, Trainer):
    """``transformers.Trainer`` with a zeroth-order optimizer: forward passes only (see :class:`ZOTrainerMixin`)."""
