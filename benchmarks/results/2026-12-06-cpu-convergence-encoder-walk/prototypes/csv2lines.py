"""Bench convergence.csv -> anchored.py-style lines (NAME LR 0 SEED acc@0..acc@1000) for crossing.py."""
import collections
import csv
import sys

runs = collections.defaultdict(dict)
for path in sys.argv[1:]:
    for r in csv.DictReader(open(path)):
        if r["metric"] != "accuracy":
            continue
        parts = [p.strip() for p in r["name"].split("|")]
        cfg = parts[2]
        seed = int(parts[-1].split("=")[1])
        runs[(parts[1], cfg, seed)][int(float(r["x"]))] = float(r["value"])
for (name, cfg, seed), pts in runs.items():
    xs = sorted(pts)
    if len(xs) != 11:
        continue
    lr = cfg.split()[0].split("=")[1]
    tag = name + ("+" + "".join(c for c in cfg.split()[1:])[:30] if len(cfg.split()) > 1 else "")
    print(tag, lr, 0, seed, " ".join(f"{pts[x]:.4f}" for x in xs))
