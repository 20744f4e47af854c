"""How far a run walks from the start and what curvature it meets (issue 24): for each configuration, 500 forwards of
the package optimizer (as ``zo-optim bench convergence`` runs it, seed 0, optionally with the pull toward the start of
anchored.py), then ‖θ − θ0‖ per block, tr H per block (Hutchinson, 8 Gaussian probes, fixed 512-example batch) and
the held-out accuracy.

usage: python walk.py   (configurations in CONFIGS)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from anchored import Anchored
from noise_budget import BLOCKS, block_traces

from zo_optim.bench import convergence as C
from zo_optim.bench.encoder import encoder

CONFIGS = [("mezo", 1e-3, 0.0), ("zoadam+fwd16", 6e-3, 0.0), ("zoadam+fwd16", 1.2e-2, 0.0),
           ("zoadam+fwd16", 1.2e-2, 4.0)]


def trace_per_block(inst) -> dict[str, float]:
    ps = inst.params
    tr, logits = inst.extras["data"]["train"], inst.extras["logits"]
    idx = torch.arange(512)
    loss = F.cross_entropy(logits(tr["h"][idx], tr["mask"][idx]), tr["y"][idx])
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    return {b: m for b, (m, _) in block_traces(ps, grads, torch.Generator().manual_seed(0)).items()}


def main() -> None:
    torch.set_num_threads(1)
    for variant, lr, lam in CONFIGS:
        inst = encoder("full", 0)
        start = [p.detach().clone() for p in inst.params]
        name, extra = C.VARIANTS.get(variant, (variant, {}))
        opt = C.zo_optim_factory(inst.params, inst.names, name, {"lr": lr, **extra}, 0)
        if lam:
            opt = Anchored(opt, inst.params, lam)
        forwards = 0
        while forwards < 500:
            with torch.no_grad():
                opt.step(inst.closure_for_step())
            forwards += 1 + extra.get("num_queries", 1) if extra else 2  # forward differences: 1 + q; central: 2
        dist = {b: sum(float((inst.params[i] - start[i]).pow(2).sum()) for i in ids) ** 0.5
                for b, ids in BLOCKS.items()}
        th = trace_per_block(inst)
        print(f"{variant} lr={lr:g} anchor={lam:g}: after {forwards} forwards accuracy {inst.evaluate():.3f}; "
              f"tr H {sum(th.values()):.1f} (" + ", ".join(f"{b} {v:.1f}" for b, v in th.items()) + "); ‖θ−θ0‖ "
              + ", ".join(f"{b} {v:.2f}" for b, v in dist.items()), flush=True)


if __name__ == "__main__":
    main()
