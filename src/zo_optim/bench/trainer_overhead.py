"""``zo-optim bench trainer-overhead``: a ZOTrainer step against the raw ``opt.step(closure)`` loop.

The same packaged MiniLM (LoRA or full), the same zo-optim optimizer and settings, the same fixed-shape
batches (padded to ``--max-len``, so every step costs the same forwards): once through
:class:`~zo_optim.integrations.hf.ZOTrainer` (``trainer.train()``, dataloader, callbacks, lr scheduler
and logging included) and once as ``for batch in batches: opt.step(lambda: model(**batch).loss)``.
Per-step wall time is measured from one step's start to the next (the Trainer's ``on_step_begin``
callback; the loop's own clock), the first ``--warmup`` steps dropped. The two are interleaved
``--repeats`` times so that machine load hits both alike; the table shows medians and the ratio.
Target: Trainer ≤ 1.1× raw (docs/integrations.md).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from typing import Any

from ..optim.registry import OPTIMIZERS, optimizer_class
from . import report


def _setup(mode: str, n: int, batch_size: int, max_len: int) -> tuple[Any, list[dict[str, Any]]]:
    from transformers import AutoModelForSequenceClassification

    from ..apps import assets

    assets.set_offline()
    tok = assets.load_minilm_tokenizer()
    split = assets.load_tweet_sentiment(n_train=n * batch_size + (n * batch_size) % 2, n_eval=2, seed=0)
    enc = tok(list(split.train_texts[: n * batch_size]), truncation=True, max_length=max_len, padding="max_length")
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": split.train_labels[i]} for i in range(n * batch_size)]

    def model() -> Any:
        m = AutoModelForSequenceClassification.from_pretrained(str(assets.minilm_path()), num_labels=2,
                                                               local_files_only=True)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            m = get_peft_model(m, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                             target_modules=["query", "value"]))
        return m

    return model, rows


def _trainer_steps(make_model: Any, rows: list[dict[str, Any]], a: argparse.Namespace, out: str) -> list[float]:
    import torch
    from transformers import TrainerCallback, default_data_collator

    from ..integrations.hf import ZOTrainer, ZOTrainingArguments

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args: Any, **kw: Any) -> None:
            stamps.append(time.perf_counter())

        def on_train_end(self, *args: Any, **kw: Any) -> None:
            stamps.append(time.perf_counter())

    args = ZOTrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                               learning_rate=a.lr, lr_scheduler_type="constant", logging_steps=a.steps,
                               save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                               use_cpu=not torch.cuda.is_available(), zo_optimizer=a.optimizer, zo_eps=1e-3)
    trainer = ZOTrainer(model=make_model(), args=args, train_dataset=rows, data_collator=default_data_collator,
                        callbacks=[Clock()])
    trainer.train()
    return [b - s for s, b in itertools.pairwise(stamps)][a.warmup:]


def _raw_steps(make_model: Any, rows: list[dict[str, Any]], a: argparse.Namespace) -> list[float]:
    import torch
    from transformers import default_data_collator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = make_model().to(device)
    model.eval()  # ZOTrainer's default zo_dropout="off" runs the probes without dropout too
    cls = optimizer_class(a.optimizer)
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=a.lr, zo_eps=1e-3, seed=0)
    times = []
    for k in range(a.steps):
        t = time.perf_counter()
        batch = {key: v.to(device) for key, v in
                 default_data_collator(rows[k * a.batch_size: (k + 1) * a.batch_size]).items()}
        opt.step(lambda batch=batch: model(**batch).loss)
        times.append(time.perf_counter() - t)
    return times[a.warmup:]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench trainer-overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="mezo")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch

    a = build_parser().parse_args(argv)
    if not 0 <= a.warmup < a.steps:
        raise SystemExit(f"zo-optim bench trainer-overhead: --warmup {a.warmup} must be in [0, --steps {a.steps})")
    if a.threads:
        torch.set_num_threads(a.threads)
    make_model, rows = _setup(a.mode, a.steps, a.batch_size, a.max_len)
    raw: list[float] = []
    hf: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(a.repeats):  # interleaved: load on the machine hits both alike
            raw += _raw_steps(make_model, rows, a)
            hf += _trainer_steps(make_model, rows, a, out)
    r, t = statistics.median(raw), statistics.median(hf)
    env = report.environment()
    name = OPTIMIZERS[a.optimizer].__name__
    print(report.format_table(
        ["path", "median s/step", "steps timed"],
        [["raw opt.step(closure)", r, len(raw)], ["ZOTrainer", t, len(hf)]], digits=4,
        title=f"bench trainer-overhead ({a.mode}, {name}, batch {a.batch_size}x{a.max_len}, "
              f"{a.repeats} repeats; {env.device})"))
    print(f"ZOTrainer / raw loop: {t / r:.3f}x (target <= 1.1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
