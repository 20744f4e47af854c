"""Data parallel: 2 gloo processes, different data per rank, replicas stay bit-identical."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo import free_port, gloo_group
from optim_infos import OPTIMIZERS, loss_closure, tiny_data, tiny_model

STEPS = 3



def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port, timeout_s=None):
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


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_stay_bit_identical(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
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


def _worker_raise_and_sum(rank: int, world: int, port: int, out_dir: str) -> None:
    import zo_optim
    from zo_optim.optim.base import NonFiniteLossError

    # a short timeout: a rank left alone in the all-reduce must fail the test, not hang it
    with gloo_group(rank, world, port, timeout_s=30):
        result = {}
        # on_nonfinite="raise" with a NaN on rank 1 only: every rank restores and raises together
        model = tiny_model(seed=0)
        x, y = tiny_data(seed=rank)
        opt = zo_optim.MeZO(model.parameters(), lr=1e-2, backend="reference", seed=0, on_nonfinite="raise")
        inner = loss_closure(model, x, y)
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step((lambda: inner() * float("nan")) if rank == 1 else inner)
            result["raised"] = False
        except NonFiniteLossError:
            result["raised"] = True
        after = [p.detach() for p in model.parameters()]
        result["drift"] = max((a - b).abs().max().item() for a, b in zip(before, after, strict=True))
        result["step_count"] = opt.step_count
        # HELENE: each rank holds half of one batch of 16; Σ_b g_b² is summed across ranks
        model = tiny_model(seed=0)
        x, y = tiny_data(seed=0)
        half = slice(8 * rank, 8 * rank + 8)
        opt = zo_optim.HELENE(model.parameters(), lr=1e-3, backend="reference", seed=0)
        opt.step(loss_closure(model, x[half], y[half], per_example=True))
        result["sq_grad_sum"] = opt.last_extra_scalars["sq_grad_sum"].clone()
        result["hessian"] = [opt.state[p]["hessian"].clone() for p in model.parameters()]
        torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_two_ranks_raise_together_and_sum_sq_grad_sum(tmp_path):
    import zo_optim

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_worker_raise_and_sum, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        assert r["raised"] and r["step_count"] == 0
        assert r["drift"] <= 1e-6
    model = tiny_model(seed=0)
    x, y = tiny_data(seed=0)
    opt = zo_optim.HELENE(model.parameters(), lr=1e-3, backend="reference", seed=0)
    opt.step(loss_closure(model, x, y, per_example=True))  # the whole batch of 16 in one process
    for r in results:
        torch.testing.assert_close(r["sq_grad_sum"], opt.last_extra_scalars["sq_grad_sum"], rtol=1e-3, atol=1e-5)
        for h, p in zip(r["hessian"], model.parameters(), strict=True):
            torch.testing.assert_close(h, opt.state[p]["hessian"], rtol=1e-3, atol=1e-9)


def _worker_independent(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port):
        results = {}
        for info in OPTIMIZERS:
            model = tiny_model(seed=0)
            x, y = tiny_data(seed=rank)
            # only rank 1 steps, and a different number of times: with data_parallel=True this would hang
            opt = info.cls(model.parameters(), **{**info.inputs[-1], "backend": "reference", "seed": 100 + rank,
                                                   "data_parallel": False})
            for _ in range(rank * STEPS):
                opt.step(loss_closure(model, x, y, per_example=True))
            results[info.name] = {"weights": [p.detach().clone() for p in model.parameters()],
                                  "base_seed": opt.base_seed}
        torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_data_parallel_false_enters_no_collective(tmp_path):
    """Independent optimizers under a live process group (federated replicas): own seed, own steps."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_worker_independent, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for info in OPTIMIZERS:
        model = tiny_model(seed=0)
        x, y = tiny_data(seed=1)
        opt = info.cls(model.parameters(), **{**info.inputs[-1], "backend": "reference", "seed": 101})
        for _ in range(STEPS):
            opt.step(loss_closure(model, x, y, per_example=True))
        assert r1[info.name]["base_seed"] == 101, info.name  # not rank 0's seed
        for w, ref in zip(r1[info.name]["weights"], model.parameters(), strict=True):
            assert torch.equal(w, ref.detach()), info.name  # rank 1's data alone, as in a single process


def test_data_parallel_must_be_a_bool():
    with pytest.raises(TypeError, match="Invalid data_parallel: 'no'"):
        OPTIMIZERS[0].cls(tiny_model(seed=0).parameters(), data_parallel="no")
