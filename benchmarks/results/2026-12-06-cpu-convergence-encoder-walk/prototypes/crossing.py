"""Per configuration of anchored.py output lines: final (3-point mean of the last evaluations, as the bench), per-seed
crossing of TARGET (first evaluation whose 3-point running mean incl. the start reaches it, × budget) and the
seed-averaged curve's crossing. usage: python crossing.py TARGET FILES..."""
import collections
import statistics
import sys


def smooth(v):
    return [sum(v[max(0, i - 2):i + 1]) / len(v[max(0, i - 2):i + 1]) for i in range(len(v))]

def cross(v, t):
    s = smooth(v)
    return next((i / (len(v) - 1) for i, x in enumerate(s) if x >= t), None)

target = float(sys.argv[1])
rows = collections.defaultdict(dict)
for path in sys.argv[2:]:
    for line in open(path):
        f = line.split()
        if len(f) < 15:
            continue
        key = tuple(f[:3])
        rows[key][int(f[3])] = [float(x) for x in f[4:15]]
for key, seeds in sorted(rows.items()):
    curves = [seeds[s] for s in sorted(seeds)]
    finals = [smooth(c)[-1] for c in curves]
    xs = [cross(c, target) for c in curves]
    hit = [x for x in xs if x is not None]
    mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(11)]
    fm = statistics.mean(finals)
    fs = statistics.stdev(finals) if len(finals) > 1 else 0
    hm = f"{statistics.mean(hit):.3f} ± {statistics.stdev(hit) if len(hit) > 1 else 0:.3f}" if hit else "—"
    print(" ".join(key), f"n={len(curves)} seeds={sorted(seeds)} final={fm:.4f}±{fs:.3f}",
          f"per-seed={hm} ({len(hit)}/{len(curves)}) mean-curve={cross(mean_curve, target)}")
