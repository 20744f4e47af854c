"""The table of README.md, from the runs' own summary.json and losses.csv: python table.py (in this directory)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    print("| run | --train | optimizer | lr | schedule | options | seed | steps | forwards "
          "| held-out acc before → after | held-out loss after | training loss, mean of the last 10% of steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in sorted(p for p in HERE.iterdir() if (p / "summary.json").exists()):
        s = json.loads((run / "summary.json").read_text())
        losses = [float(r["loss"]) for r in csv.DictReader((run / "losses.csv").open())]
        tail = losses[-max(1, len(losses) // 10):]
        options = ", ".join(f"{k}={v}" for k, v in (s.get("options") or {}).items()) or "-"
        schedule = s.get("lr_schedule", "constant")
        print(f"| {run.name} | {s['train']} | {s['optimizer']} | {s['lr']:g} | {schedule} | {options} "
              f"| {s['seed']} | {s['steps']} | {s.get('forwards') or 2 * s['steps']} "
              f"| {s['accuracy_before']:.1%} → {s['accuracy_after']:.1%} | {s['eval_loss_after']:.3f} "
              f"| {sum(tail) / len(tail):.3f} |")


if __name__ == "__main__":
    main()
