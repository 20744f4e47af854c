"""``zo-optim demo --train lora``: LoRA adapters on the packaged MiniLM, trained through ``ZOTrainer``.

This is the path users take: a Hugging Face model, ``peft.get_peft_model`` and a stock
``Trainer`` loop with the optimizer swapped for a zo-optim one (:mod:`zo_optim.integrations.hf`).
Unlike the cached-prefix modes of :mod:`zo_optim.apps.demo`, every ZO forward runs the whole encoder
(LoRA adapters sit in every layer's query and value projections), so a step costs two full forwards.
Needs ``pip install "zo-optim[demo,peft]"``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch

from . import assets

LORA_TARGETS = ["query", "value"]


def build_lora_model(seed: int, rank: int = 8) -> torch.nn.Module:
    """The packaged all-MiniLM-L6-v2 as a 2-class ``BertForSequenceClassification`` with LoRA adapters.

    Only the adapters and the (fresh, ``seed``-initialised) classifier head train.
    """
    assets.set_offline()
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification
    except ImportError as exc:
        hint = 'pip install "zo-optim[demo,peft]"'
        raise ImportError(f"--train lora needs peft and transformers: {hint} ({exc})") from exc
    torch.manual_seed(seed)  # the head's init; the encoder weights are the packaged ones
    model = AutoModelForSequenceClassification.from_pretrained(
        str(assets.minilm_path()), num_labels=len(assets.LABELS), local_files_only=True
    )
    config = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5.24 API deprecated in favour of another
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


class _Tweets(torch.utils.data.Dataset):
    def __init__(self, tokenizer: Any, texts: list[str], labels: list[int], max_len: int) -> None:
        self.enc = tokenizer(list(texts), truncation=True, max_length=max_len)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


def train(args: argparse.Namespace, lr: float, device: torch.device, progress: bool,
          options: dict[str, Any] | None = None, decay: bool = False) -> dict[str, Any]:
    """Fine-tune with ``ZOTrainer``; the numbers :func:`zo_optim.apps.demo.run` reports for every mode.
    ``options``: optimizer keywords beyond the lr; ``decay``: the Trainer's linear schedule instead of a constant lr."""
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding, TrainerCallback

    from ..integrations.hf import ZOTrainer, ZOTrainingArguments
    from ..optim.registry import optimizer_class

    losses: list[float] = []

    class Recording(ZOTrainer):  # the per-step loss for the curve, without the Trainer's per-step log lines
        def training_step(self, *a: Any, **kw: Any) -> torch.Tensor:
            loss = super().training_step(*a, **kw)
            losses.append(float(loss))
            return loss

    class Bar(TrainerCallback):
        def __init__(self) -> None:
            name = optimizer_class(args.optimizer).__name__
            self.bar = tqdm(total=args.steps, desc=f"{name} (lora, ZOTrainer)", unit="step", disable=not progress)

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            self.bar.update(1)
            recent = losses[-50:]
            if recent:
                self.bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")

        def on_train_end(self, *a: Any, **kw: Any) -> None:
            self.bar.close()

    t0 = time.perf_counter()
    data = assets.load_tweet_sentiment(n_train=args.train_examples, n_eval=args.eval_examples, seed=0)
    tokenizer = assets.load_minilm_tokenizer()
    model = build_lora_model(args.seed)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_set = _Tweets(tokenizer, data.train_texts, data.train_labels, args.max_len)
    held_out = _Tweets(tokenizer, data.eval_texts, data.eval_labels, args.max_len)
    encode_s = time.perf_counter() - t0

    def accuracy(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    # dataloader_drop_last stays False: True also drops a held-out set smaller than one eval batch.
    training_args = ZOTrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=lr, lr_scheduler_type="linear" if decay else "constant",
        weight_decay=0.0,
        logging_steps=args.steps, save_strategy="no", report_to=[], disable_tqdm=True, seed=args.seed,
        use_cpu=device.type == "cpu",
        zo_optimizer=args.optimizer, zo_eps=args.zo_eps, zo_loss_weighting="mean",
        zo_optimizer_kwargs={**(options or {}), "backend": args.backend},
    )
    trainer = Recording(model=model, args=training_args, train_dataset=train_set, eval_dataset=held_out,
                        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                        callbacks=[Bar()])
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the demo prints its own summary
    before = trainer.evaluate()
    print(f"held-out accuracy before: {before['eval_accuracy']:.1%} ({len(held_out)} tweets, "
          f"loss {before['eval_loss']:.3f})")
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    after = trainer.evaluate()
    return {
        "acc_before": before["eval_accuracy"], "loss_before": before["eval_loss"],
        "acc_after": after["eval_accuracy"], "loss_after": after["eval_loss"],
        "losses": losses, "forwards": None, "n_trainable": n_trainable, "train_s": train_s, "encode_s": encode_s,
        "train_examples": len(train_set), "eval_examples": len(held_out),
    }
