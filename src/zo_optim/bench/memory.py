"""``zo-optim bench memory``: peak memory of a MeZO fine-tune against inference and AdamW.

Three measurements on the same fixed-shape batch (``--batch-size`` × ``--max-len`` random token ids;
memory does not depend on the token values), each in a fresh interpreter so no run inherits another's
high-water mark:

* ``inference``: ``model.eval()``, one ``torch.no_grad()`` forward of the batch;
* ``zo``: a MeZO full-parameter fine-tune through :class:`~zo_optim.integrations.hf.ZOTrainer`
  for ``--steps`` steps (no evaluation unless ``--eval-batch-size`` is given);
* ``adamw``: the same through the plain ``transformers.Trainer`` with ``optim="adamw_torch"`` (backprop).

Every worker first does the same imports (torch, transformers' Trainer, ``zo_optim.integrations.hf``)
and then builds the model, so the three processes carry the same runtime. **Peak** is what the
targets are judged on: the process's RSS high-water mark (``VmHWM``) on CPU, which counts the
interpreter, the libraries and the weights; ``torch.cuda.max_memory_allocated`` on CUDA (tensors
only). Beside it each worker records ``VmHWM`` after every phase (imports, model built, trainer
built, backend imported, numba's floor (a one-line jitted function, zo run with the ``cpu`` backend),
our kernels loaded, train begin, first step, all steps, evaluation), and the table shows the peak *net of the
runtime*: peak − the ``VmHWM`` after the imports, before the model exists — what the run added
on top of an idle Python with torch and transformers loaded, the CPU analogue of the CUDA number.
The raw peak is always printed and written next to it.

Targets (docs/integrations.md): zo ≤ 1.05 × inference, zo ≤ 1/3 × adamw.

Models (``--model``): ``tiny`` (a 2-layer OPT, the CI size), ``minilm`` (the packaged
all-MiniLM-L6-v2, real weights, 22.7M), ``bert-large`` (a BERT-large-sized ``BertConfig``, random
weights, 335M, sequence classification) and ``opt-350m`` (OPTForCausalLM from its public config,
random weights, 331M); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import report
from ._worker import emit, run_worker

METHODS = ("inference", "zo", "adamw")
MODELS = ("tiny", "minilm", "bert-large", "opt-350m")
# (ratio name, numerator, denominator, bound): the targets
TARGETS = (("zo/inference", "zo", "inference", 1.05), ("zo/adamw", "zo", "adamw", 1 / 3))
# BERT-large (Devlin et al. 2019): 24 layers, hidden 1024, 16 heads, FFN 4096, the bert-base vocabulary
_BERT_LARGE = dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096, max_position_embeddings=512, type_vocab_size=2, num_labels=2)


def _check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"Invalid model: {name!r} (choose from {', '.join(MODELS)})")


class Phases:
    """Memory marks after each phase of one worker: RSS high-water mark and current RSS (and CUDA peaks)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[dict[str, Any]] = []

    def mark(self, phase: str) -> None:
        from ..apps.common import peak_rss_mb, proc_status_mb

        # rounded like apps.common.peak_memory_mb's peaks, so a mark never reads above the run's own peak
        rss = proc_status_mb().get("VmRSS")
        rec: dict[str, Any] = {"phase": phase, "hwm_mib": round(peak_rss_mb(), 1),
                               "rss_mib": None if rss is None else round(rss, 1)}
        if self.cuda:
            import torch

            rec["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.marks.append(rec)


def build_model(name: str) -> tuple[Any, str]:
    """``name`` on CPU in fp32 and its kind, ``"seq-cls"`` (2 labels) or ``"causal-lm"``; no download."""
    _check_model(name)
    if name == "minilm":
        from transformers import AutoModelForSequenceClassification

        from ..apps import assets

        return AutoModelForSequenceClassification.from_pretrained(str(assets.minilm_path()), num_labels=2,
                                                                  local_files_only=True), "seq-cls"
    if name == "bert-large":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(**_BERT_LARGE)), "seq-cls"
    from . import shapes

    return shapes.build_model(name, "cpu"), "causal-lm"


def make_rows(kind: str, vocab_size: int, n: int, max_len: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` fixed-length examples of random token ids (ids 5.. avoid the special tokens); labels per ``kind``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (n, max_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i].tolist(), "attention_mask": [1] * max_len,
             "labels": ids[i].tolist() if kind == "causal-lm" else int(labels[i])} for i in range(n)]


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One ``cfg["method"]`` measurement in THIS process (call it in a fresh one); returns its marks."""
    from ..apps import assets

    assets.set_offline()
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from ..integrations.hf import ZOTrainer, ZOTrainingArguments

    torch.set_num_threads(cfg["threads"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    phases = Phases(cuda)
    phases.mark("imports")  # the runtime: interpreter + torch + transformers + zo_optim, no model yet
    model, kind = build_model(cfg["model"])
    n_params = sum(p.numel() for p in model.parameters())
    rows = make_rows(kind, model.config.vocab_size, cfg["steps"] * cfg["batch_size"], cfg["max_len"])
    phases.mark("model")
    method = cfg["method"]
    if method == "inference":
        model.to(device).eval()
        batch = {k: v.to(device) for k, v in default_data_collator(rows[: cfg["batch_size"]]).items()}
        with torch.no_grad():
            model(**batch)
        phases.mark("forward")
    else:
        class Marks(TrainerCallback):
            def on_train_begin(self, *a: Any, **k: Any) -> None:  # the optimizer exists from here
                phases.mark("train_begin")

            def on_step_end(self, args: Any, state: Any, *a: Any, **k: Any) -> None:
                if state.global_step == 1:  # first step: backend import / JIT, allocator growth
                    phases.mark("step1")

        common = dict(output_dir=cfg["out"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch_size"],
                      per_device_eval_batch_size=cfg["eval_batch_size"] or cfg["batch_size"],
                      learning_rate=cfg["lr"], lr_scheduler_type="constant", eval_strategy="no",
                      logging_strategy="no", save_strategy="no", report_to=[], use_cpu=not cuda,
                      disable_tqdm=True, seed=0, dataloader_num_workers=0)
        kw = dict(model=model, train_dataset=rows, data_collator=default_data_collator, callbacks=[Marks()])
        if method == "adamw":
            trainer: Any = Trainer(args=TrainingArguments(**common, optim="adamw_torch", weight_decay=0.0), **kw)
        else:
            extra = {"backend": cfg["backend"]} if cfg["backend"] != "auto" else {}
            trainer = ZOTrainer(args=ZOTrainingArguments(**common, zo_optimizer="mezo", zo_eps=1e-3,
                                                         zo_optimizer_kwargs=extra), **kw)
        phases.mark("trainer")
        if method == "zo" and not cuda:
            from .. import ops

            # import the backend the optimizer will use now, so its import is a phase of its own (numba:
            # the library and its threading layer); its kernels compile or load from cache at the first step
            backend = ops.resolve_backend(cfg["backend"], device, [torch.float32])
            ops.load_backend(backend)
            phases.mark("backend_import")
            if backend == "cpu":
                import numba

                # numba's own floor: the first dispatch of ANY jitted function builds its CPU target
                # (typing and lowering registries, the LLVM JIT); a one-line function pays it here, so
                # the next phase is what our kernels add on top (measured 2026-12-04, MiniLM and BERT-large:
                # +46 MiB here after the +56 MiB import, then +8 MiB for our kernels)
                numba.njit(lambda x: x + 1)(1)
                phases.mark("numba_floor")
            # one MeZO step on a 4-element dummy parameter runs the kernels the real steps use, so their
            # JIT compile (or cache load) is its own phase too; the real first step would do it otherwise
            from .. import MeZO

            dummy = torch.nn.Parameter(torch.zeros(4))
            MeZO([dummy], lr=0.0, backend=backend).step(lambda: dummy.sum())
            phases.mark("kernels")
        trainer.train()
        phases.mark("train")
        if cfg["eval_batch_size"]:
            eval_rows = make_rows(kind, model.config.vocab_size, cfg["eval_examples"], cfg["max_len"], seed=1)
            trainer.evaluate(eval_dataset=eval_rows)
            phases.mark("eval")
    from ..apps.common import peak_memory_mb

    peaks = peak_memory_mb(device)
    return {"method": method, "marks": phases.marks, "n_params": n_params, "device": device.type,
            "peak_mib": peaks.get("peak_cuda_allocated_mb", peaks["peak_rss_mb"]),
            "peak_rss_mib": peaks["peak_rss_mb"]}


def run_in_fresh_process(cfg: dict[str, Any]) -> dict[str, Any]:
    """:func:`worker` in a new interpreter; raises with its stderr if it fails."""
    from ..apps import assets

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **assets.offline_env())
    return run_worker("zo_optim.bench.memory", cfg, f"bench memory worker {cfg['model']}/{cfg['method']}", env)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=["tiny"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-6, help="the same for both trainers; memory does not depend on it")
    p.add_argument("--backend", choices=("auto", "chunked", "reference", "cpu", "triton"), default="auto",
                   help="zo-optim backend of the zo run (chunked, reference: plain torch, no numba)")
    p.add_argument("--eval-batch-size", type=int, default=0,
                   help="evaluate once after training at this batch size (default 0: no evaluation)")
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--out", type=Path, default=Path("bench-memory"))
    p.add_argument("--fsdp", type=int, default=0, metavar="N",
                   help="per-rank peak of MeZO on the model sharded with FSDP2 over N gloo ranks, against the "
                        "unsharded model and FSDP2 + AdamW (bench.memory_fsdp; causal-LM models)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def _check_args(a: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "max_len", "threads", "eval_examples"):
        if getattr(a, name) < 1:
            raise ValueError(f"Invalid --{name.replace('_', '-')}: {getattr(a, name)} (must be >= 1)")
    if a.fsdp == 1 or a.fsdp < 0 or (a.fsdp and set(a.models) & {"minilm", "bert-large"}):
        raise ValueError(f"Invalid --fsdp: {a.fsdp} (N >= 2 ranks, with the causal-LM models tiny or opt-350m)")
    if a.eval_batch_size < 0:
        raise ValueError(f"Invalid --eval-batch-size: {a.eval_batch_size} (must be >= 0; 0 = no evaluation)")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.worker:
        emit(worker(json.loads(a.worker)))
        return 0
    _check_args(a)
    if a.fsdp:
        from . import memory_fsdp

        return memory_fsdp.run(a, argv)
    env = report.environment(argv=sys.argv if argv is None else ["zo-optim", "bench", "memory", *argv])
    rows: list[report.Row] = []
    peaks_table, targets_table = [], []
    for model in a.models:
        x = f"{model}:{a.batch_size}x{a.max_len}"
        res: dict[str, dict[str, Any]] = {}
        for method in a.methods:
            cfg = dict(model=model, method=method, steps=a.steps, batch_size=a.batch_size, max_len=a.max_len,
                       lr=a.lr, backend=a.backend, eval_batch_size=a.eval_batch_size, eval_examples=a.eval_examples,
                       threads=a.threads, out=str(a.out / "runs" / f"{model}-{method}"))
            r = res[method] = run_in_fresh_process(cfg)
            runtime = r["marks"][0]["hwm_mib"]  # VmHWM after the imports, before the model
            net = r["peak_rss_mib"] - runtime
            r["net_mib"] = net
            rows += [report.Row(model, method, "peak_memory", "MiB", x, r["peak_mib"]),
                     report.Row(model, method, "peak_rss", "MiB", x, r["peak_rss_mib"]),
                     report.Row(model, method, "runtime_rss", "MiB", x, runtime),
                     report.Row(model, method, "peak_rss_net_of_runtime", "MiB", x, net),
                     report.Row(model, method, "parameters", "count", x, r["n_params"])]
            rows += [report.Row(model, method, f"hwm_after:{m['phase']}", "MiB", x, m["hwm_mib"]) for m in r["marks"]]
            phases = "  ".join(f"{m['phase']}={m['hwm_mib']:.0f}" for m in r["marks"])
            peaks_table.append([model, f"{r['n_params'] / 1e6:.1f}M", method, r["peak_mib"], runtime, net, phases])
        for ratio, num, den, bound in TARGETS:
            if num not in res or den not in res:
                continue
            raw = res[num]["peak_mib"] / res[den]["peak_mib"]
            net = res[num]["net_mib"] / res[den]["net_mib"] if res[den]["net_mib"] > 0 else float("nan")
            rows += [report.Row(model, ratio, "peak_ratio", "ratio", x, raw),
                     report.Row(model, ratio, "peak_ratio_net_of_runtime", "ratio", x, net),
                     report.Row(f"target:{ratio} <= {bound:.3g}", ratio, "met", "bool", x, float(raw <= bound))]
            targets_table.append([model, ratio, f"<= {bound:.3g}", raw, "met" if raw <= bound else "MISSED", net,
                                  ("met" if net <= bound else "MISSED") if net == net else "--"])
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(a.out / "memory.csv", rows, env)
    report.write_environment(a.out / "env.json", env, **{k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(a).items() if k != "worker"})
    unit = "CUDA max allocated" if env.details["device_type"] == "cuda" else "VmHWM"
    print(report.format_table(
        ["model", "params", "method", f"peak MiB ({unit})", "runtime MiB", "peak-runtime MiB",
         "VmHWM after each phase (MiB)"], peaks_table, digits=4,
        title=f"bench memory ({a.steps} steps, batch {a.batch_size}x{a.max_len}, backend {a.backend}, "
              f"eval batch {a.eval_batch_size or 'none'}; {env.device})"))
    print("runtime = VmHWM after importing torch/transformers/zo_optim, before the model is built")
    if targets_table:
        print()
        print(report.format_table(["model", "ratio", "target", "peak ratio", "raw", "net-of-runtime ratio", "net"],
                                  targets_table, digits=4, title="issue 11 targets (judged on the raw peak)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
