"""Merge per-optimizer ``zo-optim bench convergence`` runs of one problem into one table, CSV and plot.

The runs were started as separate processes (one per optimizer, to use both cores); the summary's
"to MeZO final" needs MeZO's best configuration next to the others, so it is recomputed here from
the per-seed curves in the runs' CSVs with the bench's own functions. Also prints the crossing of the
seed-averaged, smoothed curve with MeZO's final mean (the measure used for the MiniLM head problem).

usage: python merge.py PROBLEM OUT RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from zo_optim.bench import convergence as C
from zo_optim.bench import problems as P
from zo_optim.bench import report


def load(problem: str, dirs: list[str]) -> dict[str, list[C.ConfigResult]]:
    curves: dict[tuple[str, str, int], list[tuple[float, float]]] = defaultdict(list)
    finals, seconds = {}, {}
    for d in dirs:
        for r in report.read_csv(Path(d) / "convergence.csv"):
            parts = [p.strip() for p in r["name"].split("|")]
            if parts[0] != problem or not parts[-1].startswith("seed="):
                continue
            key = (parts[1], parts[2], int(parts[-1][5:]))
            if r["metric"] == P.PROBLEMS[problem].metric:
                curves[key].append((float(r["x"]), r["value"]))
            elif r["metric"] == "seconds":
                seconds[key] = (int(r["x"]), r["value"])
            elif r["metric"].startswith("final_"):
                finals[key] = r["value"]
    spec = P.PROBLEMS[problem]
    out: dict[str, dict[str, C.ConfigResult]] = defaultdict(dict)
    for (opt, label, seed), pts in sorted(curves.items(), key=lambda kv: kv[0]):
        kwargs = dict(kv.split("=", 1) for kv in label.split())
        cfg = out[opt].setdefault(label, C.ConfigResult(opt, kwargs))
        fw, vals = [p[0] for p in pts], [p[1] for p in pts]
        steps, secs = seconds[(opt, label, seed)]
        run = C.RunResult(fw, vals, steps, not math.isfinite(finals[(opt, label, seed)]), secs)
        run.final = finals[(opt, label, seed)]
        run.forwards_to_target = C.first_reach(spec, fw, C._smooth(vals), spec.target["full"])
        cfg.runs.append(run)
    return {opt: list(cfgs.values()) for opt, cfgs in out.items()}


def mean_curve_crossing(spec: P.ProblemSpec, cfg: C.ConfigResult, level: float, budget: float) -> float:
    n = min(len(r.values) for r in cfg.runs)
    xs = [statistics.fmean(r.forwards[i] for r in cfg.runs) for i in range(n)]
    ys = C._smooth([statistics.fmean(r.values[i] for r in cfg.runs) for i in range(n)])
    return C.first_reach(spec, xs, ys, level) / budget


def main() -> None:
    problem, out, dirs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    spec = P.PROBLEMS[problem]
    results = load(problem, dirs)
    results = {k: results[k] for k in sorted(results, key=lambda k: (k != "mezo", k))}
    summaries = C.summarise(spec, "full", results)
    table = C.format_summary(spec, "full", summaries)
    mezo = C.best_config(spec, results["mezo"])
    level = statistics.fmean(r.final for r in mezo.runs)
    budget = max(r.forwards[-1] for r in mezo.runs)
    lines = [table, "", f"MeZO's final mean: {level:.4f}; mean-curve crossing of it (x MeZO's budget {budget:.0f}):"]
    for opt, cfgs in results.items():
        best = C.best_config(spec, cfgs)
        per_lr = ", ".join(f"{c.label}: {statistics.fmean(r.final for r in c.runs):.4f}" for c in cfgs)
        lines.append(f"  {C._display(opt):<12} best {best.label}: "
                     f"{mean_curve_crossing(spec, best, level, budget):.2f}   (final per config: {per_lr})")
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(text, encoding="utf-8")
    env = report.environment("cpu", argv=["merge.py", *sys.argv[1:]])
    report.write_csv(out / "convergence.csv", C._rows(spec, "full", results, summaries), env)
    C._plot(out / f"{problem}.png", spec, results)


if __name__ == "__main__":
    main()
