"""``zo-optim bench memory --fsdp N``: per-rank peak memory of MeZO on a model sharded with FSDP2.

Four measurements of the same model and per-rank batch (random token ids), each in fresh processes
(no run inherits another's high-water mark), on CPU with gloo:

* ``inference``: one process, the whole model, one ``torch.no_grad()`` forward;
* ``zo``: one process, the whole model, ``--steps`` MeZO steps (the unsharded ZO run);
* ``inference-fsdp``: N ranks, the sharded model below, one forward (what FSDP2 itself costs);
* ``zo-fsdp``: N ranks, every decoder layer and the root through ``fully_shard`` (the root with
  ``reshard_after_forward=True``, docs/sharded.md), ``--steps`` MeZO steps, each rank its own batch;
* ``adamw-fsdp``: the same N ranks with backprop and ``torch.optim.AdamW``.

The sharded models are built on the meta device, sharded, and only then materialised
(``to_empty`` + random values): no rank ever holds the whole model. Peak = the RSS high-water mark
(``VmHWM``) of each process, with glibc's mmap threshold fixed at 128 KiB (see :func:`_launch`);
*net* = peak − ``VmHWM`` after the runtime (interpreter, torch, transformers' OPT code, the zo
backend with its kernels loaded: what N processes each pay and what sharding cannot divide). The
target (issue 21): zo-fsdp's net per-rank peak ≤ inference's net peak / N + the largest gathered layer group
(the fp32 bytes of the biggest ``fully_shard`` unit, here the root: embeddings and final norm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import report
from ._worker import emit, parse
from .net import free_port

METHODS = ("inference", "zo", "inference-fsdp", "zo-fsdp", "adamw-fsdp")


def _mark(marks: list[dict[str, Any]], phase: str) -> None:
    from ..apps.common import peak_rss_mb

    marks.append({"phase": phase, "hwm_mib": round(peak_rss_mb(), 1)})


def _build(name: str, sharded: bool) -> tuple[Any, int]:
    """The model (fp32, CPU) and the fp32 bytes of its largest FSDP unit; sharded ones never exist whole."""
    import torch

    from . import shapes

    if not sharded:
        return shapes.build_model(name, "cpu"), 0
    from torch.distributed.fsdp import fully_shard

    model = shapes.build_model(name, "meta")
    layers = model.model.decoder.layers
    units = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    for layer in layers:
        fully_shard(layer)
    root = sum(p.numel() for p in model.parameters()) - sum(units)
    fully_shard(model, reshard_after_forward=True)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # random values in the local shards (memory does not depend on them)
            loc = p.to_local()
            loc.copy_(torch.randn(loc.shape, generator=g) * 0.02)
    return model, 4 * max([root, *units])


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One measurement in THIS process (one rank of it under FSDP); returns its marks."""
    from ..apps import assets

    assets.set_offline()
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (the runtime every method pays, measured before the model)

    import zo_optim

    torch.set_num_threads(cfg["threads"])
    # the same runtime in every method, paid before the first mark: the model's code, and the zo backend with
    # its kernels compiled or loaded (a step on a 4-element dummy), so that net = what the model and run add
    from transformers import OPTForCausalLM  # noqa: F401

    dummy = torch.nn.Parameter(torch.zeros(4))
    zo_optim.MeZO([dummy], lr=0.0, seed=0, backend=cfg["backend"], data_parallel=False).step(lambda: dummy.sum())
    marks: list[dict[str, Any]] = []
    _mark(marks, "imports")
    method = cfg["method"]
    sharded = method.endswith("-fsdp")
    rank = 0
    if sharded:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    model, unit_bytes = _build(cfg["model"], sharded)
    n_params = sum(p.numel() for p in model.parameters())
    # random token ids (5.. avoid the special tokens), labels = inputs; each rank its own (bench memory's rows)
    g = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(cfg["steps"]):
        ids = torch.randint(5, model.config.vocab_size, (cfg["batch_size"], cfg["max_len"]), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    _mark(marks, "model")
    if method in ("inference", "inference-fsdp"):
        model.eval()
        with torch.no_grad():
            model(**batches[0])
        _mark(marks, "forward")
    elif method in ("zo", "zo-fsdp"):
        model.eval()  # dropout off: the probes of a step see the same function
        opt = zo_optim.MeZO(model.parameters(), lr=1e-6, zo_eps=1e-3, seed=0, backend=cfg["backend"])
        for i, batch in enumerate(batches):
            opt.step(lambda batch=batch: model(**batch).loss)
            _mark(marks, f"step{i + 1}")
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        for i, batch in enumerate(batches):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _mark(marks, f"step{i + 1}")
    if sharded:
        dist.destroy_process_group()
    return {"method": method, "rank": rank, "marks": marks, "n_params": n_params, "unit_bytes": unit_bytes,
            "peak_mib": marks[-1]["hwm_mib"], "runtime_mib": marks[0]["hwm_mib"]}


def _launch(cfg: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """``world`` fresh processes (ranks of one gloo group when world > 1); their results."""
    from ..apps import assets

    # glibc's allocator, every method alike: a fixed mmap threshold (128 KiB, its default before it adapts). FSDP2's
    # all-gathers on CPU allocate and free the gathered layers' tensors at every forward; with the adaptive
    # threshold (raised to the largest freed chunk, up to 32 MiB) they come from the heap, which fragments and
    # does not shrink: an FSDP2 forward of OPT-350m over 2 ranks then added 970 MiB to a rank's VmHWM instead of
    # 315 MiB with the fixed threshold (measured 2026-12-06, this bench's inference-fsdp; the unsharded forward
    # adds 113 MiB either way). Set MALLOC_MMAP_THRESHOLD_ yourself to measure another allocator setting.
    # (a dict display, not dict(**...): the user's environment may already hold the offline variables)
    base = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "TOKENIZERS_PARALLELISM": "false",
            **assets.offline_env()}
    if world > 1:
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, "-m", "zo_optim.bench.memory_fsdp", json.dumps(cfg)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        out.append(parse(stdout, p.returncode, stderr, f"bench memory --fsdp worker {cfg['method']}"))
    return out


def run(a: Any, argv: list[str] | None) -> int:
    """``zo-optim bench memory --fsdp N`` (``a``: bench memory's parsed arguments)."""
    env = report.environment(argv=sys.argv if argv is None else ["zo-optim", "bench", "memory", *(argv or [])])
    rows: list[report.Row] = []
    table, targets = [], []
    n = a.fsdp
    for model in a.models:
        x = f"{model}:{a.batch_size}x{a.max_len}:fsdp{n}"
        res = {}
        for method in METHODS:
            cfg = dict(model=model, method=method, steps=a.steps, batch_size=a.batch_size, max_len=a.max_len,
                       backend=a.backend, threads=max(1, a.threads // n) if method.endswith("-fsdp") else a.threads)
            ranks = _launch(cfg, n if method.endswith("-fsdp") else 1)
            worst = max(ranks, key=lambda r: r["peak_mib"])
            net = worst["peak_mib"] - worst["runtime_mib"]
            res[method] = {**worst, "net_mib": net}
            rows += [report.Row(model, method, "peak_rss_per_rank_max", "MiB", x, worst["peak_mib"]),
                     report.Row(model, method, "peak_rss_net_of_runtime", "MiB", x, net),
                     report.Row(model, method, "runtime_rss", "MiB", x, worst["runtime_mib"])]
            phases = "  ".join(f"{m['phase']}={m['hwm_mib']:.0f}" for m in worst["marks"])
            table.append([model, method, len(ranks), worst["peak_mib"], worst["runtime_mib"], net, phases])
        unit_mib = res["zo-fsdp"]["unit_bytes"] / 2**20
        bound = res["inference"]["net_mib"] / n + unit_mib
        got = res["zo-fsdp"]["net_mib"]
        rows += [report.Row(model, "zo-fsdp", "largest_unit_fp32", "MiB", x, unit_mib),
                 report.Row(f"target:zo-fsdp net <= inference net/{n} + largest unit", "zo-fsdp", "met", "bool", x,
                            float(got <= bound))]
        targets.append([model, got, res["inference"]["net_mib"], unit_mib, bound, "met" if got <= bound else "MISSED",
                        res["zo"]["net_mib"], res["adamw-fsdp"]["net_mib"]])
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(a.out / "memory_fsdp.csv", rows, env)
    report.write_environment(a.out / "env.json", env, **{k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(a).items() if k != "worker"})
    print(report.format_table(
        ["model", "method", "ranks", "peak MiB (max over ranks)", "runtime MiB", "net MiB", "VmHWM after each phase"],
        table, digits=4, title=f"bench memory --fsdp {n} ({a.steps} steps, per-rank batch {a.batch_size}x{a.max_len}, "
                               f"backend {a.backend}; {env.device})"))
    print()
    print(report.format_table(
        ["model", "zo-fsdp net", "inference net", "largest unit", f"bound (inf/{n} + unit)", "target",
         "zo unsharded net", "adamw-fsdp net"], targets, digits=4, title="issue 21 target (net of the runtime, MiB)"))
    return 0


if __name__ == "__main__":
    emit(worker(json.loads(sys.argv[1])))
