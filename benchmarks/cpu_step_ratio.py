"""A MeZO step's passes on CPU: MeZO's 4-pass torch.normal loop against zo_optim.ops (backend "cpu").

Parameter list of all-MiniLM-L6-v2 (BertConfig: vocab 30522, hidden 384, 6 layers, 12 heads,
intermediate 1536, max_position 512) built on the meta device, materialised as random fp32
tensors. Ours: +ε, −2ε, fused restore (+ε) + update (3 passes); MeZO: +ε, −2ε, +ε, update.

    PYTHONPATH=src python benchmarks/cpu_step_ratio.py [repetitions]
"""

from __future__ import annotations

import sys
import time

import numba
import numpy as np
import torch
import transformers

import zo_optim.ops as ops


def main(reps: int = 7) -> None:
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=512)
    with torch.device("meta"):
        shapes = [p.shape for p in transformers.BertModel(cfg).parameters()]
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ids = list(range(len(ps)))
    eps, lr, g = 1e-3, 1e-6, torch.tensor([0.37])

    def mezo_step(seed: int) -> None:  # MeZO's loop: per pass torch.manual_seed, per tensor torch.normal
        for scale in (1.0, -2.0, 1.0, None):
            torch.manual_seed(seed)
            for p in ps:
                z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
                p.data = p.data + (scale * eps * z if scale is not None else -lr * float(g) * z)

    def ours_step(seed: int) -> None:
        ops.perturb_(ps, ids, seed, eps, backend="cpu")
        ops.perturb_(ps, ids, seed, -2 * eps, backend="cpu")
        ops.sgd_update_(ps, ids, seed, g, lr=lr, restore_scale=eps, backend="cpu")

    print(f"{len(ps)} tensors, {sum(p.numel() for p in ps) / 1e6:.1f}M fp32 params; "
          f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}")
    mezo_step(0)
    ours_step(0)  # compiles (or loads the cache)
    wall: dict[str, list[float]] = {"mezo-loop": [], "cpu": []}
    cpu_time: dict[str, list[float]] = {"mezo-loop": [], "cpu": []}
    for r in range(reps):
        for name, fn in (("mezo-loop", mezo_step), ("cpu", ours_step)):
            t, c = time.perf_counter(), time.process_time()
            fn(r + 1)
            wall[name].append(time.perf_counter() - t)
            cpu_time[name].append(time.process_time() - c)
    for name in wall:
        print(f"{name:10s} wall ms/step: median {np.median(wall[name]) * 1e3:7.1f}  min {min(wall[name]) * 1e3:7.1f}   "
              f"CPU-time ms/step: median {np.median(cpu_time[name]) * 1e3:7.1f}")
    print(f"ratio mezo-loop/cpu: wall median {np.median(wall['mezo-loop']) / np.median(wall['cpu']):.1f}x, "
          f"CPU time {np.median(cpu_time['mezo-loop']) / np.median(cpu_time['cpu']):.1f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
