"""The merged runs read against another reference than constant-lr MeZO: forwards to REFERENCE's final accuracy.

``merge.py`` (next door, ``../2026-12-06-cpu-convergence-encoder/merge.py``) reads every entry against the
``mezo`` entry's best configuration. This asks the stricter question of issue 24's schedule result: does an
entry reach the final of MeZO *with the same lr decay* (``mezo+decay``, 1000 forwards) in fewer forwards? Same
functions as the bench (``first_reach`` on the 3-evaluation smoothed curve, best configuration by final).

usage: python against.py PROBLEM REFERENCE_ENTRY RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "2026-12-06-cpu-convergence-encoder"))

from merge import load, mean_curve_crossing

from zo_optim.bench import convergence as C
from zo_optim.bench import problems as P
from zo_optim.bench import report


def main() -> None:
    problem, reference, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    spec = P.PROBLEMS[problem]
    results = load(problem, dirs)
    ref = C.best_config(spec, results[reference])
    level = statistics.fmean(r.final for r in ref.runs)
    budget = max(r.forwards[-1] for r in ref.runs)
    print(f"reference {C._display(reference)} ({ref.label}, {len(ref.runs)} seeds): final {level:.4f}; "
          f"crossings as a fraction of its budget {budget:.0f}")
    for name in sorted(results, key=lambda k: (k != reference, k)):
        best = C.best_config(spec, results[name])
        rel = [C.first_reach(spec, r.forwards, C._smooth(r.values), level) / budget for r in best.runs]
        mean, std = report.mean_std(rel)
        reached = sum(x == x for x in rel)
        final = report.mean_std([r.final for r in best.runs])
        print(f"  {C._display(name):<20} {best.label:<70} final {final[0]:.3f} ± {final[1]:.3f}  "
              f"per seed {mean:.2f} ± {std:.2f} ({reached}/{len(rel)})  "
              f"mean curve {mean_curve_crossing(spec, best, level, budget):.2f}")


if __name__ == "__main__":
    main()
