"""Table of the prototype runs (``proto_zo.py`` output lines) against a target accuracy.

Per configuration (mode, lr, beta, c, period): seeds, the final accuracy (mean of the last three evaluations,
mean ± std over seeds), and the fraction of the 1000-forward budget at which the seed-averaged curve first reaches
TARGET, smoothed over 3 points as ``zo-optim bench convergence`` does (``hit(sm3)``) and raw (``hit(raw)``).

usage: python summarise.py TARGET RUNS.txt [RUNS.txt ...]
"""

from __future__ import annotations

import collections
import statistics
import sys


def main() -> None:
    target = float(sys.argv[1])
    rows: dict[tuple[str, ...], list[list[float]]] = collections.defaultdict(list)
    for path in sys.argv[2:]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                w = line.split()
                if len(w) >= 17:
                    rows[tuple(w[:5])].append([float(x) for x in w[6:17]])
    for key, curves in sorted(rows.items()):
        n = len(curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(11)]
        finals = [statistics.fmean(c[-3:]) for c in curves]
        smooth = [statistics.fmean(mean[max(0, i - 2):i + 1]) for i in range(11)]
        hit = next((i / 10 for i in range(1, 11) if smooth[i] >= target), None)
        hit_raw = next((i / 10 for i in range(1, 11) if mean[i] >= target), None)
        std = statistics.stdev(finals) if n > 1 else 0.0
        print(" ".join(key), f"n={n} final={statistics.fmean(finals):.3f}±{std:.3f}", "hit(sm3)", hit,
              "hit(raw)", hit_raw, "curve", " ".join(f"{x:.3f}" for x in mean))


if __name__ == "__main__":
    main()
