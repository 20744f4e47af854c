"""Redraw federated.png from federated.csv (the run's PNG title was cut off; the data are the same).

Run from the repository root: PYTHONPATH=src python benchmarks/results/2026-12-06-cpu-federated-encoder/replot.py
"""

from pathlib import Path

from zo_optim.bench import report

here = Path(__file__).parent
rows = report.read_csv(here / "federated.csv")
best = {r["name"]: r["value"] for r in rows if r["metric"] == "best_lr"}
series, bands = {}, {}
for m in ("hiso", "decomfl"):
    curves = {}
    for r in rows:
        if r["metric"] == "held_out_accuracy" and r["name"].startswith(f"{m}/lr={best[m]:g}/"):
            curves.setdefault(r["name"], []).append((int(r["x"]), r["value"]))
    xs = [x for x, _ in next(iter(curves.values()))]
    ms = [report.mean_std([c[i][1] for c in curves.values()]) for i in range(len(xs))]
    label = f"{m} (lr={best[m]:g})"
    series[label] = (xs, [x for x, _ in ms])
    bands[label] = ([x - s for x, s in ms], [x + s for x, s in ms])
report.plot_lines(here / "federated.png", series, bands=bands, xlabel="round", ylabel="held-out accuracy",
                  title=f"HiSo vs DeComFL, encoder task (mean ± std over {len(curves)} seeds)")
