"""The package's optimizers on the convergence bench's encoder problem with a pull toward the start (issue 24).

After every ``step``, θ ← θ − lr·λ·(θ − θ0) on every trainable tensor (θ0: the problem's start). λ = 0 runs
``zo-optim bench convergence``'s own ``run_one`` unchanged (the check that this script reproduces the bench).
Prints ``NAME LR LAMBDA SEED acc@0 … acc@1000 SECONDS`` (evaluations as the bench: every 100 forwards).

usage: python anchored.py VARIANT LR LAMBDA SEEDS   (VARIANT: a bench name, e.g. mezo, zoadam+fwd16)
"""

from __future__ import annotations

import sys

import torch

from zo_optim.bench import convergence as C
from zo_optim.bench import problems as P


class Anchored:
    def __init__(self, opt, params, lam):
        self.opt, self.lam = opt, lam
        self.start = [(p, p.detach().clone()) for p in params]

    def step(self, closure):
        loss = self.opt.step(closure)
        lr = self.opt.param_groups[0]["lr"]
        with torch.no_grad():
            for p, p0 in self.start:
                p.sub_(p - p0, alpha=lr * self.lam)
        return loss


def main() -> None:
    variant, lr, lam, seeds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    _, extra = C.VARIANTS.get(variant, (variant, {}))

    def factory(params, names, optimizer, kwargs, seed):
        opt = C.zo_optim_factory(params, names, optimizer, kwargs, seed)
        return Anchored(opt, params, lam) if lam else opt

    spec = P.PROBLEMS["encoder"]
    for seed in map(int, seeds.split(",")):
        r = C.run_one(spec, "full", variant, {"lr": lr, **extra}, seed, factory)
        print(variant, lr, lam, seed, " ".join(f"{v:.3f}" for v in r.values), f"{r.seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
