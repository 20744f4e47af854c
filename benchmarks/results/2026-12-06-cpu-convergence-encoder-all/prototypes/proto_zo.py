"""Plain-torch prototypes of zeroth-order variants on the encoder problem (issue 24), outside the package.

Each run trains ``zo-optim bench convergence``'s ``encoder`` problem (the same data, batches, start and
evaluation) for 1000 forwards with central differences (2 forwards per step), evaluating every 100, and prints
one line: ``MODE LR BETA C PERIOD SEED acc@0 acc@100 … acc@1000 SECONDS``. z comes from ``torch.randn`` with a
generator seeded 1234 + seed, not from the package's RNG contract, so the ``mezo`` mode is a MeZO with other
directions than ``zo_optim.MeZO``'s (its curves are not the package's MeZO curves).

Modes (the step θ ← θ − lr·g·u with g = (L(θ + εu) − L(θ − εu)) / 2ε unless said):

* ``mezo``: u = z on every tensor.
* ``guided``: every PERIOD-th step probes along the momentum m (EMA with BETA of the random steps' g·z),
  rescaled to ‖u‖ = √D, with lr·C; the other steps are MeZO steps that also feed m.
* ``blocks``: one block (attention, ffn, pooler, classifier) per step drawn with probabilities ``--pb``,
  u = z on it, step lr / p_b (unbiased).
* ``lozo``: u = U Vᵀ / √r for matrices (U redrawn every ``--nu`` steps, rank ``--rank``), z elsewhere;
  ``lozoguided``: the same with guided steps.
* ``head`` / ``cls``: only the pooler + classifier / only the classifier are trainable.
* ``align`` / ``alignhead``: the pooler's weight and bias perturbed in the row space of the classifier
  (u = √(n/k)·Q·N(0, 1), Q an orthonormal basis of W_clsᵀ); ``alignhead`` freezes the encoder layer.

``--enc`` / ``--head-mult`` scale the step of the encoder layer's / the head's tensors (per-block lr).

usage: python proto_zo.py MODE LR BETA C PERIOD SEEDS [--rank R] [--nu NU] [--pb P,P,P,P] [--enc X] [--head-mult X]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from zo_optim.bench.encoder import encoder

BLOCK_OF = [0] * 10 + [1] * 6 + [2, 2, 3, 3]  # attention, ffn, pooler, classifier (encoder.py's tensor order)


def _trainable(inst, mode: str) -> list[torch.Tensor]:
    if mode == "head":
        return inst.params[16:]
    if mode == "cls":
        return inst.params[18:]
    return inst.params


def _aligned(ps, mode: str, gen) -> list[torch.Tensor]:
    q, _ = torch.linalg.qr(ps[-2].detach().T)  # [384, 2]: the classifier's row space
    k = q.shape[1]
    scale = math.sqrt(q.shape[0] / k)
    dirs = []
    for i, p in enumerate(ps):
        if i == len(ps) - 4:
            dirs.append(scale * q @ torch.randn(k, p.shape[1], generator=gen))
        elif i == len(ps) - 3:
            dirs.append(scale * q @ torch.randn(k, generator=gen))
        elif mode == "alignhead" and i < len(ps) - 4:
            dirs.append(torch.zeros_like(p))
        else:
            dirs.append(torch.randn(p.shape, generator=gen))
    return dirs


def run(a: argparse.Namespace, seed: int, budget: int = 1000, evals: int = 10, eps: float = 1e-3) -> list[float]:
    inst = encoder("full", seed)
    ps = _trainable(inst, a.mode)
    dim = sum(p.numel() for p in ps)
    gen = torch.Generator().manual_seed(1234 + seed)
    mom = [torch.zeros_like(p) for p in ps]
    us = None
    fw, t, curve = 0, 0, [inst.evaluate()]
    with torch.no_grad():
        while fw < budget:
            closure = inst.closure_for_step()
            line = "guided" in a.mode and t % a.period == a.period - 1 and t >= a.period
            step_lr = a.lr
            if line:
                norm = math.sqrt(sum(float((x * x).sum()) for x in mom))
                dirs = [x * (math.sqrt(dim) / norm) for x in mom]
                step_lr = a.lr * a.c
            elif a.mode.startswith("align"):
                dirs = _aligned(ps, a.mode, gen)
            elif a.mode == "blocks":
                u, acc, block = torch.rand((), generator=gen).item(), 0.0, len(a.pb) - 1
                for b, pb in enumerate(a.pb):
                    acc += pb
                    if u < acc:
                        block = b
                        break
                dirs = [torch.randn(p.shape, generator=gen) if BLOCK_OF[i] == block else torch.zeros_like(p)
                        for i, p in enumerate(ps)]
                step_lr = a.lr / a.pb[block]
            elif "lozo" in a.mode:
                if t % a.nu == 0:
                    us = [torch.randn(p.shape[0], a.rank, generator=gen) if p.dim() == 2 else None for p in ps]
                dirs = [(u @ torch.randn(p.shape[1], a.rank, generator=gen).T) / math.sqrt(a.rank) if u is not None
                        else torch.randn(p.shape, generator=gen) for p, u in zip(ps, us, strict=True)]
            else:
                dirs = [torch.randn(p.shape, generator=gen) for p in ps]
            for p, z in zip(ps, dirs, strict=True):
                p.add_(z, alpha=eps)
            loss_plus = float(closure().mean())
            for p, z in zip(ps, dirs, strict=True):
                p.add_(z, alpha=-2 * eps)
            loss_minus = float(closure().mean())
            for p, z in zip(ps, dirs, strict=True):
                p.add_(z, alpha=eps)
            fw += 2
            g = (loss_plus - loss_minus) / (2 * eps)
            for i, (p, z) in enumerate(zip(ps, dirs, strict=True)):
                mult = (a.enc if i < 16 else a.head_mult) if len(ps) == 20 else 1.0
                p.add_(z, alpha=-step_lr * g * mult)
            if not line:
                for b, z in zip(mom, dirs, strict=True):
                    b.mul_(a.beta).add_(z, alpha=(1 - a.beta) * g)
            t += 1
            if fw % (budget // evals) == 0:
                curve.append(inst.evaluate())
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode")
    p.add_argument("lr", type=float)
    p.add_argument("beta", type=float)
    p.add_argument("c", type=float)
    p.add_argument("period", type=int)
    p.add_argument("seeds")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--nu", type=int, default=50)
    p.add_argument("--pb", default="0.22,0.21,0.55,0.02")
    p.add_argument("--enc", type=float, default=1.0)
    p.add_argument("--head-mult", type=float, default=1.0)
    a = p.parse_args()
    pb_label = a.pb
    a.pb = [float(x) for x in a.pb.split(",")]
    torch.set_num_threads(1)
    tag = a.mode
    if a.mode == "blocks":
        tag += f"/pb{pb_label}"
    if "lozo" in a.mode:
        tag += f"/r{a.rank}nu{a.nu}"
    if a.enc != 1 or a.head_mult != 1:
        tag += f"/e{a.enc:g}h{a.head_mult:g}"
    for seed in (int(s) for s in a.seeds.split(",")):
        t0 = time.time()
        curve = run(a, seed)
        print(tag, a.lr, a.beta, a.c, a.period, seed, " ".join(f"{x:.3f}" for x in curve),
              f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
