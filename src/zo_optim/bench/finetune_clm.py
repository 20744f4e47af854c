"""``zo-optim bench finetune-clm``: a causal-LM fine-tune of pretrained weights through ``transformers.Trainer``.

There is no packaged causal LM, so the packaged all-MiniLM-L6-v2 encoder is loaded as a decoder:
``BertLMHeadModel`` with ``is_decoder=True`` (causal self-attention), its LM head's decoder tied to the
pretrained word embeddings. The six layers and the embeddings are pretrained; the head's transform (a
384×384 dense + LayerNorm, 148k parameters) is newly initialised, as in any ``from_pretrained`` of an
encoder checkpoint into an LM-head class. The task is next-token prediction on the packaged tweets (the
same deterministic split as ``bench finetune``, labels ignored), the metric the held-out loss (the
Trainer's ``eval_loss``, mean over evaluation batches of the mean token NLL) and its perplexity.

Modes: ``full`` (every parameter, 22.7M: the embeddings are shared by input and output) and ``lora``
(peft, r 8, α 16 on query/value, plus the new head transform trained whole: 222k). Each ZO optimizer runs
through :class:`~zo_optim.integrations.hf.ZOTrainer` at each lr of ``--zo-lr`` (default: the registry's
``finetune/<mode>`` value × 0.1, 1, 3), and AdamW with backprop on the same Trainer is the reference. One
run per (mode, optimizer, lr, seed), each in a fresh process; the held-out loss is recorded before training
and every ``--eval-every`` steps, so one run reads at several step budgets.

Output (``--out``): ``finetune_clm.csv`` (long format, :mod:`zo_optim.bench.report`) and ``env.json``; the
terminal shows, per config, the held-out loss before training and at each budget of ``--budgets``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..optim import registry
from . import report
from ._worker import emit, run_worker

MODES = ("full", "lora")
ADAMW_LR = {"lora": 1e-3, "full": 5e-5}  # bench finetune's reference values
LR_GRID = (0.1, 1.0, 3.0)  # multipliers of the registry's finetune/<mode> lr when --zo-lr is not given


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One (mode, optimizer, lr, seed) run in this process: the held-out loss curve [(step, loss)]."""
    from ..apps import assets

    assets.set_offline()
    import torch
    from transformers import (
        BertLMHeadModel,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from ..integrations.hf import ZOTrainer, ZOTrainingArguments

    hf_logging.set_verbosity_error()  # the "newly initialized: cls.predictions.transform" notice is expected
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])  # the new head transform's initialisation
    tok = assets.load_minilm_tokenizer()
    model = BertLMHeadModel.from_pretrained(str(assets.minilm_path()), is_decoder=True, local_files_only=True)
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight, "LM head not tied"
    if cfg["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 modules_to_save=["transform"]))
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    split = assets.load_tweet_sentiment(n_train=cfg["train_examples"], n_eval=cfg["eval_examples"], seed=0)

    def rows(texts):
        enc = tok(list(texts), truncation=True, max_length=cfg["max_len"])
        return [{"input_ids": i, "attention_mask": m} for i, m in zip(enc["input_ids"], enc["attention_mask"],
                                                                      strict=True)]

    train, held_out = rows(split.train_texts), rows(split.eval_texts)
    collate = DataCollatorForLanguageModeling(tok, mlm=False)  # labels = input_ids, padding → -100
    curve: list[tuple[int, float]] = []

    class Track(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **k):
            curve.append((state.global_step, float(metrics["eval_loss"])))

    common = dict(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch_size"],
                  per_device_eval_batch_size=cfg["batch_size"], learning_rate=cfg["lr"], lr_scheduler_type="constant",
                  eval_strategy="steps", eval_steps=cfg["eval_every"], logging_strategy="no", save_strategy="no",
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=cfg["seed"])
    kw = dict(model=model, train_dataset=train, eval_dataset=held_out, data_collator=collate, callbacks=[Track()])
    if cfg["optimizer"] == "adamw":
        trainer = Trainer(args=TrainingArguments(**common, optim="adamw_torch", weight_decay=0.0), **kw)
    else:
        trainer = ZOTrainer(args=ZOTrainingArguments(**common, zo_optimizer=cfg["optimizer"], zo_eps=1e-3,
                                                     zo_loss_weighting="tokens", zo_default_lr=False), **kw)
    trainer.evaluate()  # the loss before training (step 0)
    t = time.perf_counter()
    trainer.train()
    return {"curve": curve, "wall_s": time.perf_counter() - t, "trainable": trainable}


def _ppl(loss: float) -> str:
    """exp(loss), readable: a diverged run's loss (hundreds of nats) overflows a float."""
    return f"{math.exp(loss):.0f}" if loss < 50 else f"e^{loss:.0f}"


def _configs(modes, optimizers, zo_lrs: list[float] | None) -> list[tuple[str, str, float]]:
    out = []
    for mode in modes:
        for name in optimizers:
            base = registry.recommended_lr(name, f"finetune/{mode}")
            out += [(mode, name, lr) for lr in (zo_lrs or [base * m for m in LR_GRID])]
        out.append((mode, "adamw", ADAMW_LR[mode]))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench finetune-clm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--optimizers", nargs="+", choices=tuple(registry.OPTIMIZERS), default=["mezo"])
    p.add_argument("--zo-lr", type=float, nargs="+", default=None, metavar="LR",
                   help=f"the ZO lrs (default: each mode's finetune/<mode> lr × {LR_GRID})")
    p.add_argument("--no-adamw", action="store_true", help="skip the AdamW reference runs")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=None, help="default: steps // 2")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="steps to report (default: the last)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-examples", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--out", type=Path, default=Path("bench-finetune-clm"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.worker:
        emit(worker(json.loads(a.worker)))
        return 0
    for lr in a.zo_lr or ():
        if not (lr > 0 and lr < float("inf")):
            raise ValueError(f"Invalid --zo-lr: {lr} (must be a finite number > 0)")
    eval_every = a.eval_every or max(1, a.steps // 2)
    budgets = a.budgets or [a.steps]
    bad = [b for b in budgets if b % eval_every or not 0 < b <= a.steps]
    if bad:
        raise ValueError(f"Invalid --budgets: {bad} (multiples of --eval-every {eval_every}, at most --steps)")
    env = report.environment(argv=sys.argv if argv is None else ["zo-optim", "bench", "finetune-clm", *argv])
    from ..apps import assets

    rows: list[report.Row] = []
    table = []
    configs = [c for c in _configs(a.modes, a.optimizers, a.zo_lr) if not (a.no_adamw and c[1] == "adamw")]
    for mode, name, lr in configs:
        label = f"{mode}/{name}/lr={lr:g}"
        results = []
        for seed in range(a.seeds):
            cfg = dict(mode=mode, optimizer=name, lr=lr, seed=seed, steps=a.steps, eval_every=eval_every,
                       batch_size=a.batch_size, train_examples=a.train_examples, eval_examples=a.eval_examples,
                       max_len=a.max_len, threads=a.threads, out=str(a.out / "runs" / f"{mode}-{name}-{lr:g}-{seed}"))
            results.append(run_worker("zo_optim.bench.finetune_clm", cfg,
                                      f"bench finetune-clm worker {label} seed {seed}",
                                      dict(os.environ, **assets.offline_env())))
        for r in results:
            for step, loss in r["curve"]:
                rows.append(report.Row(label, mode, "held_out_loss", "nats/token", step, loss))
        at = {step: report.mean_std([dict(r["curve"])[step] for r in results]) for step in [0, *budgets]}
        wall = report.mean_std([r["wall_s"] for r in results])
        rows.append(report.Row(label, mode, "wall_clock", "s", a.steps, wall[0]))
        table.append([mode, name, lr, results[0]["trainable"],
                      *(f"{m:.3f} ± {s:.3f} (ppl {_ppl(m)})" for m, s in at.values()), f"{wall[0]:.0f}"])
        print(label, table[-1][4:], flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(a.out / "finetune_clm.csv", rows, env)
    report.write_environment(a.out / "env.json", env, **{k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(a).items() if k != "worker"})
    headers = ["mode", "optimizer", "lr", "trainable", "loss at 0", *(f"loss at {b}" for b in budgets), "wall s"]
    print(report.format_table(headers, table, digits=3,
                              title=f"bench finetune-clm ({a.seeds} seeds, {a.steps} steps, batch {a.batch_size}, "
                                    f"{a.train_examples} train / {a.eval_examples} held-out tweets; {env.device})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
