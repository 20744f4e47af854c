"""``zo-optim bench convergence``: forward passes to a target per optimizer, mean ± std over seeds.

For every problem of :mod:`zo_optim.bench.problems` and every optimizer, each
configuration of a small grid (learning rates, plus HiZOO's α and HELENE's λ/γ in
``--sweep``) runs for a fixed budget of **forward passes** on ``--seeds`` seeds. Forward
passes, not steps, are the unit: the closure is wrapped and every call counted, so
MeZO's central estimator costs 2 per step, HiZOO 3, HiSo 1 + P.

Per configuration and seed we record the metric curve against forwards, the forwards at
which the target was first reached ("not reached" otherwise) and the final metric (the
mean of the last three evaluation points, which smooths the test-accuracy noise). The best
configuration per optimizer is the one with the best mean final metric over seeds (a
diverged seed counts as worst). For it we also report how many forwards the optimizer
needs to reach MeZO's final metric, relative to MeZO's budget (the issue's aim: ≤ 1/3 on
the fine-tune).

Outputs under ``--out``: ``convergence.csv`` (long format, :mod:`zo_optim.bench.report`),
``environment.json``, one ``<problem>.png`` of the best curves per problem, and the table
on stdout (also ``summary.txt``). The default size finishes in ~30 s on two
CPU cores; ``--full`` is the size behind the numbers in ``docs/convergence.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..optim.registry import OPTIMIZERS, RUN_SETTINGS, optimizer_class, recommended_lr
from . import problems as P
from . import report

# The optimizers compared: every registered one, by its registry name. The centre of each one's
# learning-rate grid on each problem is its class's recommended "convergence/<problem>" lr; the grid is
# base * 2**k for k in LR_STEPS_FULL (CI: the base only). Chosen from exploratory runs so that the
# best value lies inside the grid; docs/convergence.md lists the winners.
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
# Options of a registered class run as their own entries: bench name -> (registry name, extra kwargs). Their lr
# grid is centred on the class's recommended lr. ``block_probes`` runs with one param group per block of the
# problem (``Instance.extras["blocks"]``: name -> parameter names; one block per tensor where a problem has none).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mezo+blocks": ("mezo", {"block_probes": True}),
    # Sparse-MeZO: the quarter of each tensor's weights with the smallest |θ| (optim/_sparse.py)
    "mezo+sparse": ("mezo", {"sparse_density": 0.25}),
    "mezo+sparse10": ("mezo", {"sparse_density": 0.1}),  # other densities (docs/convergence.md: one lr each)
    "mezo+sparse50": ("mezo", {"sparse_density": 0.5}),
    # LOZO: rank-8 directions U Vᵀ for the weight matrices, U kept for 50 steps (optim/_lowrank.py)
    "mezo+lozo": ("mezo", {"lowrank_rank": 8, "lowrank_interval": 50}),
    # SubZero: rank-8 directions U S Vᵀ, U and V orthonormal and kept for 50 steps, S fresh (optim/_lowrank.py)
    "mezo+subzero": ("mezo", {"lowrank_rank": 8, "lowrank_interval": 50, "lowrank_kind": "subzero"}),
    # q > 1 directions per step on one batch with forward differences: 1 + q forwards for q directions
    "mezo+fwd4": ("mezo", {"estimator": "forward", "num_queries": 4}),
    "zoadam+fwd4": ("zoadam", {"estimator": "forward", "num_queries": 4}),
    "zoadam+fwd8": ("zoadam", {"estimator": "forward", "num_queries": 8}),
    "zoadam+fwd16": ("zoadam", {"estimator": "forward", "num_queries": 16}),
    "mezo+fwd8": ("mezo", {"estimator": "forward", "num_queries": 8}),
    "mezo+fwd16": ("mezo", {"estimator": "forward", "num_queries": 16}),
    "zoadam+fwd32": ("zoadam", {"estimator": "forward", "num_queries": 32}),
    # HELENE with its opt-in bias-corrected Hessian EMA, the setting docs/convergence.md recommends
    "helene+bc": ("helene", {"hessian_bias_correction": True}),
    # anchor_decay: after each update θ ← θ + lr·λ_a(θ_a − θ) toward the starting weights (optim/_anchor.py)
    "zoadam+fwd16+anchor": ("zoadam", {"estimator": "forward", "num_queries": 16, "anchor_decay": 4.0}),
    "mezo+anchor": ("mezo", {"anchor_decay": 3.0}),
    # lr_decay: the lr decays linearly to 0 over the run (optim/_schedule.py, lr_decay_steps = the run's steps);
    # "/2", "/3": the run gets half (a third of) the problem's budget, to ask whether it ends where the full
    # constant-lr run ends
    "mezo+decay": ("mezo", {"lr_decay": True}),
    "mezo+decay/2": ("mezo", {"lr_decay": True, "budget_fraction": 0.5}),
    "zoadam+decay/2": ("zoadam", {"lr_decay": True, "budget_fraction": 0.5}),
    "zoadam+fwd8+decay": ("zoadam", {"estimator": "forward", "num_queries": 8, "lr_decay": True}),
    "zoadam+fwd8+decay/2": ("zoadam", {"estimator": "forward", "num_queries": 8, "lr_decay": True,
                                       "budget_fraction": 0.5}),
    "mezo+decay/3": ("mezo", {"lr_decay": True, "budget_fraction": 1 / 3}),  # issue 24's stretch: ≤ ⅓
    "zoadam+fwd8+decay/3": ("zoadam", {"estimator": "forward", "num_queries": 8, "lr_decay": True,
                                       "budget_fraction": 1 / 3}),
}
# Keys of a configuration that shape the run, not the optimizer: run_one reads them and passes the rest on.
RUN_OPTIONS = (*RUN_SETTINGS, "budget_fraction")  # the registry's run settings, and the share of the budget
BENCH_NAMES = OPTIMIZER_NAMES + tuple(VARIANTS)


def _base(name: str) -> str:
    return VARIANTS[name][0] if name in VARIANTS else name


def _display(name: str) -> str:
    cls = OPTIMIZERS[_base(name)].__name__
    return f"{cls}+{name.split('+', 1)[1]}" if name in VARIANTS else cls
LR_STEPS_FULL = (-1, 0, 1)

# Extra hyper-parameters swept with --sweep (each combined with every learning rate).
# An optimizer not named here sweeps nothing but the learning rate.
SWEEPS: dict[str, list[dict[str, Any]]] = {
    "hizoo": [{"hessian_smooth": a} for a in (1e-6, 1e-4, 1e-3)],
    "helene": [{}, {"lambda_mode": "dim"}, {"hessian_bias_correction": True}],
}


@dataclass
class RunResult:
    """One (problem, optimizer, configuration, seed) run."""

    forwards: list[int]
    values: list[float]
    steps: int
    diverged: bool
    seconds: float
    final: float = math.nan
    forwards_to_target: float = math.nan  # NaN: not reached
    seed: int | None = None  # the run's seed (None: its position among the configuration's runs)


@dataclass
class ConfigResult:
    optimizer: str
    kwargs: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)

    @property
    def label(self) -> str:
        return _label(self.kwargs)


def _label(kwargs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs.items())


OptimizerFactory = Callable[[list[torch.Tensor], list[str], str, dict[str, Any], int], torch.optim.Optimizer]


def zo_optim_factory(params: list[torch.Tensor], names: list[str], optimizer: str, kwargs: dict[str, Any],
                     seed: int) -> torch.optim.Optimizer:
    """Build ``optimizer`` (a registered name or a :data:`VARIANTS` name) with ``kwargs``."""
    return optimizer_class(_base(optimizer))(params, seed=seed, **kwargs)


def configs(problem: str, optimizer: str, full: bool, sweep: bool,
            lr_factors: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The hyper-parameter grid of ``optimizer`` on ``problem`` (``lr_factors`` multiply the base lr)."""
    base = recommended_lr(_base(optimizer), f"convergence/{problem}")
    if lr_factors is None:
        lr_factors = [2.0**k for k in (LR_STEPS_FULL if full else (0,))]
    lrs = [float(f"{base * f:.3g}") for f in lr_factors]
    extras = SWEEPS.get(optimizer, [{}]) if sweep else [{}]
    variant = VARIANTS[optimizer][1] if optimizer in VARIANTS else {}
    return [{"lr": lr, **variant, **extra} for extra in extras for lr in lrs]


def _param_groups(inst: P.Instance) -> list[dict[str, Any]]:
    """One param group per block of ``inst`` (``extras["blocks"]``; one per tensor when it names none)."""
    blocks = inst.extras.get("blocks") or {n: [n] for n in inst.names}
    by_name = dict(zip(inst.names, inst.params, strict=True))
    groups = [{"params": [by_name[n] for n in names]} for names in blocks.values()]
    if sum(len(g["params"]) for g in groups) != len(inst.params):
        raise ValueError(f"the blocks of {sorted(blocks)} do not cover every trainable tensor exactly once")
    return groups


def _smooth(values: Sequence[float], window: int = 3) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def run_one(spec: P.ProblemSpec, size: str, optimizer: str, kwargs: dict[str, Any], seed: int,
            factory: OptimizerFactory, budget: int | None = None) -> RunResult:
    """Train one configuration for ``budget`` forward passes and record its curve."""
    budget = round((budget or spec.budget[size]) * kwargs.get("budget_fraction", 1.0))
    inst = P.build(spec.name, size, seed)
    params = _param_groups(inst) if kwargs.get("block_probes") else inst.params
    opt = factory(params, inst.names, optimizer, {k: v for k, v in kwargs.items() if k not in RUN_OPTIONS}, seed)
    counter = [0]

    def counted(closure: P.Closure) -> P.Closure:
        def call() -> torch.Tensor:
            counter[0] += 1
            return closure()

        return call

    checkpoints = [round(budget * (k + 1) / spec.evals) for k in range(spec.evals)]
    forwards, values = [0], [inst.evaluate()]
    start_value, steps, diverged, t0 = values[0], 0, False, time.perf_counter()
    while counter[0] < budget:
        with torch.no_grad():
            loss = opt.step(counted(inst.closure_for_step()))
        steps += 1
        if steps == 1 and kwargs.get("lr_decay"):
            # the decay ends with the run: T = its steps, known once a step has counted its forwards (the lr of
            # step 0 is lr·1 whatever T is, so setting T now changes nothing already done)
            for group in opt.param_groups:
                group["lr_decay_steps"] = math.ceil(budget / counter[0])
        if counter[0] >= checkpoints[len(forwards) - 1]:
            value = inst.evaluate()
            forwards.append(counter[0])
            values.append(value)
            blew_up = not spec.higher_is_better and value > 1e3 * max(start_value, 1e-12)
            if not math.isfinite(value) or blew_up or (loss is not None and not torch.isfinite(loss).all()):
                diverged = True
                break
    res = RunResult(forwards, values, steps, diverged, time.perf_counter() - t0)
    smooth = _smooth(values)
    if diverged:
        res.final = -math.inf if spec.higher_is_better else math.inf
    else:
        res.final = smooth[-1]
    target = spec.target[size]
    res.forwards_to_target = first_reach(spec, forwards, smooth, target)
    return res


def first_reach(spec: P.ProblemSpec, forwards: Sequence[int], smooth: Sequence[float], target: float) -> float:
    """Forwards at the first evaluation whose smoothed metric reaches ``target`` (NaN when never)."""
    for f, v in zip(forwards, smooth, strict=True):
        if math.isfinite(v) and spec.reached(v, target):
            return float(f)
    return math.nan


def _score(spec: P.ProblemSpec, cfg: ConfigResult) -> float:
    """Mean final metric, oriented so that lower is better (diverged runs are +inf)."""
    finals = [r.final for r in cfg.runs]
    if any(not math.isfinite(f) for f in finals):
        return math.inf
    m = statistics.fmean(finals)
    return -m if spec.higher_is_better else m


def best_config(spec: P.ProblemSpec, results: Sequence[ConfigResult]) -> ConfigResult:
    def key(c: ConfigResult) -> tuple[float, float]:
        ftt = [r.forwards_to_target for r in c.runs]
        reach = statistics.fmean(ftt) if all(math.isfinite(x) for x in ftt) else math.inf
        return _score(spec, c), reach

    return min(results, key=key)


def _fmt_ms(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    if math.isinf(mean):
        return "diverged"
    if math.isnan(std):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


@dataclass
class Summary:
    problem: str
    optimizer: str
    label: str
    reached: int
    seeds: int
    ftt: tuple[float, float]
    final: tuple[float, float]
    to_mezo_final: tuple[float, float] = (math.nan, math.nan)  # forwards to MeZO's final / MeZO's budget
    reached_mezo: int = 0


def summarise(spec: P.ProblemSpec, size: str, results: dict[str, list[ConfigResult]]) -> list[Summary]:
    best = {opt: best_config(spec, cfgs) for opt, cfgs in results.items()}
    out = []
    mezo_final = None
    if "mezo" in best and math.isfinite(_score(spec, best["mezo"])):
        mezo_final = statistics.fmean(r.final for r in best["mezo"].runs)
    for opt, cfg in best.items():
        ftt = [r.forwards_to_target for r in cfg.runs]
        s = Summary(spec.name, opt, cfg.label, sum(math.isfinite(x) for x in ftt), len(cfg.runs), report.mean_std(ftt),
                    report.mean_std([r.final for r in cfg.runs]))
        if mezo_final is not None:
            budget = max(r.forwards[-1] for r in best["mezo"].runs)
            rel = [first_reach(spec, r.forwards, _smooth(r.values), mezo_final) / budget for r in cfg.runs]
            s.to_mezo_final = report.mean_std(rel)
            s.reached_mezo = sum(math.isfinite(x) for x in rel)
        out.append(s)
    return out


def _rows(spec: P.ProblemSpec, size: str, results: dict[str, list[ConfigResult]],
          summaries: list[Summary]) -> list[report.Row]:
    rows = []
    for opt, cfgs in results.items():
        for cfg in cfgs:
            for i, r in enumerate(cfg.runs):
                name = f"{spec.name} | {opt} | {cfg.label} | seed={i if r.seed is None else r.seed}"
                curve = zip(r.forwards, r.values, strict=True)
                rows += [report.Row(name, opt, spec.metric, spec.unit, f, v) for f, v in curve]
                rows.append(report.Row(name, opt, "forwards_to_target", "forwards", spec.target[size],
                                       r.forwards_to_target))
                rows.append(report.Row(name, opt, f"final_{spec.metric}", spec.unit, r.forwards[-1], r.final))
                rows.append(report.Row(name, opt, "seconds", "s", r.steps, r.seconds))
    for s in summaries:
        name = f"{s.problem} | {s.optimizer} | best: {s.label}"
        rows += [
            report.Row(name, s.optimizer, "forwards_to_target_mean", "forwards", s.reached, s.ftt[0]),
            report.Row(name, s.optimizer, "forwards_to_target_std", "forwards", s.reached, s.ftt[1]),
            report.Row(name, s.optimizer, f"final_{spec.metric}_mean", spec.unit, s.seeds, s.final[0]),
            report.Row(name, s.optimizer, f"final_{spec.metric}_std", spec.unit, s.seeds, s.final[1]),
            report.Row(name, s.optimizer, "forwards_to_mezo_final_rel", "fraction of budget", s.reached_mezo,
                       s.to_mezo_final[0]),
        ]
    return rows


def _plot(path: Path, spec: P.ProblemSpec, results: dict[str, list[ConfigResult]]) -> None:
    series, bands = {}, {}
    for opt, cfgs in results.items():
        cfg = best_config(spec, cfgs)
        n = min(len(r.values) for r in cfg.runs)
        if n < 2:
            continue
        xs = [statistics.fmean(r.forwards[i] for r in cfg.runs) for i in range(n)]
        cols = [[r.values[i] for r in cfg.runs] for i in range(n)]
        label = f"{_display(opt)} ({cfg.label})"
        series[label] = (xs, [statistics.fmean(c) for c in cols])
        bands[label] = ([min(c) for c in cols], [max(c) for c in cols])
    report.plot_lines(path, series, bands=bands, title=f"{spec.name}: {spec.description}", xlabel="forward passes",
                      ylabel=spec.unit, logy=not spec.higher_is_better)


def format_summary(spec: P.ProblemSpec, size: str, summaries: list[Summary], budget: int | None = None) -> str:
    target = spec.target[size]
    headers = ["optimizer", "best config", f"forwards to {spec.metric} {'≥' if spec.higher_is_better else '≤'} "
               f"{target:g}", "reached", f"final {spec.metric}", "to MeZO final (× budget)"]
    rows = [[_display(s.optimizer), s.label, _fmt_ms(*s.ftt), f"{s.reached}/{s.seeds}", _fmt_ms(*s.final, 4),
             f"{_fmt_ms(*s.to_mezo_final)} ({s.reached_mezo}/{s.seeds})"] for s in summaries]
    title = f"{spec.name} [{size}; budget {budget or spec.budget[size]} forwards; {spec.description}]"
    return report.format_table(headers, rows, title=title)


def run_problem(spec: P.ProblemSpec, size: str, optimizers: Sequence[str], seeds: int, full: bool, sweep: bool,
                factory: OptimizerFactory, budget: int | None = None, lr_factors: Sequence[float] | None = None,
                log: Callable[[str], None] = print, first_seed: int = 0) -> dict[str, list[ConfigResult]]:
    results: dict[str, list[ConfigResult]] = {}
    for opt in optimizers:
        results[opt] = []
        for kwargs in configs(spec.name, opt, full, sweep, lr_factors):
            cfg = ConfigResult(opt, kwargs)
            for seed in range(first_seed, first_seed + seeds):
                run = run_one(spec, size, opt, kwargs, seed, factory, budget)
                run.seed = seed
                cfg.runs.append(run)
            finals = ", ".join(f"{r.final:.4g}" for r in cfg.runs)
            secs = sum(r.seconds for r in cfg.runs)
            log(f"  {spec.name:<10} {_display(opt):<7} {cfg.label:<40} final [{finals}]  ({secs:.1f}s)")
            results[opt].append(cfg)
    return results


def _set_threads(n: int) -> None:
    """One torch and one numba thread by default.

    The problems are small (hundreds to ~1M parameters) and every step is a few
    short kernels: on the shared 2-core machine a MeZO step on the 368-parameter CI
    quadratic took 96 ms with numba's default thread pool and 4 ms with one thread
    (the parallel region's start-up dominates). Runs are sequential, so one thread
    each loses nothing.
    """
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim bench convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="real sizes, budgets and the learning-rate grid")
    # encoder is opt-in: a MeZO step on its 1.93 M parameters takes ~0.5 s on two shared cores
    p.add_argument("--problems", default="quadratic,rosenbrock,mlp,minilm",
                   help="comma-separated subset of: " + ",".join(P.PROBLEMS))
    p.add_argument("--optimizers", default=",".join(OPTIMIZER_NAMES),
                   help="comma-separated subset of: " + ",".join(BENCH_NAMES))
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: 2, --full: 3)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed … first-seed + seeds - 1 (default 0): more seeds for a recorded run")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep HiZOO's α, HELENE's λ mode and bias correction (with --full)")
    p.add_argument("--budget", type=int, default=None, help="forward passes per run (overrides the problem's)")
    p.add_argument("--lr-factors", default=None,
                   help="comma-separated multipliers of each optimizer's base lr (default: 1; --full: 1/2, 1, 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and numba threads (default 1: the runs are small, see the module docstring)")
    p.add_argument("--out", default="bench-out/convergence", help="output folder (CSV, PNGs, summary)")
    return p


def main(argv: list[str] | None = None, factory: OptimizerFactory | None = None) -> int:
    args = _parser().parse_args(argv)
    _set_threads(args.threads)
    lr_factors = [float(x) for x in args.lr_factors.split(",")] if args.lr_factors else None
    size = "full" if args.full else "ci"
    seeds = args.seeds or (3 if args.full else 2)
    if seeds < 1:
        raise SystemExit(f"Invalid --seeds: {seeds} (need at least 1)")
    if args.first_seed < 0:
        raise SystemExit(f"Invalid --first-seed: {args.first_seed} (need at least 0)")
    names = [n.strip() for n in args.problems.split(",") if n.strip()]
    opts = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in P.PROBLEMS:
            raise SystemExit(f"Invalid problem: {n!r}; choose from {', '.join(P.PROBLEMS)}")
    for o in opts:
        if o not in BENCH_NAMES:
            raise SystemExit(f"Invalid optimizer: {o!r}; choose from {', '.join(BENCH_NAMES)}")
    factory = factory or zo_optim_factory
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = report.environment("cpu", argv=["zo-optim", "bench", "convergence", *(argv or [])])
    report.write_environment(out / "environment.json", env, size=size, seeds=seeds, first_seed=args.first_seed,
                             problems=names, optimizers=opts,
                             sweep=args.sweep, budget=args.budget)
    csv_path = out / "convergence.csv"
    tables = []
    first = True
    for name in names:
        spec = P.PROBLEMS[name]
        t0 = time.perf_counter()
        print(f"[{name}] {spec.description}", flush=True)
        results = run_problem(spec, size, opts, seeds, args.full, args.sweep, factory, args.budget, lr_factors,
                              log=lambda s: print(s, flush=True), first_seed=args.first_seed)
        summaries = summarise(spec, size, results)
        report.write_csv(csv_path, _rows(spec, size, results, summaries), env, append=not first)
        first = False
        _plot(out / f"{name}.png", spec, results)
        table = format_summary(spec, size, summaries, args.budget)
        tables.append(table)
        print(table + f"\n({time.perf_counter() - t0:.0f}s)\n", flush=True)
    (out / "summary.txt").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    print(f"wrote {csv_path}, {out / 'summary.txt'} and PNGs under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
