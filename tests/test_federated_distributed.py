"""torch.distributed engine: 3 real gloo processes (rank 0 serves, 2 clients); every replica bit-identical."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zo_optim
from fed_problems import batch_loss, data, mlp_fn
from gloo import free_port, gloo_group

ROUNDS = 6
WORLD = 3



def _worker(rank: int, port: int, out_dir: str) -> None:
    from zo_optim.federated.distributed import run_distributed

    with gloo_group(rank, WORLD, port):
        results = {}
        for name, tau in (("hiso", 2), ("hizoo", 1)):
            model = mlp_fn()
            if name == "hiso":
                opt = zo_optim.HiSo(model.parameters(), lr=0.05, num_queries=2, backend="reference")
            else:  # an algorithm with an extra scalar stream (curvature)
                opt = zo_optim.HiZOO(model.parameters(), lr=0.02, hessian_smooth=1e-3, backend="reference")
            loss = batch_loss(*data(WORLD, seed=1)[rank])  # different data per client
            closure = (lambda s, loss=loss, model=model: loss(model, s)) if rank else None
            res = run_distributed(model, opt, closure, rounds=ROUNDS,
                                  clients_per_round=1 + (name == "hiso"), local_steps=tau, seed=42)
            results[name] = {
                "checksum": res.checksum,
                "weights": [p.detach().clone() for p in model.parameters()],
                "participants": [list(r.participants) for r in res.history],
                "rejections": dict(res.server.rejections) if res.server else {},
                "up": res.tensor_bytes_up,
                "down": res.tensor_bytes_down,
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.distributed
def test_three_gloo_processes_stay_bit_identical(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    start = [p.detach() for p in mlp_fn().parameters()]
    for name in ("hiso", "hizoo"):
        server = ranks[0][name]
        assert server["rejections"] == {}
        if name == "hiso":
            assert all(p == [0, 1] for p in server["participants"])
        else:  # one of the two clients per round: the other applies the broadcast entry without computing
            assert all(len(p) == 1 for p in server["participants"])
        assert len(server["participants"]) == ROUNDS
        for r in ranks[1:]:
            assert r[name]["checksum"] == server["checksum"], name
            for a, b in zip(r[name]["weights"], server["weights"], strict=True):
                assert torch.equal(a, b)
        assert any(not torch.equal(a, b) for a, b in zip(server["weights"], start, strict=True))  # it moved
    # fixed-size tensors: a client sends 3 int64 + (1 + τ·P·streams) float32 per round
    assert ranks[1]["hiso"]["up"] == ROUNDS * (3 * 8 + (1 + 2 * 2) * 4)
    assert ranks[1]["hizoo"]["up"] == ROUNDS * (3 * 8 + (1 + 1 * 1 * 2) * 4)
