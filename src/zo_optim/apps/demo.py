"""``zo-optim demo``: fine-tune the packaged all-MiniLM-L6-v2 on tweet sentiment with a ZO optimizer.

Everything comes from installed packages (:mod:`zo_optim.apps.assets`); nothing is downloaded.
The run prints the held-out accuracy before and after training, steps/s and peak memory,
and writes ``loss_curve.png``, ``losses.csv`` and ``summary.json`` to ``--out``.

How the work is split (why the default run fits in a few minutes on 2 CPU cores):

* the classifier is the encoder, attention-masked mean pooling (how all-MiniLM-L6-v2 was
  trained, so the pooled vector is a good sentence feature from the start) and a fresh linear head;
* the encoder layers that do not train form a frozen prefix: their output is computed once
  per example (training pool and held-out set) and cached, so every ZO forward runs only the
  trainable suffix. With ``--train head`` a step then costs two head evaluations instead of two
  full encoder passes, and the run is dominated by encoding the examples once.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from ..optim.registry import OPTIMIZERS, decays_lr, optimizer_class, recommended_kwargs, recommended_lr
from . import assets
from .common import (
    TRAIN_MODES,
    Cached,
    encode_cached,
    peak_memory_mb,
    positive_float,
    positive_int,
    select_trainable,
    serial_numba,
)

#: forward passes a default run spends: 2000 steps of a 2-forward step (MeZO's central difference)
DEFAULT_FORWARDS = 4000
#: steps of a default ``--train lora`` run (the Trainer needs them before the first step)
DEFAULT_LORA_STEPS = 2000


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:  # the help text says what None means
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo-optim demo",
        description="Fine-tune the packaged all-MiniLM-L6-v2 as a tweet sentiment classifier (negative / positive) "
        "with a zeroth-order optimizer: forward passes only, no backward. Offline: model and tweets come from "
        "installed packages.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="mezo", help="zeroth-order optimizer")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"optimizer steps (default: as many as spend {DEFAULT_FORWARDS} forward passes, counted on the "
                        f"first step: 2000 for a 2-forward step, 445 for ZOAdam's 9 with --train last-k; "
                        f"{DEFAULT_LORA_STEPS} with --train lora)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: per optimizer and --train; the table is in docs/demo.md)")
    p.add_argument("--lr-schedule", choices=("recommended", "constant", "linear"), default="recommended",
                   help="the lr: constant, or decayed linearly to 0 over the run (lr_decay_steps); 'recommended': "
                        "the registry's for this --optimizer and --train (docs/demo.md)")
    p.add_argument("--zo-eps", type=positive_float, default=1e-3, help="perturbation scale ε")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per step")
    p.add_argument("--train", choices=TRAIN_MODES, default="head",
                   help="what trains: the linear head, the last --k encoder layers + head, every parameter, "
                        "or LoRA adapters (peft) through ZOTrainer")
    p.add_argument("--k", type=positive_int, default=1, help="encoder layers trained with --train last-k")
    p.add_argument("--train-examples", type=positive_int, default=2000,
                   help="size of the (class-balanced) training pool; batches are drawn from it epoch by epoch")
    p.add_argument("--eval-examples", type=positive_int, default=1000, help="held-out examples (class-balanced)")
    p.add_argument("--max-len", type=positive_int, default=64, help="tokens per tweet (longer ones are cut)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--backend", choices=("auto", "triton", "cpu", "chunked", "reference"), default="auto",
                   help="zo-optim kernel backend")
    p.add_argument("--seed", type=int, default=0, help="seed of the head init, batch order and perturbations")
    p.add_argument("--out", type=Path, default=Path("zo-optim-demo"), help="directory for the plot and the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-memory-probe", action="store_true",
                   help="skip measuring one ZO step and one backprop step in fresh processes (saves ~10 s)")
    return p


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"Invalid device: {name!r} ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {name!r} (CUDA is not available here; use --device cpu)")
    return device


def _logits(model: assets.SentenceClassifier, x: torch.Tensor, mask: torch.Tensor | None, start: int) -> torch.Tensor:
    if mask is None:  # cached pooled vectors: only the head is left
        return model.head(x)
    hidden = model.features(x, mask, stop=0) if start == 0 else x
    return model.classify(hidden, mask, start=start)


def evaluate(model, data: Cached, start: int, device: torch.device, batch_size: int = 128) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on cached examples."""
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x, mask, y = data.batch(torch.arange(i, min(i + batch_size, len(data))), device)
            logits = _logits(model, x, mask, start).float()
            correct += int((logits.argmax(-1) == y).sum())
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
    n = len(data)
    return correct / n, total_loss / n


def train_loop(model: assets.SentenceClassifier, opt: torch.optim.Optimizer, train: Cached, start: int,
               steps: int | None, batch_size: int, seed: int, device: torch.device, desc: str = "training",
               progress: bool = True, *, forwards: int = DEFAULT_FORWARDS, decay: bool = False
               ) -> tuple[list[float], int]:
    """ZO steps on batches drawn epoch by epoch from ``train`` (reshuffled each epoch); (the losses, the forward
    passes spent). ``steps`` None: as many as spend ``forwards``, with the forwards of a step counted on the first.
    ``decay``: the lr decays linearly to 0 over the run (each group's ``lr_decay_steps`` = the steps, set after
    the first step, whose lr does not depend on it)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(train), generator=gen), 0
    losses: list[float] = []
    counted = [0]
    total = steps if steps is not None else 1
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        step = 0
        while step < total:
            if cursor + batch_size > len(order):  # next epoch
                order, cursor = torch.randperm(len(train), generator=gen), 0
            x, mask, y = train.batch(order[cursor : cursor + batch_size], device)
            cursor += batch_size

            def closure(x=x, mask=mask, y=y) -> torch.Tensor:
                counted[0] += 1
                return F.cross_entropy(_logits(model, x, mask, start).float(), y)

            losses.append(float(opt.step(closure)))  # the one host sync per step: the loss for the curve
            if step == 0:
                total = steps if steps is not None else math.ceil(forwards / counted[0])
                bar.total = total
                if decay:
                    for group in opt.param_groups:
                        group["lr_decay_steps"] = total
            step += 1
            bar.update(1)
            if step % 20 == 1 or step == total:
                recent = losses[-50:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return losses, counted[0]


def _train_cached(args: argparse.Namespace, opt_cls: type, lr: float, device: torch.device,
                  progress: bool, options: dict[str, Any], decay: bool) -> dict[str, Any]:
    """The cached-prefix modes (head, last-k, all): frozen layers run once per example, ZO steps on the rest."""
    data = assets.load_tweet_sentiment(n_train=args.train_examples, n_eval=args.eval_examples, seed=0)
    tokenizer = assets.load_minilm_tokenizer()
    model = assets.load_minilm_classifier(num_labels=len(assets.LABELS), seed=args.seed)
    start = select_trainable(model, args.train, args.k)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    t0 = time.perf_counter()
    train = encode_cached(model, tokenizer, data.train_texts, data.train_labels, start, args.max_len, device,
                           "encoding training tweets", progress)
    held_out = encode_cached(model, tokenizer, data.eval_texts, data.eval_labels, start, args.max_len, device,
                              "encoding held-out tweets", progress)
    encode_s = time.perf_counter() - t0

    acc_before, loss_before = evaluate(model, held_out, start, device)
    print(f"held-out accuracy before: {acc_before:.1%} ({len(held_out)} tweets, loss {loss_before:.3f})")

    opt = opt_cls(params, lr=lr, zo_eps=args.zo_eps, seed=args.seed, backend=args.backend, **options)
    t0 = time.perf_counter()
    losses, forwards = train_loop(model, opt, train, start, args.steps, args.batch_size, args.seed, device,
                                  desc=f"{OPTIMIZERS[args.optimizer].__name__} ({args.train})", progress=progress,
                                  decay=decay)
    train_s = time.perf_counter() - t0

    acc_after, loss_after = evaluate(model, held_out, start, device)

    return {"acc_before": acc_before, "loss_before": loss_before, "acc_after": acc_after, "loss_after": loss_after,
            "losses": losses, "forwards": forwards, "n_trainable": n_trainable, "train_s": train_s,
            "encode_s": encode_s,
            "train_examples": len(train), "eval_examples": len(held_out)}


def _one_step_peaks(args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """Peak memory of one ZO step and of one backprop step, each in a fresh process: through the whole model
    (every parameter trained: what a forward-only step is for) and, beside it, in the run's own ``--train`` mode.

    Skipped (None) with ``--no-memory-probe``: it costs up to four extra interpreter starts and model loads.
    """
    if args.no_memory_probe:
        return None
    from .step_memory import measure_in_fresh_process

    common = {"batch_size": args.batch_size, "max_len": args.max_len, "k": args.k, "device": str(device),
              "seed": args.seed}

    def pair(train: str) -> dict[str, dict[str, float]]:
        # the run's backend: numba's runtime is part of what the cpu backend costs (~100 MiB), chunked has none
        return {"zo": measure_in_fresh_process("zo", train, optimizer=args.optimizer, backend=args.backend, **common),
                "backprop": measure_in_fresh_process("backprop", train, **common)}

    whole = pair("all")
    return {"whole_model": whole, "this_run": whole if args.train == "all" else pair(args.train)}


def _step_peaks_line(peaks: dict[str, Any] | None, args: argparse.Namespace) -> str:
    if peaks is None:
        return "one-step peak memory: not measured (--no-memory-probe)"
    name = OPTIMIZERS[args.optimizer].__name__

    def figures(pair: dict[str, dict[str, float]]) -> str:
        key = "peak_cuda_allocated_mb" if "peak_cuda_allocated_mb" in pair["zo"] else "peak_rss_mb"
        zo, bp = pair["zo"][key], pair["backprop"][key]
        return f"{name} {zo:.0f} MiB vs backprop + AdamW {bp:.0f} MiB ({zo / bp:.2f}x)"

    whole, own = peaks["whole_model"], peaks["this_run"]
    what = "CUDA allocated" if "peak_cuda_allocated_mb" in whole["zo"] else "process RSS high-water mark"
    n_all = int(whole["zo"].get("trainable_params", 0))
    line = (f"one step training the whole model ({n_all / 1e6:.1f}M parameters, batch {args.batch_size}, fresh "
            f"process each, {what}): {figures(whole)}")
    if args.train != "all":
        n_own = int(own["zo"].get("trainable_params", 0))
        line += f"\n  this run's {args.train} ({n_own:,} parameters), the same probe: {figures(own)}"
    return line


def _plot(losses: list[float], path: Path, title: str, eval_loss: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.6, alpha=0.35, color="tab:blue", label="training loss (batch)")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1 :], smooth, lw=1.8, color="tab:blue", label=f"moving mean ({window} steps)")
    ax.scatter([0, len(losses)], list(eval_loss), color="tab:red", zorder=3, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    assets.set_offline()  # before transformers / huggingface_hub are imported: never the network
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    progress = not args.no_progress
    device = _resolve_device(args.device)
    try:  # fail before loading the model and encoding the tweets, with the backend's own reason
        ops.resolve_backend(args.backend, device)
    except RuntimeError as exc:
        raise ValueError(f"--backend {args.backend}: {exc}") from exc
    if device.type == "cpu" and args.train == "head":
        serial_numba()
    torch_threads = torch.get_num_threads()
    opt_cls = optimizer_class(args.optimizer)
    name = opt_cls.__name__  # as the summary and the plot title spell it
    use = f"demo/{args.train}"
    lr = args.lr if args.lr is not None else recommended_lr(opt_cls, use)
    # the registry's other settings for this use (e.g. ZOAdam's q = 8 forward differences for last-k) stay with --lr
    options = {k: v for k, v in recommended_kwargs(opt_cls, use).items() if k != "lr"}
    decay = decays_lr(opt_cls, use) if args.lr_schedule == "recommended" else args.lr_schedule == "linear"
    t_start = time.perf_counter()

    if args.train == "lora":  # the Hugging Face path: peft adapters, the stock Trainer loop, ZOTrainer
        from . import demo_lora

        if args.steps is None:
            args.steps = DEFAULT_LORA_STEPS
        r = demo_lora.train(args, lr, device, progress, options, decay)
    else:
        r = _train_cached(args, opt_cls, lr, device, progress, options, decay)
    acc_before, loss_before, acc_after, loss_after = r["acc_before"], r["loss_before"], r["acc_after"], r["loss_after"]
    losses, n_trainable, train_s, encode_s = r["losses"], r["n_trainable"], r["train_s"], r["encode_s"]
    steps = len(losses)
    total_s = time.perf_counter() - t_start
    print(f"held-out accuracy after:  {acc_after:.1%} (loss {loss_after:.3f})")
    step_peaks = _one_step_peaks(args, device)

    args.out.mkdir(parents=True, exist_ok=True)
    png, csv_path, json_path = args.out / "loss_curve.png", args.out / "losses.csv", args.out / "summary.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows((i + 1, f"{v:.6g}") for i, v in enumerate(losses))
    schedule = "linear decay" if decay else "constant"
    title = (f"{name} on all-MiniLM-L6-v2, train={args.train}, lr={lr:g} ({schedule}), bs={args.batch_size}: "
             f"held-out acc {acc_before:.1%} → {acc_after:.1%}")
    _plot(losses, png, title, (loss_before, loss_after))
    summary = {
        "optimizer": name,
        "train": args.train,
        "k": args.k if args.train == "last-k" else None,
        "trainable_params": n_trainable,
        "lr": lr,
        "lr_schedule": schedule,
        "options": options,
        "zo_eps": args.zo_eps,
        "batch_size": args.batch_size,
        "steps": steps,
        "forwards": r["forwards"],
        "seed": args.seed,
        "backend": args.backend,
        "device": str(device),
        "train_examples": r["train_examples"],
        "eval_examples": r["eval_examples"],
        "max_len": args.max_len,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "final_train_loss_mean_50": sum(losses[-50:]) / len(losses[-50:]),
        "steps_per_s": steps / train_s,
        "train_s": train_s,
        "encode_s": encode_s,
        "total_s": total_s,
        **peak_memory_mb(device),
        "one_step_peak_mb": step_peaks,
        "torch_threads": torch_threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "files": {"loss_curve": str(png), "losses": str(csv_path), "summary": str(json_path)},
    }
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    peaks = peak_memory_mb(device).items()
    mem = ", ".join(f"{k.removeprefix('peak_').removesuffix('_mb')} {v:.0f} MiB" for k, v in peaks)
    print(
        f"\n{name} trained {n_trainable:,} parameters ({args.train}) for {steps} steps ("
        f"{'' if r['forwards'] is None else str(r['forwards']) + ' forward passes, '}"
        f"lr {lr:g}, {schedule}{''.join(f', {k}={v}' for k, v in options.items())}) "
        f"in {train_s:.1f} s ({summary['steps_per_s']:.1f} steps/s); whole run {total_s:.1f} s on {device}.\n"
        f"held-out accuracy {acc_before:.1%} -> {acc_after:.1%}; peak memory of this run: {mem}.\n"
        f"{_step_peaks_line(step_peaks, args)}\n"
        f"loss curve: {png}\nlosses:     {csv_path}\nsummary:    {json_path}"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.train == "last-k" and args.k > 6:  # MiniLM-L6; select_trainable re-checks against the loaded model
        parser.error(f"argument --k: invalid value {args.k} (all-MiniLM-L6-v2 has 6 layers; use 1 <= --k <= 6)")
    try:
        run(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"zo-optim demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
