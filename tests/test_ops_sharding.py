"""Shards of sharded tensors: every op at a global element offset writes exactly the unsharded op's rows.

A rank of a ``Shard(0)`` DTensor (FSDP2) holds rows [a, b) of the row-major tensor, i.e. the contract
indices [a·row, b·row). The backends take that start as ``offsets`` (``offset`` for the reference's
own ops). The expected values are the same backend's op on the whole tensor, sliced afterwards: bitwise,
for start indices that are not multiples of 4 or 128 (the numba kernels generate z from the aligned-down
index and shift it). The DTensor dispatch itself runs in tests/test_optim_sharded.py (2 gloo ranks).
"""

from __future__ import annotations

import pytest
import torch

from zo_optim import ops

BACKENDS = [b for b in ("reference", "chunked", "cpu") if b in ops.available_backends("cpu")]
ROWS, COLS = 37, 53  # 53 elements per row: row starts hit every residue mod 4 and mod 128
SPLITS = [(0, 5), (5, 19), (19, 37), (1, 2), (36, 37)]


def _kw(backend, offset):
    if backend == "reference":
        return {"offset": offset, "compute_dtype": torch.float32}
    if backend == "chunked":
        return {"offsets": [offset], "compute_dtype": torch.float32}
    return {"offsets": [offset]}


def _op_cases():
    coeffs = torch.tensor([0.3, -0.7])
    common = dict(restore_scale=1e-3, restore_query=1, rounding="stochastic", rounding_slot=0)
    return [
        ("perturb_", (0.5,), dict(query=2, rounding="stochastic"), ("precond",)),
        ("sgd_update_", (coeffs,), dict(lr=0.1, weight_decay=0.01, momentum=0.9, **common), ("momentum_buffers",)),
        ("adamw_update_", (coeffs,), dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, step=3,
                                          **common), ("exp_avgs", "exp_avg_sqs")),
        ("precond_sgd_update_", (coeffs,), dict(lr=0.1, rule="hizoo", update_precond=True, precond_decay=0.9,
                                                precond_rate=0.1, precond_coeffs=torch.tensor([0.2, 0.4]),
                                                precond_min=1e-8, **common), ("precond",)),
        ("helene_update_", (coeffs,), dict(lr=0.1, alpha=0.5, beta1=0.9, beta2=0.99, gamma=1.0, eps=1e-8,
                                           clip=[1.0], update_hessian=True, hessian_coeffs=torch.tensor([0.5, 0.1]),
                                           **common), ("exp_avgs", "hessians")),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_a_shard_at_its_offset_writes_the_unsharded_rows(backend, distribution, dtype, case):
    op, args, kwargs, state_names = case
    fn = getattr(ops.load_backend(backend), op)
    torch.manual_seed(0)
    full = torch.randn(ROWS, COLS).to(dtype)
    states = {k: torch.rand(ROWS, COLS) + 0.5 for k in state_names}  # > 0: valid preconditioners too
    whole = full.clone()
    whole_states = {k: v.clone() for k, v in states.items()}
    fn([whole], [3], 1234, *args, **{k: [v] for k, v in whole_states.items()}, **kwargs,
       distribution=distribution, **_kw(backend, 0))
    assert not torch.equal(whole, full)
    for lo, hi in SPLITS:
        part = full[lo:hi].clone()
        part_states = {k: v[lo:hi].clone() for k, v in states.items()}
        fn([part], [3], 1234, *args, **{k: [v] for k, v in part_states.items()}, **kwargs,
           distribution=distribution, **_kw(backend, lo * COLS))
        assert torch.equal(part, whole[lo:hi]), (lo, hi)
        for k in state_names:
            if op != "perturb_":
                assert torch.equal(part_states[k], whole_states[k][lo:hi]), (k, lo, hi)


def test_a_wrong_offset_moves_other_values():
    """The comparison above can fail: rows [5, 19) at offset 0 get rows [0, 14)'s z."""
    fn = ops.load_backend("chunked").perturb_
    full = torch.zeros(ROWS, COLS)
    whole = full.clone()
    fn([whole], [3], 1234, 0.5, offsets=[0])
    part = full[5:19].clone()
    fn([part], [3], 1234, 0.5, offsets=[0])
    assert not torch.equal(part, whole[5:19])


def test_triton_refuses_shards_and_auto_avoids_it():
    with pytest.raises(RuntimeError, match="does not take shards"):
        ops.resolve_backend("triton", torch.device("cuda"), [torch.float32], sharded=True)
    assert ops.resolve_backend("auto", torch.device("cuda"), [torch.float32], sharded=True) != "triton"


def test_unsupported_tensor_subclasses_are_refused_untouched():
    from torch.testing._internal.two_tensor import TwoTensor

    t = TwoTensor(torch.zeros(4), torch.zeros(4))
    with pytest.raises(TypeError, match="tensor subclass"):
        ops.perturb_([t], [0], 1, 1.0, backend="chunked")
    assert torch.equal(t.a, torch.zeros(4))
    zero3 = torch.nn.Parameter(torch.zeros(0))
    zero3.ds_id = 0  # what DeepSpeed ZeRO-3 puts on its partitioned parameters
    with pytest.raises(TypeError, match="ZeRO-3"):
        ops.perturb_([zero3], [0], 1, 1.0, backend="chunked")


def test_the_optimizer_refuses_them_at_construction():
    from torch.testing._internal.two_tensor import TwoTensor

    import zo_optim

    t = torch.nn.Parameter(TwoTensor(torch.zeros(4), torch.zeros(4)))
    with pytest.raises(TypeError, match=r"MeZO: params\[0\] is a .*DTensor with Shard\(0\) or Replicate\(\)"):
        zo_optim.MeZO([t], lr=0.1, seed=0)
