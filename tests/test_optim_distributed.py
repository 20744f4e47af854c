"""Data parallel: 2 gloo processes, different data per rank, replicas stay bit-identical."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim_infos import OPTIMIZERS, loss_closure, tiny_data, tiny_model

STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for info in OPTIMIZERS:
            model = tiny_model(seed=0)  # same initial weights on every rank
            x, y = tiny_data(seed=rank)  # different data per rank
            # seed=None: each rank draws its own base seed; rank 0's must win
            opt = info.cls(model.parameters(), **{**info.inputs[-1], "backend": "reference", "seed": None})
            grads = []
            for _ in range(STEPS):
                opt.step(loss_closure(model, x, y, per_example=True))
                grads.append(opt.last_projected_grads.clone())
            results[info.name] = {
                "weights": [p.detach().clone() for p in model.parameters()],
                "grads": grads,
                "base_seed": opt.base_seed,
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_stay_bit_identical(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for info in OPTIMIZERS:
        a, b = r0[info.name], r1[info.name]
        assert a["base_seed"] == b["base_seed"], info.name
        for g_a, g_b in zip(a["grads"], b["grads"], strict=True):
            assert torch.equal(g_a, g_b), info.name
        for w_a, w_b in zip(a["weights"], b["weights"], strict=True):
            assert torch.equal(w_a, w_b), info.name
        # the update used the mean over ranks: it differs from what rank 0's data alone gives
        model = tiny_model(seed=0)
        x, y = tiny_data(seed=0)
        opt = info.cls(model.parameters(), **{**info.inputs[-1], "backend": "reference", "seed": a["base_seed"]})
        for _ in range(STEPS):
            opt.step(loss_closure(model, x, y, per_example=True))
        assert not torch.equal(next(model.parameters()).detach(), a["weights"][0]), info.name
