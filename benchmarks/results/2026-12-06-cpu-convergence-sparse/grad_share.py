"""Where the encoder problem's gradient lies relative to Sparse-MeZO's mask (the option's pay-off criterion).

For each trainable tensor W of ``--problems encoder`` at its start (seed 0), the true gradient ∇L over the
first 512 training examples (autograd), and the share of ‖∇L‖² inside the ρ = 0.25 mask
m = 1[|W| ≤ h_W] (zo_optim.optim._sparse.magnitude_mask). A masked probe's drift is ‖m⊙∇L‖², its noise
≈ (ρD + 2)‖m⊙∇L‖², so per unit of lr-normalised noise it gains share/ρ over a dense probe where share > ρ.

usage: PYTHONPATH=src python grad_share.py [--density 0.25]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from zo_optim.bench import problems as P
from zo_optim.optim._sparse import magnitude_mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--density", type=float, default=0.25)
    args = ap.parse_args()
    inst = P.build("encoder", "full", seed=0)
    tr = inst.extras["data"]["train"]
    loss = torch.zeros(())
    for s in range(0, 512, 64):
        out = inst.extras["logits"](tr["h"][s: s + 64], tr["mask"][s: s + 64])
        loss = loss + F.cross_entropy(out, tr["y"][s: s + 64], reduction="sum") / 512
    grads = torch.autograd.grad(loss, inst.params)
    total = sum(float((g**2).sum()) for g in grads)
    inside = 0.0
    print(f"{'tensor':<52} {'numel':>8} {'|grad|^2 share of all':>22} {'share inside mask':>18}")
    for n, p, g in zip(inst.names, inst.params, grads, strict=True):
        m = magnitude_mask(p, args.density)
        g2, g2m = float((g**2).sum()), float((g[m] ** 2).sum())
        inside += g2m
        print(f"{n:<52} {p.numel():>8} {g2 / total:>22.4f} {g2m / max(g2, 1e-30):>18.3f}")
    print(f"all tensors: share of ||grad||^2 inside the rho={args.density} mask = {inside / total:.3f} "
          f"(a random mask of that density: {args.density})")


if __name__ == "__main__":
    main()
