"""DeComFL (MeZO, forward differences) vs HiSo in the in-process federated simulation.

6 clients with a Dirichlet(0.5) non-IID split of a small synthetic classification task, 2 sampled per
round, P = 5 directions, τ = 1 (the DeComFL/HiSo papers' client setting). Prints rounds, loss and bytes.

    python examples/federated_simulate.py [rounds]
"""

from __future__ import annotations

import sys

import torch

import zo_optim
from zo_optim.federated import dirichlet_split, simulate


def problem(n: int = 600, dim: int = 10, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


def run(rounds: int = 200, progress: bool = True) -> dict[str, object]:
    x, y = problem()
    parts = dirichlet_split(y, 6, 0.5, seed=0, min_size=16)

    def model_fn():
        torch.manual_seed(0)
        return torch.nn.Linear(x.shape[1], 3)

    def client_loss(idx):
        idx = torch.tensor(idx)

        def loss(model, step):
            g = torch.Generator().manual_seed(step)  # batch `step`: the same batch for the same step
            b = idx[torch.randint(0, len(idx), (16,), generator=g)]
            return torch.nn.functional.cross_entropy(model(x[b]), y[b])

        return loss

    losses = [client_loss(p) for p in parts]
    algos = {
        "DeComFL (MeZO fwd, P=5)": lambda m: zo_optim.MeZO(m.parameters(), lr=0.05, estimator="forward",
                                                            num_queries=5),
        "HiSo (P=5)": lambda m: zo_optim.HiSo(m.parameters(), lr=0.05, num_queries=5),
    }
    out = {}
    for name, opt_fn in algos.items():
        if progress:
            print(f"--- {name}")
        res = simulate(model_fn, opt_fn, losses, rounds=rounds, clients_per_round=2, seed=1, progress=progress)
        with torch.no_grad():
            full = float(torch.nn.functional.cross_entropy(res.server(x), y))
        if progress:
            print(f"{name}: {rounds} rounds, full-data loss {full:.4f}, bytes up {res.bytes_up} "
                  f"down {res.bytes_down} ({res.bytes_up / rounds / 2:.1f} B up per client per round), "
                  f"replicas identical: {res.replicas_identical().describe()}")
        out[name] = (res, full)
    return out


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
