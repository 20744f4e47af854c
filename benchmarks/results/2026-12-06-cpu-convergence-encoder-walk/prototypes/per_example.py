"""Per-example perturbations on the encoder problem (issue 24), plain torch, outside the package.

Example i of a batch sees θ + ε·z_i with its own direction z_i, so one forward pair measures B = 16 directional
derivatives d_i = (L_i(θ + εz_i) − L_i(θ − εz_i)) / 2ε instead of one, and the step is θ ← θ − lr·(1/B)·Σ_i d_i z_i
(Flipout's idea for evolution strategies: Wen et al. 2018, "Flipout: Efficient Pseudo-Independent Weight
Perturbations on Mini-Batches", ICLR, arXiv 1803.04386; EGGROLL's low-rank per-member perturbations, 2025). The
forwards run per example with ``torch.func.vmap`` over per-example weights (a prototype: the cost per forward is not
the point, the gradient estimate is).

Modes: ``mezo`` (one z for the whole batch: MeZO, the check that this script reproduces proto_zo.py's ``mezo``
lines), ``perex`` (dense z_i per example), ``perex1`` (rank-1 z_i = a_i b_iᵀ per weight matrix, dense elsewhere).
Prints ``MODE LR SEED acc@0 … acc@1000 SECONDS`` (evaluation every 100 forwards; same batches, start and z stream
as proto_zo.py).

usage: python per_example.py MODE LR SEEDS [--adam]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import vmap

from zo_optim.bench._problem_base import _BatchStream
from zo_optim.bench.encoder import BATCH, encoder, layer_cls


def directions(mode: str, ps: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """[B, *shape] per tensor: example i's direction."""
    if mode == "mezo":
        return [torch.randn(p.shape, generator=gen).expand(BATCH, *p.shape) for p in ps]
    out = []
    for p in ps:
        if mode == "perex1" and p.dim() == 2:
            a = torch.randn(BATCH, p.shape[0], 1, generator=gen)
            out.append(a * torch.randn(BATCH, 1, p.shape[1], generator=gen))
        else:
            out.append(torch.randn((BATCH, *p.shape), generator=gen))
    return out


def run(a: argparse.Namespace, seed: int, eps: float = 1e-3, budget: int = 1000, evals: int = 10) -> list[float]:
    inst = encoder("full", seed)
    ps = inst.params
    cfg = inst.extras["model"].config
    tr = inst.extras["data"]["train"]

    def one(weights, h, m, y):
        hid = layer_cls(h[None], m[None], weights[:16], cfg.num_attention_heads, cfg.layer_norm_eps)
        logits = F.linear(torch.tanh(F.linear(hid, weights[16], weights[17])), weights[18], weights[19])
        return F.cross_entropy(logits, y[None])

    per_example = vmap(one)
    gen = torch.Generator().manual_seed(1234 + seed)
    stream = _BatchStream(len(tr["y"]), BATCH, seed)  # the problem's own batch order
    m1 = [torch.zeros_like(p) for p in ps]
    v2 = [torch.zeros_like(p) for p in ps]
    fw, t, curve = 0, 0, [inst.evaluate()]
    with torch.no_grad():
        while fw < budget:
            idx = stream.next()
            h, m, y = tr["h"][idx], tr["mask"][idx], tr["y"][idx]
            width = int(m.sum(1).max())
            h, m = h[:, :width], m[:, :width]
            zs = directions(a.mode, ps, gen)
            loss_plus = per_example([p + eps * z for p, z in zip(ps, zs, strict=True)], h, m, y)
            loss_minus = per_example([p - eps * z for p, z in zip(ps, zs, strict=True)], h, m, y)
            fw += 2
            d = (loss_plus - loss_minus) / (2 * eps)  # [B]
            t += 1
            for i, (p, z) in enumerate(zip(ps, zs, strict=True)):
                g = torch.einsum("b,b...->...", d, z) / BATCH
                if a.adam:
                    m1[i].mul_(0.9).add_(g, alpha=0.1)
                    v2[i].mul_(0.999).addcmul_(g, g, value=0.001)
                    p.sub_(a.lr * (m1[i] / (1 - 0.9**t)) / ((v2[i] / (1 - 0.999**t)).sqrt() + 1e-8))
                else:
                    p.sub_(a.lr * g)
            if fw % (budget // evals) == 0:
                curve.append(inst.evaluate())
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["mezo", "perex", "perex1"])
    p.add_argument("lr", type=float)
    p.add_argument("seeds")
    p.add_argument("--adam", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    for seed in (int(s) for s in a.seeds.split(",")):
        t0 = time.time()
        curve = run(a, seed)
        print(a.mode + ("+adam" if a.adam else ""), a.lr, seed, " ".join(f"{x:.3f}" for x in curve),
              f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
