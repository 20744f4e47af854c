"""What bounds a zeroth-order method's progress per forward on the encoder problem (issue 24), measured by autograd.

At the problem's start θ0 and after MeZO's first 500 forwards (lr 1e-3, the package's MeZO, seed 0), prints:

* the gradient ḡ of the whole training pool (2048 tweets) and, over 32 mini-batches of 16, E‖g_B‖² (the batch
  gradient's second moment: ‖ḡ‖² plus the data noise) and the per-example mean ‖g_i‖²;
* per block (attention, ffn, pooler, classifier): its share of ‖ḡ‖², tr H_l (Hutchinson, 8 Gaussian probes per block,
  Hessian-vector products by double backward) and the ratio share/tr H_l;
* the top Hessian eigenvalue λ₁ (power iteration, 20 Hessian-vector products) and the effective rank tr H / λ₁.

Why these numbers: a step along one Gaussian direction with the best lr lowers the loss by ≈ ‖ḡ‖⁴ / (2 E‖g_B‖² tr H)
(the loss's quadratic model; MeZO, Malladi et al. 2023, §4), so
* perturbing block l alone (or weighting the blocks) can at best replace ‖ḡ‖²/tr H by max_l ‖ḡ_l‖²/tr H_l;
* giving each example of a batch its own direction (per-example perturbations, Flipout-style) replaces
  E‖g_B‖² by mean ‖g_i‖²/B: a gain of B·E‖g_B‖²/mean‖g_i‖², ≈ 1 when the examples' gradients disagree.

usage: python noise_budget.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import zo_optim
from zo_optim.bench._problem_base import _BatchStream
from zo_optim.bench.encoder import encoder

BLOCKS = {"attention": range(0, 10), "ffn": range(10, 16), "pooler": range(16, 18), "classifier": range(18, 20)}


def block_traces(ps, grads, gen, probes: int = 8) -> dict[str, tuple[float, float]]:
    """Per block: tr H_l by Hutchinson (``probes`` Gaussian z on the block, zᵀHz by double backward), mean and s.e."""
    out = {}
    for b, ids in BLOCKS.items():
        vals = []
        for _ in range(probes):
            vs = [torch.randn(p.shape, generator=gen) if i in ids else torch.zeros_like(p) for i, p in enumerate(ps)]
            hv = torch.autograd.grad(grads, ps, grad_outputs=vs, retain_graph=True)
            vals.append(sum(float((v * h).sum()) for v, h in zip(vs, hv, strict=True)))
        t = torch.tensor(vals)
        out[b] = (float(t.mean()), float(t.std() / len(vals) ** 0.5))
    return out


def measure(inst, label: str) -> None:
    ps = inst.params
    tr, logits = inst.extras["data"]["train"], inst.extras["logits"]

    def loss_of(idx):
        return F.cross_entropy(logits(tr["h"][idx], tr["mask"][idx]), tr["y"][idx])

    def flat(gs):
        return torch.cat([g.reshape(-1) for g in gs])

    n = len(tr["y"])
    g_full = None
    for s in range(0, n, 256):  # the pool's mean gradient, in chunks
        idx = torch.arange(s, min(s + 256, n))
        g = torch.autograd.grad(loss_of(idx) * len(idx) / n, ps)
        g_full = list(g) if g_full is None else [a + b for a, b in zip(g_full, g, strict=True)]
    gbar = flat(g_full)
    stream = _BatchStream(n, 16, 123)
    gb2, gi2 = [], []
    for _ in range(32):
        idx = stream.next()
        gb2.append(float(flat(torch.autograd.grad(loss_of(idx), ps)).pow(2).sum()))
    for i in range(64):
        gi2.append(float(flat(torch.autograd.grad(loss_of(torch.tensor([i * 31 % n])), ps)).pow(2).sum()))
    g2 = float(gbar.pow(2).sum())
    egb2 = sum(gb2) / len(gb2)
    mgi2 = sum(gi2) / len(gi2)
    print(f"[{label}] ‖ḡ‖² = {g2:.4g}   E‖g_B‖² (B=16) = {egb2:.4g} ({egb2 / g2:.1f}× ‖ḡ‖²)   "
          f"mean ‖g_i‖² = {mgi2:.4g}   per-example gain bound 16·E‖g_B‖²/mean‖g_i‖² = {16 * egb2 / mgi2:.2f}")
    idx = torch.arange(512)  # curvature on a fixed 512-example batch
    grads = torch.autograd.grad(loss_of(idx), ps, create_graph=True)

    def hvp(vs):
        return torch.autograd.grad(grads, ps, grad_outputs=vs, retain_graph=True)

    gen = torch.Generator().manual_seed(0)
    tr_h = block_traces(ps, grads, gen)
    total_tr = sum(m for m, _ in tr_h.values())
    print(f"[{label}] tr H = {total_tr:.3g}   ‖ḡ‖²/tr H = {g2 / total_tr:.4g}")
    for b, ids in BLOCKS.items():
        share = sum(float(g_full[i].pow(2).sum()) for i in ids) / g2
        size = sum(ps[i].numel() for i in ids)
        m, se = tr_h[b]
        ratio = share * g2 / m if m > 0 else float("inf")
        print(f"[{label}]   {b:<10} {size:>8} params  share {share:.3f}  tr H_l {m:7.3f} ± {se:.3f}  "
              f"‖ḡ_l‖²/tr H_l {ratio:.4g}  ({ratio / (g2 / total_tr):.2f}× the whole space's)")
    v = [torch.randn(p.shape, generator=gen) for p in ps]
    lam = 0.0
    for _ in range(20):
        norm = float(flat(v).norm())
        v = [x / norm for x in v]
        hv = hvp(v)
        lam = sum(float((a * b).sum()) for a, b in zip(v, hv, strict=True))
        v = [h.detach() for h in hv]
    print(f"[{label}] λ₁ ≈ {lam:.3g}   effective rank tr H / λ₁ ≈ {total_tr / lam:.2f}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    inst = encoder("full", 0)
    measure(inst, "start")
    opt = zo_optim.MeZO(inst.params, lr=1e-3, seed=0)
    for _ in range(250):  # 500 forwards: the middle of MeZO's budget
        opt.step(inst.closure_for_step())
    measure(inst, "after 500 MeZO forwards")
    print(f"[after 500 MeZO forwards] held-out accuracy {inst.evaluate():.3f}")


if __name__ == "__main__":
    main()
