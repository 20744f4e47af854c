"""``zo-optim bench kernels``: ms and GB/s per parameter pass, side by side with MeZO's loop.

Providers, in one process over the same tensors:

* ``mezo-loop`` — MeZO's own loop (:class:`zo_optim.bench.baselines.MezoLoop`):
  ``torch.manual_seed`` + per-tensor ``torch.normal`` + out-of-place add;
* ``reference`` / ``chunked`` / ``cpu`` / ``triton`` — zo-optim's backends (:mod:`zo_optim.ops`),
  called directly after one validated call through the public API.

Ops (one pass each unless said): ``perturb`` (θ += s·z), the fused restore+update of
each rule (``sgd`` = MeZO; ``adamw``, ``hizoo``, ``helene``, ``hiso`` with ``--ops all``),
and ``step`` = all parameter passes of one ZO-SGD step (ours: +ε, −2ε, fused
restore+update = 3 passes; mezo-loop: +ε, −2ε, +ε, update = 4 passes). MeZO has no
fused update: its ``sgd`` row is its restore pass followed by its update pass.

Bytes are what a pass must move: each parameter read and written once, plus each
fp32 state tensor read (and written when the op updates it). GB/s = bytes / time;
the roofline is ``dst.copy_(src)`` over the same number of bytes, timed in the same
run, and ``of copy`` = GB/s ÷ copy GB/s (1/it is the op's time over its byte floor).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from . import report, shapes
from .baselines import MezoLoop
from .timing import set_cpu_threads, time_fn

PROVIDERS = ("mezo-loop", "reference", "chunked", "cpu", "triton")
# plain-torch backends: z from a pure-torch Philox, timed only to show the gap
_SLOW = ("reference", "chunked")
UPDATE_OPS = ("sgd", "adamw", "hizoo", "helene", "hiso")
ALL_OPS = ("perturb", *UPDATE_OPS, "step")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COPY = "copy"

ZO_EPS = 1e-3
LR = 1e-6
GRAD = 0.5
SEED = 1234
# 4 bytes per fp32 state element, read (r) and/or written (w) by each fused update.
_STATE_BYTES = {"perturb": 0, "sgd": 0, "adamw": 16, "hizoo": 8, "helene": 16, "hiso": 8, "step": 0}
_MEZO_PASSES = {"perturb": 1, "sgd": 2, "step": 4}
_OUR_PASSES = {"step": 3}


@dataclass(frozen=True)
class Result:
    model: str
    dtype: str
    op: str
    provider: str
    ms: float
    ms_min: float
    bytes: int

    @property
    def gbps(self) -> float:
        return self.bytes / (self.ms * 1e6)

    @property
    def x(self) -> str:
        return f"{self.model}:{self.dtype}"


# ----------------------------------------------------------------------------- providers


def skip_reason(provider: str, device: torch.device, dtype: torch.dtype, numel: int, explicit: bool,
                reference_max_numel: int) -> str | None:
    """Why ``provider`` cannot (or should not) run here, or None when it runs."""
    if provider == "mezo-loop":
        return None
    if provider in _SLOW:
        if numel > reference_max_numel and not explicit:
            return (f"{provider} generates z with a pure-torch Philox (slow); it runs on lists of at most "
                    f"{reference_max_numel:,} elements (--reference-max-numel) unless named in --providers")
        return None
    if provider == "triton" and device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), "
                    "whose timings say nothing of GPU speed")
        if not explicit:
            return ("Triton's interpreter on CPU is a correctness tool, not a speed; "
                    "name triton in --providers to time it anyway")
    from zo_optim import ops

    try:
        ops.resolve_backend(provider, device, [dtype])
    except (ImportError, RuntimeError) as exc:
        return str(exc)
    return None


def _ids(params: Sequence[torch.Tensor]) -> list[int]:
    return list(range(len(params)))


def _sign(i: int) -> float:
    # Alternate the direction so repeated passes oscillate around the start instead of drifting.
    return 1.0 if i % 2 == 0 else -1.0


class _OurOps:
    """Closures that run one op of a zo-optim backend on a parameter list."""

    def __init__(self, backend: str, params: list[torch.Tensor], rounding: str) -> None:
        from zo_optim import ops

        self.backend = backend
        self.params = params
        self.ids = _ids(params)
        self.device = params[0].device
        low = params[0].dtype in (torch.float16, torch.bfloat16)
        self.update_rounding = ("stochastic" if low else "nearest") if rounding == "auto" else rounding
        self.perturb_rounding = "nearest" if rounding == "auto" else rounding
        self.mod = ops.load_backend(backend)
        self.public = ops
        self.coeffs = torch.tensor([GRAD], dtype=torch.float32, device=self.device)
        self.precond_coeffs = torch.tensor([1e-3], dtype=torch.float32, device=self.device)
        self._states: dict[str, list[torch.Tensor]] = {}

    def state(self, name: str, positive: bool = False) -> list[torch.Tensor]:
        if name not in self._states:
            gen = torch.Generator(device=self.device).manual_seed(len(self._states) + 7)
            out = []
            for p in self.params:
                t = torch.rand(p.shape, generator=gen, device=self.device, dtype=torch.float32)
                out.append(t.add_(0.5) if positive else t.sub_(0.5).mul_(1e-3))
            self._states[name] = out
        return self._states[name]

    def _kwargs(self, op: str, i: int) -> dict:
        common = dict(seed=SEED, coeffs=self.coeffs, lr=LR, restore_scale=_sign(i) * ZO_EPS, restore_query=0,
                      distribution="gaussian", rounding=self.update_rounding, rounding_slot=0)
        if op == "sgd":
            return common | dict(weight_decay=0.0, momentum=0.0, momentum_buffers=None)
        if op == "adamw":
            return common | dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=i + 1,
                                 exp_avgs=self.state("m"), exp_avg_sqs=self.state("v", positive=True))
        if op in ("hizoo", "hiso"):
            return common | dict(precond=self.state("precond", positive=True), rule=op, update_precond=True,
                                 precond_decay=1.0 - 1e-6, precond_rate=1e-6,
                                 precond_coeffs=self.precond_coeffs if op == "hizoo" else None,
                                 hessian_eps=1e-8, weight_decay=0.0)
        if op == "helene":
            return common | dict(alpha=0.1, beta1=0.9, beta2=0.99, gamma=1.0, eps=1e-8, clip=[1.0] * len(self.params),
                                 exp_avgs=self.state("m"), hessians=self.state("h", positive=True),
                                 update_hessian=True, hessian_coeffs=None, weight_decay=0.0)
        raise ValueError(f"Invalid op: {op!r}")

    _FUNCS: ClassVar[dict[str, str]] = {"sgd": "sgd_update_", "adamw": "adamw_update_", "hizoo": "precond_sgd_update_",
                                        "hiso": "precond_sgd_update_", "helene": "helene_update_"}

    def perturb(self, scale: float, *, public: bool = False) -> None:
        mod = self.public if public else self.mod
        extra = dict(backend=self.backend) if public else {}
        mod.perturb_(self.params, self.ids, SEED, scale, query=0, distribution="gaussian", precond=None,
                     rounding=self.perturb_rounding, rounding_slot=1, **extra)

    def update(self, op: str, i: int, *, public: bool = False) -> None:
        kwargs = self._kwargs(op, i)
        if public:
            getattr(self.public, self._FUNCS[op])(self.params, self.ids, backend=self.backend, **kwargs)
        else:
            getattr(self.mod, self._FUNCS[op])(self.params, self.ids, **kwargs)

    def validate(self, op: str) -> None:
        """One call through the public API: argument checks the timed direct calls skip."""
        if op == "perturb":
            self.perturb(ZO_EPS, public=True)
            self.perturb(-ZO_EPS, public=True)
        elif op == "step":
            self.validate("perturb")
            self.validate("sgd")
        else:
            self.update(op, 0, public=True)

    def fn(self, op: str) -> Callable[[int], None]:
        if op == "perturb":
            return lambda i: self.perturb(_sign(i) * ZO_EPS)

        if op == "step":
            def step(i: int) -> None:  # +ε, −2ε, fused (+ε restore, update): 3 passes
                self.perturb(ZO_EPS)
                self.perturb(-2 * ZO_EPS)
                self.mod.sgd_update_(self.params, self.ids, **(self._kwargs("sgd", 0)))

            return step
        return lambda i: self.update(op, i)


def _mezo_fn(loop: MezoLoop, op: str) -> Callable[[int], None] | None:
    if op == "perturb":
        return lambda i: loop.perturb(SEED, _sign(i))
    if op == "sgd":
        def restore_update(i: int) -> None:
            loop.perturb(SEED, _sign(i))
            loop.update(SEED, GRAD)

        return restore_update
    if op == "step":
        return lambda i: loop.step_passes(SEED, GRAD)
    return None  # MeZO has no AdamW / HiZOO / HELENE / HiSo pass


def pass_bytes(op: str, numel: int, itemsize: int, provider: str) -> int:
    """Bytes ``op`` must move for ``provider`` (per pass × its passes)."""
    return (2 * numel * itemsize + _STATE_BYTES[op] * numel) * n_passes(op, provider)


def n_passes(op: str, provider: str) -> int:
    """Passes over the parameters that ``provider`` makes for ``op``."""
    if op == COPY:
        return 1
    return (_MEZO_PASSES if provider == "mezo-loop" else _OUR_PASSES).get(op, 1)


# ----------------------------------------------------------------------------- running


def measure_copy(numel: int, dtype: torch.dtype, device: torch.device, warmup: int, repeat: int) -> tuple[float, float]:
    """(median ms, min ms) of ``dst.copy_(src)`` over ``numel`` elements: the roofline of a pass."""
    src = torch.randn(numel, device=device, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    timing = time_fn(lambda i: dst.copy_(src), device, warmup=warmup, repeat=repeat)
    return timing.median, timing.min


def run_config(model: str, dtype_name: str, device: torch.device, providers: Sequence[str], explicit: set[str],
               ops_: Sequence[str], *, warmup: int, repeat: int, reference_max_numel: int, rounding: str,
               log: Callable[[str], None] = print) -> list[Result]:
    dtype = DTYPES[dtype_name]
    plist = shapes.param_list(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = plist.numel
    log(f"\n[{model} {dtype_name}] {len(plist)} tensors, {numel / 1e6:.1f}M elements, "
        f"{numel * itemsize / 2**20:.1f} MiB on {device}")
    results: list[Result] = []
    copy_ms, copy_min = measure_copy(numel, dtype, device, warmup, repeat)
    results.append(Result(model, dtype_name, COPY, "torch", copy_ms, copy_min, 2 * numel * itemsize))
    params = plist.materialize(dtype, device)
    for provider in providers:
        reason = skip_reason(provider, device, dtype, numel, provider in explicit, reference_max_numel)
        if reason:
            log(f"  skip {provider}: {reason}")
            continue
        if provider == "mezo-loop":
            loop = MezoLoop(params, lr=LR, zo_eps=ZO_EPS)
            fns = {op: _mezo_fn(loop, op) for op in ops_}
        else:
            ours = _OurOps(provider, params, rounding)
            fns = {}
            for op in ops_:
                ours.validate(op)
                fns[op] = ours.fn(op)
        # Fewer repeats for the plain-torch backends: timed only to show the gap.
        reps = max(1, min(repeat, 2)) if provider in _SLOW else repeat
        for op, fn in fns.items():
            if fn is None:
                continue
            t = time_fn(fn, device, warmup=min(warmup, 1) if provider in _SLOW else warmup, repeat=reps)
            r = Result(model, dtype_name, op, provider, t.median, t.min, pass_bytes(op, numel, itemsize, provider))
            results.append(r)
            log(f"  {provider:<10} {op:<8} {r.ms:10.3f} ms  {r.gbps:8.2f} GB/s")
        if provider == "mezo-loop":
            # MeZO's `p.data = ...` replaced the storages; keep the list pointing at live tensors.
            params = loop.params
        del fns  # frees this provider's optimizer state (fp32 m, v, ... of the whole list) before the next
    del params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------- summaries


def _copy_gbps(results: Sequence[Result], x: str) -> float:
    for r in results:
        if r.op == COPY and r.x == x:
            return r.gbps
    return math.nan


def _mezo_ms(results: Sequence[Result], x: str, op: str) -> float:
    for r in results:
        if r.provider == "mezo-loop" and r.op == op and r.x == x:
            return r.ms
    return math.nan


def to_rows(results: Sequence[Result]) -> list[report.Row]:
    rows = []
    for r in results:
        rows += [
            report.Row(r.op, r.provider, "time", "ms", r.x, r.ms),
            report.Row(r.op, r.provider, "time_min", "ms", r.x, r.ms_min),
            report.Row(r.op, r.provider, "bytes", "B", r.x, float(r.bytes)),
            report.Row(r.op, r.provider, "bandwidth", "GB/s", r.x, r.gbps),
        ]
        if r.op != COPY:
            frac = r.gbps / _copy_gbps(results, r.x)
            rows.append(report.Row(r.op, r.provider, "fraction_of_copy", "ratio", r.x, frac))
            mezo = _mezo_ms(results, r.x, r.op)
            if r.provider != "mezo-loop" and math.isfinite(mezo):
                rows.append(report.Row(r.op, r.provider, "speedup_vs_mezo_loop", "x", r.x, mezo / r.ms))
    return rows


def table(results: Sequence[Result]) -> str:
    out = []
    for x in dict.fromkeys(r.x for r in results):
        copy = _copy_gbps(results, x)
        rows = []
        for r in (r for r in results if r.x == x):
            frac = r.gbps / copy
            mezo = _mezo_ms(results, x, r.op)
            speed = mezo / r.ms if r.provider not in ("mezo-loop", "torch") and math.isfinite(mezo) else math.nan
            rows.append([r.op, r.provider, n_passes(r.op, r.provider), r.ms, r.ms_min, r.gbps, frac,
                         1 / frac if frac else math.nan, "" if math.isnan(speed) else f"{speed:.2f}x"])
        out.append(report.format_table(
            ["op", "provider", "passes", "ms (median)", "ms (min)", "GB/s", "of copy", "x floor", "vs mezo-loop"], rows,
            title=f"\n{x}  (copy roofline {copy:.1f} GB/s)"))
    return "\n".join(out)


@dataclass(frozen=True)
class TargetCheck:
    target: str
    x: str
    provider: str
    value: float
    threshold: float
    met: bool
    text: str


def check_targets(results: Sequence[Result], device: torch.device) -> tuple[list[TargetCheck], list[str]]:
    """The kernel targets (docs: benchmarks.md) for what was measured, and lines naming those not measured."""
    checks: list[TargetCheck] = []
    for r in results:
        frac = r.gbps / _copy_gbps(results, r.x)
        if device.type == "cuda" and r.provider == "triton" and r.model == "opt-1.3b":
            if r.op == "perturb":
                checks.append(TargetCheck("GPU perturb >= 90% of copy bandwidth (OPT-1.3b)", r.x, r.provider, frac,
                                          0.9, frac >= 0.9, f"{100 * frac:.1f}% of copy"))
            elif r.op in UPDATE_OPS:
                floor = 1 / frac
                checks.append(TargetCheck(f"GPU fused restore+update ({r.op}) <= 1.2x its byte floor (OPT-1.3b)", r.x,
                                          r.provider, floor, 1.2, floor <= 1.2, f"{floor:.2f}x floor"))
        if device.type == "cpu" and r.provider == "cpu" and r.model == "minilm" and r.op == "step":
            speed = _mezo_ms(results, r.x, "step") / r.ms
            if math.isfinite(speed):
                checks.append(TargetCheck("CPU step passes >= 1.5x faster than MeZO's 4 passes (MiniLM)", r.x,
                                          r.provider, speed, 1.5, speed >= 1.5, f"speedup {speed:.2f}x"))
    missing = []
    names = {c.target.split(" (")[0] for c in checks}
    if not any(n.startswith("GPU perturb") for n in names):
        missing.append("GPU perturb >= 90% of copy: not measured (needs CUDA, the triton provider, --models opt-1.3b)")
    if not any(n.startswith("GPU fused") for n in names):
        missing.append("GPU fused restore+update <= 1.2x floor: not measured (needs CUDA, triton, opt-1.3b)")
    if not any(n.startswith("CPU step") for n in names):
        missing.append("CPU step passes >= 1.5x MeZO: not measured (needs CPU, the cpu provider, mezo-loop, minilm)")
    return checks, missing


def plot(results: Sequence[Result], path: Path) -> Path:
    ops_ = [r for r in results if r.op != COPY]
    groups = list(dict.fromkeys(f"{r.x}:{r.op}" for r in ops_))
    providers = list(dict.fromkeys(r.provider for r in ops_))
    series = {}
    for p in providers:
        vals = []
        for g in groups:
            hit = [r for r in ops_ if r.provider == p and f"{r.x}:{r.op}" == g]
            vals.append(hit[0].gbps / _copy_gbps(results, hit[0].x) if hit else math.nan)
        series[p] = vals
    return report.plot_grouped_bars(path, groups, series, title="ZO parameter passes: GB/s as a fraction of copy",
                                    ylabel="GB/s ÷ copy GB/s (same run)", hline=1.0, hline_label="dst.copy_(src)")


# ----------------------------------------------------------------------------- CLI


def _parse_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for it in items:
        if it not in choices:
            raise SystemExit(f"zo-optim bench kernels: invalid {what} {it!r} (choose from {', '.join(choices)})")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench kernels", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma list from {', '.join(shapes.MODELS)} "
                   "(default: minilm on CPU or with --quick; minilm,opt-125m,opt-350m,opt-1.3b on CUDA)")
    p.add_argument("--dtypes", help="comma list from fp32,bf16,fp16 (default fp32,bf16; fp32 with --quick)")
    p.add_argument("--providers", help=f"comma list from {', '.join(PROVIDERS)} (default: all that can run here)")
    p.add_argument("--ops", default="sgd", help="'sgd' (perturb, MeZO's fused restore+update, step), 'all' "
                   f"(also adamw, hizoo, helene, hiso), or a comma list from {', '.join(ALL_OPS)}")
    p.add_argument("--repeat", type=int, help="timed repeats, median reported (default 20 CUDA, 5 CPU, 3 --quick)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and numba (default: theirs); 1 on a busy machine")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--rounding", default="auto", choices=("auto", "nearest", "stochastic"),
                   help="rounding of 16-bit stores (auto: stochastic for updates, nearest for perturb)")
    p.add_argument("--reference-max-numel", type=int, default=2_000_000,
                   help="run the (slow) reference only on lists this small unless it is named in --providers")
    p.add_argument("--out", default="zo_optim_bench", help="directory for kernels.csv, kernels.png, kernels_env.json")
    p.add_argument("--quick", action="store_true", help="small defaults: minilm, fp32, 3 repeats")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("zo-optim bench kernels: --device cuda but CUDA is not available")
    cuda = device.type == "cuda"
    # CPU default: MiniLM only — MeZO's loop alone takes ~12 s per step's passes on OPT-125m on 1 core.
    default_models = "minilm,opt-125m,opt-350m,opt-1.3b" if cuda and not args.quick else "minilm"
    models = shapes.parse_models(args.models or default_models)
    dtypes = _parse_list(args.dtypes or ("fp32" if args.quick else "fp32,bf16"), tuple(DTYPES), "dtype")
    providers = _parse_list(args.providers, PROVIDERS, "provider") if args.providers else list(PROVIDERS)
    explicit = set(providers) if args.providers else set()
    if args.ops == "sgd":
        ops_ = ["perturb", "sgd", "step"]
    elif args.ops == "all":
        ops_ = list(ALL_OPS)
    else:
        ops_ = _parse_list(args.ops, ALL_OPS, "op")
    repeat = args.repeat or (3 if args.quick else (20 if cuda else 5))
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if repeat < 1 or warmup < 0:
        raise SystemExit(f"zo-optim bench kernels: invalid --repeat {repeat} / --warmup {warmup}")

    set_cpu_threads(args.threads)
    env = report.environment(device)
    print(f"zo-optim bench kernels on {env.device} ({env.version})")
    print(f"models {models}, dtypes {dtypes}, providers {providers}, ops {ops_}, repeat {repeat}, warmup {warmup}")
    results: list[Result] = []
    for model in models:
        for dt in dtypes:
            results += run_config(model, dt, device, providers, explicit, ops_, warmup=warmup, repeat=repeat,
                                  reference_max_numel=args.reference_max_numel, rounding=args.rounding)

    print(table(results))
    checks, missing = check_targets(results, device)
    print("\nIssue 2 targets (for what was measured):")
    for c in checks:
        print(f"  [{'MET' if c.met else 'NOT MET'}] {c.target} — {c.x} {c.provider}: {c.text}")
    for line in missing:
        print(f"  [--] {line}")

    out = Path(args.out)
    rows = to_rows(results) + [report.Row(f"target:{c.target}", c.provider, "met", "bool", c.x, float(c.met))
                               for c in checks]
    csv_path = report.write_csv(out / "kernels.csv", rows, env)
    report.write_environment(out / "kernels_env.json", env, models=models, dtypes=dtypes, providers=providers,
                             ops=ops_, repeat=repeat, warmup=warmup, rounding=args.rounding,
                             zo_eps=ZO_EPS, lr=LR, seed=SEED)
    print(f"\nwrote {csv_path}")
    if not args.no_plot:
        print(f"wrote {plot(results, out / 'kernels.png')}")
    return 0
