"""``zo-optim bench finetune``: a real fine-tune through ``transformers.Trainer``: accuracy, memory.

The packaged all-MiniLM-L6-v2 (22.7M parameters) on the packaged tweet sentiment task, LoRA (peft) and
full-parameter, every zo-optim optimizer (at the lr its class recommends for the mode,
``finetune/<mode>``, and, with ``--lr-grid``, a small grid) through
:class:`~zo_optim.integrations.hf.ZOTrainer`, and first-order AdamW with backprop on the same Trainer
as the reference. Each (config, seed) runs in a fresh process, so peak-memory high-water marks never
mix: process RSS high-water mark on CPU, the CUDA allocator's peak on GPU. Each worker also records
its peak right after one inference-only forward of a training batch (before any training step), the
"inference" baseline of the same process.

Output (``--out``): ``finetune.csv`` (long format, :mod:`zo_optim.bench.report`), ``finetune.png``
(held-out accuracy vs forwards and vs wall-clock, mean over seeds), ``env.json``; the terminal shows
mean ± std over seeds. Forwards count forward passes of the model; a backprop step counts as
1 forward + 2 (its backward).

The default size finishes in seconds-to-a-minute (CI); ``--full`` is the recorded run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..optim import registry
from . import report
from ._worker import emit, run_worker

OPTIMIZERS = tuple(registry.OPTIMIZERS)  # every registered ZO optimizer, by its registry name
MODES = ("lora", "full")
# The default lr per mode and ZO optimizer is its class's recommended "finetune/<mode>" lr: the best held-out
# mean of 3 seeds at the --full size among the lrs recorded (LoRA 1e-3 / 1e-2, full 1e-5 / 3e-4;
# benchmarks/results/2026-12-04-cpu-minilm-finetune-full-size/ and …-tuned-lr/; chosen on the held-out set they
# are reported on). MeZO at full 1e-3 and LoRA 3e-2 diverged.
# and for the AdamW reference
ADAMW_LR = {"lora": 1e-3, "full": 5e-5}
LR_GRID = (0.3, 3.0)  # multipliers of the default with --lr-grid
Curves = dict[str, tuple[list[float], list[float], list[float]]]  # label -> (forwards, mean seconds, mean accuracy)


def _peak_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    from ..apps.common import peak_rss_mb  # VmHWM: ru_maxrss would carry the parent's peak across fork + exec

    return peak_rss_mb()


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One (mode, optimizer, lr, seed) run in this process; returns its curve and peaks."""
    from ..apps import assets

    assets.set_offline()
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from ..integrations.hf import ZOTrainer, ZOTrainingArguments

    torch.set_num_threads(cfg["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = assets.load_minilm_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(str(assets.minilm_path()), num_labels=2,
                                                               local_files_only=True)
    if cfg["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                 target_modules=["query", "value"]))
    split = assets.load_tweet_sentiment(n_train=cfg["train_examples"], n_eval=cfg["eval_examples"], seed=0)

    def rows(texts, labels):
        enc = tok(list(texts), truncation=True, max_length=cfg["max_len"])
        return [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)]

    train, held_out = rows(split.train_texts, split.train_labels), rows(split.eval_texts, split.eval_labels)
    collate = DataCollatorWithPadding(tok)
    model.to(device).eval()
    with torch.no_grad():  # the inference baseline: this process's peak after one forward, before training
        model(**{k: v.to(device) for k, v in collate(train[: cfg["batch_size"]]).items()})
    inference_peak = _peak_mib(device)

    import numpy as np

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    forwards = {"n": 0, "on": False}
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + forwards["on"]))
    curve: list[tuple[int, float, float]] = []

    class Track(TrainerCallback):
        train_s = 0.0
        t0 = 0.0

        def on_step_begin(self, *a, **k):
            forwards["on"], self.t0 = True, time.perf_counter()

        def on_step_end(self, *a, **k):
            forwards["on"] = False
            self.train_s += time.perf_counter() - self.t0

        def on_evaluate(self, args, state, control, metrics=None, **k):
            curve.append((forwards["n"], self.train_s, float(metrics["eval_accuracy"])))

    # evaluate at the training batch size: the inference mark above is one forward of a training batch, and
    # an evaluation at 64 raised the MeZO run's high-water mark ~40 MiB above its training peak (MiniLM 16x32,
    # `zo-optim bench memory --eval-batch-size 64`), a cost the inference mark it is compared with never pays
    common = dict(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch_size"],
                  per_device_eval_batch_size=cfg["batch_size"], learning_rate=cfg["lr"], lr_scheduler_type="constant",
                  eval_strategy="steps", eval_steps=cfg["eval_every"], logging_strategy="no", save_strategy="no",
                  report_to=[], use_cpu=device == "cpu", disable_tqdm=True, seed=cfg["seed"])
    kw = dict(model=model, train_dataset=train, eval_dataset=held_out, data_collator=collate,
              compute_metrics=accuracy, callbacks=[Track()])
    if cfg["optimizer"] == "adamw":
        trainer = Trainer(args=TrainingArguments(**common, optim="adamw_torch", weight_decay=0.0), **kw)
        per_step = 3  # forward + backward (≈ 2 forwards)
    else:
        trainer = ZOTrainer(args=ZOTrainingArguments(**common, zo_optimizer=cfg["optimizer"], zo_eps=1e-3,
                                                     zo_loss_weighting="tokens"), **kw)
        per_step = None
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    if per_step is not None:  # backprop: count the backward as 2 forwards
        curve = [(n * per_step, s, a) for n, s, a in curve]
    return {"curve": curve, "inference_peak_mib": inference_peak, "train_peak_mib": _peak_mib(device),
            "wall_s": wall, "device": device}


def _configs(modes, optimizers, lr_grid: bool, zo_lrs: list[float] | None = None) -> list[tuple[str, str, float]]:
    out = []
    for mode in modes:
        for name in optimizers:
            base = zo_lrs or [registry.recommended_lr(name, f"finetune/{mode}")]
            lrs = base + ([lr * m for lr in base for m in LR_GRID] if lr_grid else [])
            out += [(mode, name, lr) for lr in lrs]
        out.append((mode, "adamw", ADAMW_LR[mode]))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--lr-grid", action="store_true", help=f"also lr × {LR_GRID}")
    p.add_argument("--zo-lr", type=float, nargs="+", default=None, metavar="LR",
                   help="the ZO optimizers' lr(s) instead of their per-mode defaults (each class's recommended; AdamW "
                        f"keeps {ADAMW_LR})")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=None, help="default: steps // 4")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-examples", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--full", action="store_true",
                   help="the real size: 3 seeds, 300 steps, 1000 train / 500 held out")
    p.add_argument("--out", type=Path, default=Path("bench-finetune"))
    p.add_argument("--replot", type=Path, metavar="DIR",
                   help="only redraw DIR's PNGs from the finetune.csv a run wrote there (no training)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.worker:
        emit(worker(json.loads(a.worker)))
        return 0
    if a.replot:
        plot(a.replot, curves_from_csv(a.replot / "finetune.csv"))
        return 0
    for lr in a.zo_lr or ():
        if not (lr > 0 and lr < float("inf")):
            raise ValueError(f"Invalid --zo-lr: {lr} (must be a finite number > 0)")
    if a.full:
        a.seeds, a.steps, a.train_examples, a.eval_examples = 3, 300, 1000, 500
    eval_every = a.eval_every or max(1, a.steps // 4)
    env = report.environment(argv=sys.argv if argv is None else ["zo-optim", "bench", "finetune", *argv])
    rows: list[report.Row] = []
    table = []
    for mode, name, lr in _configs(a.modes, a.optimizers, a.lr_grid, a.zo_lr):
        label = f"{mode}/{name}/lr={lr:g}"
        results = []
        for seed in range(a.seeds):
            cfg = dict(mode=mode, optimizer=name, lr=lr, seed=seed, steps=a.steps, eval_every=eval_every,
                       batch_size=a.batch_size, train_examples=a.train_examples, eval_examples=a.eval_examples,
                       max_len=a.max_len, threads=a.threads, out=str(a.out / "runs" / f"{mode}-{name}-{lr:g}-{seed}"))
            results.append(run_worker("zo_optim.bench.finetune", cfg, f"bench finetune worker {label} seed {seed}",
                                      dict(os.environ, **_offline())))
        for r in results:
            for n, s, acc in r["curve"]:
                rows.append(report.Row(label, mode, "held_out_accuracy", "fraction", n, acc))
                rows.append(report.Row(label, mode, "train_seconds", "s", n, s))
        acc = report.mean_std([r["curve"][-1][2] for r in results])
        inf = report.mean_std([r["inference_peak_mib"] for r in results])
        peak = report.mean_std([r["train_peak_mib"] for r in results])
        wall = report.mean_std([r["wall_s"] for r in results])
        fwd = results[0]["curve"][-1][0]
        for metric, unit, (m, _) in (("final_accuracy", "fraction", acc), ("peak_memory", "MiB", peak),
                                     ("inference_peak_memory", "MiB", inf), ("wall_clock", "s", wall)):
            rows.append(report.Row(label, mode, metric, unit, fwd, m))
        table.append([mode, name, lr, f"{acc[0]:.3f} ± {acc[1]:.3f}", fwd, f"{wall[0]:.0f} ± {wall[1]:.0f}",
                      f"{peak[0]:.0f}", f"{inf[0]:.0f}", peak[0] / inf[0]])
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(a.out / "finetune.csv", rows, env)
    report.write_environment(a.out / "env.json", env, **{k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(a).items() if k != "worker"})
    # peak vs the AdamW run of the same mode
    adamw = {t[0]: float(t[6]) for t in table if t[1] == "adamw"}
    headers = ["mode", "optimizer", "lr", "accuracy", "forwards", "wall s", "peak MiB", "inference MiB",
               "peak/inference", "peak/AdamW"]
    table = [[*t, float(t[6]) / adamw[t[0]] if t[0] in adamw else float("nan")] for t in table]
    print(report.format_table(headers, table, digits=3,
                              title=f"bench finetune ({a.seeds} seeds, {a.steps} steps, batch {a.batch_size}; "
                                    f"{env.device})"))
    plot(a.out, curves_from_csv(a.out / "finetune.csv"))  # the CSV is the one source of the plotted means
    return 0


def plot(out: Path, curves: Curves) -> None:
    """``finetune_forwards.png`` and ``finetune_wallclock.png``: one colour per optimizer, solid LoRA, dashed full."""
    names = (*OPTIMIZERS, "adamw")
    styles = {label: {"color": f"C{names.index(label.split('/')[1]) % 10}",
                      "linestyle": "-" if label.startswith("lora/") else "--"} for label in curves}
    try:
        report.plot_lines(out / "finetune_forwards.png", {k: (v[0], v[2]) for k, v in curves.items()}, styles=styles,
                          title="held-out accuracy vs forwards", xlabel="forward passes", ylabel="accuracy")
        report.plot_lines(out / "finetune_wallclock.png", {k: (v[1], v[2]) for k, v in curves.items()}, styles=styles,
                          title="held-out accuracy vs training seconds", xlabel="seconds", ylabel="accuracy")
    except ImportError:
        print("(matplotlib not installed: no PNG)")


def curves_from_csv(path: Path) -> Curves:
    """The plotted curves (means over seeds at each evaluation) from a ``finetune.csv`` this command wrote."""
    acc: dict[str, dict[float, list[float]]] = {}
    secs: dict[str, dict[float, list[float]]] = {}
    for r in report.read_csv(path):
        into = {"held_out_accuracy": acc, "train_seconds": secs}.get(r["metric"])
        if into is not None:
            into.setdefault(r["name"], {}).setdefault(float(r["x"]), []).append(r["value"])
    out: Curves = {}
    for label, by_x in acc.items():
        xs = sorted(by_x)
        out[label] = (xs, [sum(secs[label][x]) / len(secs[label][x]) for x in xs],
                      [sum(by_x[x]) / len(by_x[x]) for x in xs])
    return out


def _offline() -> dict[str, str]:
    from ..apps import assets

    return assets.offline_env()


if __name__ == "__main__":
    sys.exit(main())
