"""Evaluate an exponential average of the iterates instead of the last one (issue 24), with the package's optimizers.

After every step θ̄ ← β·θ̄ + (1 − β)·θ (θ̄ starts at θ0); the bench's held-out evaluations read θ̄ (swapped in for
the evaluation only), training continues from θ. Polyak–Ruppert-style averaging damps the zeroth-order iterates'
swings between evaluations. β is given as a window in forwards, W: β = 1 − forwards_per_step / W. An optional pull
toward the start as in anchored.py. Prints ``NAME LR LAMBDA SEED acc@0 … acc@1000 SECONDS`` like anchored.py
(LAMBDA column: the pull), with the window in the name.

usage: python averaged.py VARIANT LR LAMBDA WINDOW SEEDS
"""

from __future__ import annotations

import sys

import torch
from anchored import Anchored

from zo_optim.bench import convergence as C
from zo_optim.bench import problems as P


class Averaged:
    def __init__(self, opt, params, beta):
        self.opt, self.params, self.beta = opt, params, beta
        self.avg = [p.detach().clone() for p in params]

    def step(self, closure):
        loss = self.opt.step(closure)
        with torch.no_grad():
            for a, p in zip(self.avg, self.params, strict=True):
                a.lerp_(p, 1 - self.beta)
        return loss

    def swapped(self, evaluate):
        def run():
            with torch.no_grad():
                saved = [p.detach().clone() for p in self.params]
                for p, a in zip(self.params, self.avg, strict=True):
                    p.copy_(a)
                try:
                    return evaluate()
                finally:
                    for p, s in zip(self.params, saved, strict=True):
                        p.copy_(s)
        return run


def main() -> None:
    variant, lr, lam, window, seeds = (sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]),
                                       sys.argv[5])
    torch.set_num_threads(1)
    _, extra = C.VARIANTS.get(variant, (variant, {}))
    per_step = 1 + extra["num_queries"] if extra.get("estimator") == "forward" else 2
    beta = 1 - per_step / window
    built = {}
    build = P.build

    def build_and_remember(name, size, seed):
        inst = build(name, size, seed)
        built["inst"] = inst
        return inst

    P.build = build_and_remember

    def factory(params, names, optimizer, kwargs, seed):
        opt = C.zo_optim_factory(params, names, optimizer, kwargs, seed)
        if lam:
            opt = Anchored(opt, params, lam)
        avg = Averaged(opt, params, beta)
        inst = built["inst"]
        inst.evaluate = avg.swapped(inst.evaluate)  # run_one evaluates after building the optimizer
        return avg

    spec = P.PROBLEMS["encoder"]
    for seed in map(int, seeds.split(",")):
        r = C.run_one(spec, "full", variant, {"lr": lr, **extra}, seed, factory)
        print(f"{variant}/avg{window:g}", lr, lam, seed, " ".join(f"{v:.3f}" for v in r.values), f"{r.seconds:.0f}s",
              flush=True)


if __name__ == "__main__":
    main()
