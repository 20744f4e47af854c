"""Run the bench's encoder problem with a decaying lr (issue 24 prototype).

usage: python scheduled.py VARIANT LR SCHEDULE BUDGET SEEDS   (SCHEDULE: const | linear | cosine | wsd)
"""
from __future__ import annotations

import math
import sys

import torch

from zo_optim.bench import convergence as C
from zo_optim.bench import problems as P


def main() -> None:
    variant, lr, sched, budget, seeds = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    _, extra = C.VARIANTS.get(variant, (variant, {}))
    per_step = 1 + extra["num_queries"] if extra.get("estimator") == "forward" else 2
    steps = budget // per_step

    def factor(t: int) -> float:
        x = min(t / steps, 1.0)
        if sched == "linear":
            return 1 - x
        if sched == "cosine":
            return 0.5 * (1 + math.cos(math.pi * x))
        if sched == "wsd":  # constant, then linear to 0 over the last 40 %
            return min(1.0, (1 - x) / 0.4)
        return 1.0

    def factory(params, names, optimizer, kwargs, seed):
        opt = C.zo_optim_factory(params, names, optimizer, kwargs, seed)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, factor)

        class Stepper:
            def step(self, closure):
                loss = opt.step(closure)
                sch.step()
                return loss
        return Stepper()

    spec = P.PROBLEMS["encoder"]
    for seed in map(int, seeds.split(",")):
        r = C.run_one(spec, "full", variant, {"lr": lr, **extra}, seed, factory, budget=budget)
        print(f"{variant}/{sched}{budget}", lr, seed, f"final {r.final:.3f}", " ".join(f"{v:.3f}" for v in r.values),
              f"{r.seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
