"""Sharded models (FSDP2, DTensor parameters): 2 gloo ranks, one spawn running every case.

What must hold (ops._sharding): a rank writes its local rows of a ``Shard(0)`` tensor with their
global element offsets, so N steps under FSDP2 end bit-identical (weights and optimizer state,
gathered) to the same N steps under plain data parallel with full replicas; both runs see the
same per-rank batches and average the same scalars. The reference run is independent of the
change under test: replicated plain tensors take the unsharded code path (offset 0). Also:
sharded resume through torch.distributed.checkpoint, resume of a sharded run from a replicated
run's (full) state dict, and the refusals (Shard(1), Partial, transient mode) before any write. Every backend takes
shards, Triton (in its interpreter on CPU) included.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo import free_port, gloo_group

STEPS = 3
HAVE_NUMBA = importlib.util.find_spec("numba") is not None

# (optimizer, kwargs): the table's non-default settings (momentum, weight decay, several queries, forward
# estimator, Rademacher, HELENE's per-example A-GNB and λ by dimension, HiSo's interval, anchor_decay)
CASES = [
    ("MeZO", dict(lr=1e-2, momentum=0.9, weight_decay=0.1, num_queries=2)),
    ("MeZO", dict(lr=1e-2, estimator="forward", distribution="rademacher")),
    ("ZOAdam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, num_queries=3, estimator="forward")),
    ("HiZOO", dict(lr=1e-2, hessian_smooth=0.3, num_queries=2, weight_decay=0.1)),
    ("HELENE", dict(lr=1e-3, hessian_interval=1, lambda_mode="dim", weight_decay=0.1, num_queries=2)),
    ("HiSo", dict(lr=1e-2, num_queries=3, k_interval=2, estimator="central")),
    # the pull toward the start: its anchors are DTensors sharded like their parameters, pulled shard by shard
    ("ZOAdam", dict(lr=1e-2, anchor_decay=5.0, num_queries=2)),
]


class Net(torch.nn.Module):
    """Two Linears (7 and 3 rows: uneven shards over 2 ranks) and a parameter owned by the root itself
    (the root's FSDP group is the one most likely to keep an unsharded copy between forwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(5, 7)
        self.l2 = torch.nn.Linear(7, 3)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x))) * self.scale


def _model(dtype: torch.dtype, sharded: bool) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # same initial weights on every rank and in both runs
    model = Net().to(dtype)
    if sharded:
        fully_shard(model.l1)
        fully_shard(model.l2)
        # FSDP2 keeps the root's parameters gathered after a forward by default (a backward would gather them
        # again); ZO forwards have no backward, so the root must reshard, or it would read stale weights
        fully_shard(model, reshard_after_forward=True)
    return model


def _closure(model, dtype):
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # a different batch per rank
    x = torch.randn(6, 5, generator=g).to(dtype)
    y = torch.randn(6, 3, generator=g).to(dtype)
    return lambda: ((model(x) - y) ** 2).float().mean(dim=1)  # per-example losses (HELENE's A-GNB)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _gathered(model, opt) -> dict[str, torch.Tensor]:
    """Weights and optimizer state as full tensors (a collective for DTensors), keyed by name."""
    out = {f"w.{n}": _full(p.detach()).clone() for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    for i, entry in opt.state_dict()["state"].items():
        for k, v in entry.items():
            out[f"s.{names[i]}.{k}"] = _full(v).clone()
    return out


def _run(name, kwargs, dtype, backend, sharded, steps=STEPS):
    import zo_optim

    model = _model(dtype, sharded)
    opt = getattr(zo_optim, name)(model.parameters(), **kwargs, backend=backend, seed=1234)
    closure = _closure(model, dtype)
    for _ in range(steps):
        opt.step(closure)
    return model, opt


def _compare(a, b, what, failures):
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
            failures.append(f"{what}: {k} differs (max |d| {(a[k].float() - b[k].float()).abs().max():g})")


def _backends_for(name, kwargs, dtype, backends):
    if (name, kwargs) == CASES[0]:
        return backends  # every backend's shard path on the first case
    # the default one on all; triton (interpreted: ~1 s of CPU per step) also on a fused update with state
    # (ZOAdam's m and v) in bfloat16 (stochastic rounding); tests/test_ops_sharding.py runs each of its kernels
    triton = name == "ZOAdam" and dtype == torch.bfloat16
    return backends[:1] + [b for b in backends if b == "triton" and triton]


def _exactness(backends, failures):
    for name, kwargs in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            for backend in _backends_for(name, kwargs, dtype, backends):
                what = f"{name} {kwargs} {dtype} {backend}"
                ref = _gathered(*_run(name, kwargs, dtype, backend, sharded=False))
                shard_model, shard_opt = _run(name, kwargs, dtype, backend, sharded=True)
                assert type(next(shard_model.parameters())).__name__ == "DTensor"
                got = _gathered(shard_model, shard_opt)
                # state is sharded like its parameter: this rank holds its rows only
                # (fp32 buffers, and anchor_decay's anchors in the parameter's dtype)
                local = sum(p.to_local().numel() * v.element_size() for p in shard_model.parameters()
                            for v in shard_opt.state[p].values() if torch.is_tensor(v))
                if shard_opt.state_bytes() != local:
                    failures.append(f"{what}: state_bytes {shard_opt.state_bytes()} is not the local shards'")
                _compare(ref, got, what, failures)
                # and the run moved the weights (a no-op optimizer would pass the comparison)
                init = _model(dtype, sharded=False)
                if torch.equal(init.l1.weight, ref["w.l1.weight"]):
                    failures.append(f"{what}: weights did not move")


def _resume(tmp, failures):
    """Sharded resume through DCP, and a sharded run resumed from a replicated run's full state dict."""
    import torch.distributed.checkpoint as dcp

    import zo_optim

    name, kwargs, dtype = "ZOAdam", CASES[2][1], torch.float32
    whole = _gathered(*_run(name, kwargs, dtype, "auto", sharded=True, steps=4))
    # 1. FSDP2 run: 2 steps, save (DCP, each rank its shards), fresh model + optimizer, load, 2 more steps
    model, opt = _run(name, kwargs, dtype, "auto", sharded=True, steps=2)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=os.path.join(tmp, "ckpt"))
    model2 = _model(dtype, sharded=True)
    with torch.no_grad():  # different weights: the load must bring them back
        for p in model2.parameters():
            p.mul_(0.5)
    opt2 = getattr(zo_optim, name)(model2.parameters(), **kwargs, backend="auto", seed=99)
    sd = {"model": model2.state_dict(), "optim": opt2.state_dict()}
    dcp.load(sd, checkpoint_id=os.path.join(tmp, "ckpt"))
    model2.load_state_dict(sd["model"])
    opt2.load_state_dict(sd["optim"])
    closure = _closure(model2, dtype)
    for _ in range(2):
        opt2.step(closure)
    _compare(whole, _gathered(model2, opt2), "DCP resume", failures)
    # 1b. the same through DCP's state dict helpers (FQN-keyed; they keep only "state" and "param_groups")
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = _run(name, kwargs, dtype, "auto", sharded=True, steps=2)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=os.path.join(tmp, "ckpt-helpers"))
    model2 = _model(dtype, sharded=True)
    with torch.no_grad():
        for p in model2.parameters():
            p.mul_(0.5)
    opt2 = getattr(zo_optim, name)(model2.parameters(), **kwargs, backend="auto", seed=99)
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=os.path.join(tmp, "ckpt-helpers"))
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    if any(p.grad is not None for p in model2.parameters()):
        failures.append("DCP helpers: gradients were allocated (their zero-gradient 'initialisation' step ran)")
    closure = _closure(model2, dtype)
    for _ in range(2):
        opt2.step(closure)
    _compare(whole, _gathered(model2, opt2), "DCP state dict helpers resume", failures)
    # 2. the replicated run's state dict (full tensors) loaded into a sharded optimizer: each rank keeps its rows
    ref_model, ref_opt = _run(name, kwargs, dtype, "auto", sharded=False, steps=2)
    full_sd = ref_opt.state_dict()
    model3 = _model(dtype, sharded=True)
    with torch.no_grad():
        for p3, p in zip(model3.parameters(), ref_model.parameters(), strict=True):
            p3.copy_(torch.distributed.tensor.distribute_tensor(p.detach(), p3.device_mesh, p3.placements))
    opt3 = getattr(zo_optim, name)(model3.parameters(), **kwargs, backend="auto", seed=7)
    opt3.load_state_dict(full_sd)
    closure = _closure(model3, dtype)
    for _ in range(2):
        opt3.step(closure)
    _compare(whole, _gathered(model3, opt3), "resume from a full (replicated) state dict", failures)


def _refusals(failures):
    from torch.distributed.tensor import Partial, Shard, distribute_tensor, init_device_mesh

    import zo_optim
    from zo_optim import ops

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    for placement in (Shard(1), Partial()):
        w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        if isinstance(placement, Partial):
            w = torch.nn.Parameter(torch.distributed.tensor.DTensor.from_local(
                torch.randn(4, 6), mesh, [placement], run_check=False))
        before = w.to_local().clone()
        try:
            zo_optim.MeZO([w], lr=0.1, seed=0)
            failures.append(f"{placement}: constructed")
        except TypeError as e:
            if "Shard(0) or Replicate()" not in str(e):
                failures.append(f"{placement}: unhelpful error {e}")
        try:  # the ops themselves refuse too, before writing
            ops.perturb_([w], [0], 1, 1.0, backend="chunked")
            failures.append(f"{placement}: perturb_ ran")
        except TypeError:
            pass
        if not torch.equal(w.to_local(), before):
            failures.append(f"{placement}: weights written")
    # Replicate() is supported: every rank holds the whole tensor (offset 0) and steps as a plain replica does
    from torch.distributed.tensor import Replicate

    torch.manual_seed(1)
    init = torch.randn(5, 3)
    plain = torch.nn.Parameter(init.clone())
    rep = torch.nn.Parameter(distribute_tensor(init.clone(), mesh, [Replicate()]))
    for w in (plain, rep):
        opt = zo_optim.ZOAdam([w], lr=0.1, seed=3)
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(dist.get_rank()))
        for _ in range(2):
            opt.step(lambda w=w, x=x: (x @ (w.full_tensor() if hasattr(w, "full_tensor") else w)).square().mean())
    if not torch.equal(rep.to_local(), plain.detach()) or torch.equal(plain.detach(), init):
        failures.append("Replicate(): differs from the plain replica (or did not move)")
    # transient mode: FSDP2 forwards read all-gathered copies, not the shards hooks would perturb
    model = _model(torch.float32, sharded=True)
    try:
        zo_optim.MeZO(model.parameters(), lr=0.1, seed=0, module=model)
        failures.append("transient: constructed")
    except ValueError as e:
        if "transient" not in str(e):
            failures.append(f"transient: unhelpful error {e}")
    # every backend takes shards: auto picks for CUDA shards what it picks for CUDA tensors (triton when it imports)
    cuda = torch.device("cuda")
    if ops.resolve_backend("auto", cuda, [torch.float32], sharded=True) != ops.resolve_backend("auto", cuda):
        failures.append("auto picks another backend for shards")


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    with gloo_group(rank, world, port):
        failures: list[str] = []
        import time
        t0 = time.perf_counter()
        from zo_optim import ops

        # triton runs CPU tensors in its interpreter (conftest.py sets TRITON_INTERPRET=1, inherited by the spawn)
        triton = ["triton"] if "triton" in ops.available_backends("cpu") else []
        _exactness(["auto", "reference", "chunked", *triton], failures)
        print(f"rank {rank}: exactness {time.perf_counter() - t0:.1f} s", flush=True)
        _resume(tmp, failures)
        _refusals(failures)
        print(f"rank {rank}: all {time.perf_counter() - t0:.1f} s", flush=True)
        torch.save(failures, os.path.join(tmp, f"failures{rank}.pt"))


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"{CASES[i][0]}-{i}")
def test_dcp_state_dict_helpers_resume_bit_for_bit(case):
    """torch.distributed.checkpoint's get/set_optimizer_state_dict on one process (the 2-rank FSDP2 run is in the
    spawned test): they drop the top-level "zo" section (seed, step counter), key the state by parameter name,
    and "initialise" an optimizer with empty state by a zero-gradient step() without closure."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    import zo_optim

    name, kwargs = CASES[case]
    cls = getattr(zo_optim, name)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))

    def closure(m):
        return lambda: (m(x) ** 2).mean(dim=1)

    def make(seed):
        torch.manual_seed(0)
        model = Net()
        return model, cls(model.parameters(), **kwargs, backend="chunked", seed=seed)

    model, opt = make(1234)
    for _ in range(4):
        opt.step(closure(model))
    model2, opt2 = make(1234)
    for _ in range(2):
        opt2.step(closure(model2))
    osd = get_optimizer_state_dict(model2, opt2)
    assert "zo" not in osd and {type(k) for k in osd["state"]} <= {str}  # what DCP makes of our state dict
    model3, opt3 = make(99)  # another seed: the load must bring the counters back
    get_optimizer_state_dict(model3, opt3)  # on a fresh optimizer too (MeZO without momentum: never any state)
    with torch.no_grad():
        for p3, p2 in zip(model3.parameters(), model2.parameters(), strict=True):
            p3.copy_(p2)
    set_optimizer_state_dict(model3, opt3, osd)
    assert all(p.grad is None for p in model3.parameters())  # no zero-gradient "initialisation" step
    assert (opt3.step_count, opt3.base_seed) == (2, opt.base_seed)
    # the groups' copies of the zo section are not hyper-parameters: they stay out of the live groups (the
    # federated layer digests those, and a stale step counter there would split replicas)
    opt2.load_state_dict(opt2.state_dict())
    assert all("zo" not in g for o in (opt2, opt3) for g in o.param_groups)
    for _ in range(2):
        opt3.step(closure(model3))
    for a, b in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, p3 in zip(model.parameters(), model3.parameters(), strict=True):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt3.state[p3][k]), k


@pytest.mark.distributed
def test_fsdp2_equals_data_parallel_resumes_and_refuses(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        failures = torch.load(tmp_path / f"failures{rank}.pt")
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)
