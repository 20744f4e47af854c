"""Per-block gradient and curvature of the encoder problem at its start (autograd, 512 training examples).

Blocks: attention, ffn (the last encoder layer's), pooler, classifier. Prints each block's size, its share of
‖∇L‖² and, for 10 Gaussian z restricted to the block, the mean ± std of zᵀHz (Hessian-vector products by double
backward): E[zᵀHz] = tr H_block, the curvature a ZO probe of that block meets.

usage: python block_shares.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zo_optim.bench.encoder import encoder


def main() -> None:
    torch.manual_seed(0)
    inst = encoder("full", 0)
    ps, names = inst.params, inst.names
    block_of = {n: b for b, ns in inst.extras["blocks"].items() for n in ns}

    def block(name: str) -> str:
        if name.startswith("bert.pooler"):
            return "pooler"
        return "classifier" if name.startswith("classifier") else block_of[name]

    data, logits = inst.extras["data"]["train"], inst.extras["logits"]
    idx = torch.arange(512)
    loss = F.cross_entropy(logits(data["h"][idx], data["mask"][idx]), data["y"][idx])
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    sq, size = {}, {}
    for n, g, p in zip(names, grads, ps, strict=True):
        sq[block(n)] = sq.get(block(n), 0.0) + float((g.detach() ** 2).sum())
        size[block(n)] = size.get(block(n), 0) + p.numel()
    total = sum(sq.values())
    print(f"‖∇L‖² = {total:.4g}")
    for b in sq:
        vals = []
        for _ in range(10):
            vs = [torch.randn(p.shape) if block(n) == b else torch.zeros_like(p)
                  for n, p in zip(names, ps, strict=True)]
            hv = torch.autograd.grad(grads, ps, grad_outputs=vs, retain_graph=True)
            vals.append(sum(float((v * h).sum()) for v, h in zip(vs, hv, strict=True)))
        t = torch.tensor(vals)
        print(f"{b:<11} {size[b]:>8} params  share of ‖∇L‖² {sq[b] / total:.4f}  "
              f"zᵀHz {t.mean():.2f} ± {t.std():.2f}")


if __name__ == "__main__":
    main()
