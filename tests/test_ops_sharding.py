"""Shards of sharded tensors: every op at a global element offset writes exactly the unsharded op's rows.

A rank of a ``Shard(0)`` DTensor (FSDP2) holds rows [a, b) of the row-major tensor, i.e. the contract
indices [a·row, b·row). The backends take that start as ``offsets`` (``offset`` for the reference's
own ops). The expected values are the same backend's op on the whole tensor, sliced afterwards: bitwise,
for start indices that are not multiples of 4 or 128 (the numba kernels generate z from the aligned-down
index and shift it; the Triton kernels run the blocks of the unsharded tensor that overlap the shard and
mask both ends: blocks of 128 here, so that the 37×53 tensor spans 16 blocks and a shard starts and ends
inside them). Same backend on both sides, so bitwise even for Gaussian z (which agrees between backends
only within the contract's tolerance). The DTensor dispatch itself runs in tests/test_optim_sharded.py
(2 gloo ranks).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from zo_optim import ops

# triton: its interpreter on CPU (conftest.py sets TRITON_INTERPRET=1 unless told to run the kernels on a GPU)
TRITON_DEVICE = torch.device(os.environ.get("ZO_OPTIM_TRITON_DEVICE") or "cpu")
BACKENDS = [b for b in ("reference", "chunked", "cpu") if b in ops.available_backends("cpu")]
BACKENDS += [b for b in ("triton",) if b in ops.available_backends(TRITON_DEVICE)]
ROWS, COLS = 37, 53  # 53 elements per row: row starts hit every residue mod 4 and mod 128
SPLITS = [(0, 5), (5, 19), (19, 37), (1, 2), (36, 37), (20, 20)]  # (20, 20): an empty shard (more ranks than rows)
# triton's 13×29 tensor in blocks of 128: shards starting at 29, 145, 348 (residues 1, 17, 92 mod 4 and 128),
# one spanning a whole block (the unmasked path), one empty
TRITON_SPLITS = [(0, 5), (5, 12), (1, 12), (12, 13), (6, 6)]


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


def _triton_subset(backend, dtype, distribution):
    # The interpreter runs a program per block in Python: triton takes Gaussian z in float32 and Rademacher z
    # with bfloat16's stochastic rounding (every RNG stream, both rounding paths), not all four combinations.
    return backend == "triton" and (dtype == torch.float32) != (distribution == "gaussian")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_a_shard_at_its_offset_writes_the_unsharded_rows(backend, distribution, dtype, case):
    if _triton_subset(backend, dtype, distribution):
        pytest.skip("triton: Gaussian z in float32 and Rademacher z in bfloat16 cover its paths (interpreter cost)")
    op, args, kwargs, state_names = case
    fn = getattr(ops.load_backend(backend), op)
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    # the interpreter runs one program per block in Python: a smaller tensor for triton, still 3 blocks of 128
    rows, cols, splits = (13, 29, TRITON_SPLITS) if backend == "triton" else (ROWS, COLS, SPLITS)
    torch.manual_seed(0)
    full = torch.randn(rows, cols).to(dtype).to(device)
    states = {k: (torch.rand(rows, cols) + 0.5).to(device) for k in state_names}  # > 0: valid preconditioners too
    whole = full.clone()
    whole_states = {k: v.clone() for k, v in states.items()}
    small_blocks = contextlib.nullcontext
    if backend == "triton":
        from zo_optim.ops.triton import launch

        small_blocks = lambda: launch.block_size(128)
    with small_blocks():
        # the unsharded run: no offsets at all (the kernels' plain variant), the reference of the sharded ones
        fn([whole], [3], 1234, *args, **{k: [v] for k, v in whole_states.items()}, **kwargs,
           distribution=distribution, **({} if backend == "triton" else _kw(backend, 0)))
    assert not torch.equal(whole, full)
    parts = [full[lo:hi].clone() for lo, hi in splits]
    part_states = {k: [v[lo:hi].clone() for lo, hi in splits] for k, v in states.items()}
    with small_blocks():
        if backend == "reference":  # the spec takes one offset per call
            for i, (lo, _) in enumerate(splits):
                fn([parts[i]], [3], 1234, *args, **{k: [v[i]] for k, v in part_states.items()}, **kwargs,
                   distribution=distribution, **_kw(backend, lo * cols))
        else:  # every shard in one call: one table with a different offset per row
            per_part = {"clip": kwargs["clip"] * len(splits)} if "clip" in kwargs else {}
            fn(parts, [3] * len(splits), 1234, *args, **part_states, **{**kwargs, **per_part},
               distribution=distribution, **{**_kw(backend, 0), "offsets": [lo * cols for lo, _ in splits]})
    for i, (lo, hi) in enumerate(splits):
        assert torch.equal(parts[i], whole[lo:hi]), (lo, hi)
        for k in state_names:
            if op != "perturb_":
                assert torch.equal(part_states[k][i], whole_states[k][lo:hi]), (k, lo, hi)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
def test_triton_shards_at_multiples_of_16_take_the_aligned_path():
    """Offsets that are multiples of 16 elements keep the 16-byte alignment hint (128-bit accesses on a GPU):
    that variant computes the block's address from the offset rounded to 16, so it gets its own check."""
    from zo_optim.ops.triton import launch

    fn = ops.load_backend("triton").sgd_update_
    torch.manual_seed(0)
    full = torch.randn(12, 16).to(TRITON_DEVICE)  # row starts 16·k: aligned, and inside blocks of 128
    bufs = torch.rand(12, 16).to(TRITON_DEVICE)
    kw = dict(lr=0.1, momentum=0.9, restore_scale=1e-3, restore_query=1, rounding="stochastic")
    coeffs = torch.tensor([0.3, -0.7], device=TRITON_DEVICE)
    whole, whole_buf = full.clone(), bufs.clone()
    splits = [(0, 3), (3, 11), (11, 12)]
    parts, part_bufs = [full[a:b].clone() for a, b in splits], [bufs[a:b].clone() for a, b in splits]
    with launch.block_size(128):
        fn([whole], [5], 77, coeffs, momentum_buffers=[whole_buf], **kw)
        launch.table_cache.clear()
        fn(parts, [5] * 3, 77, coeffs, momentum_buffers=part_bufs, offsets=[a * 16 for a, _ in splits], **kw)
        (tables,) = launch.table_cache._entries.values()
    assert tables.aligned  # the path under test ran
    for (a, b), part, buf in zip(splits, parts, part_bufs, strict=True):
        assert torch.equal(part, whole[a:b]) and torch.equal(buf, whole_buf[a:b]), (a, b)


def test_a_wrong_offset_moves_other_values():
    """The comparison above can fail: rows [5, 19) at offset 0 get rows [0, 14)'s z."""
    fn = ops.load_backend("chunked").perturb_
    full = torch.zeros(ROWS, COLS)
    whole = full.clone()
    fn([whole], [3], 1234, 0.5, offsets=[0])
    part = full[5:19].clone()
    fn([part], [3], 1234, 0.5, offsets=[0])
    assert not torch.equal(part, whole[5:19])


def test_every_backend_takes_shards_and_auto_picks_the_same_for_them():
    """Shards resolve like whole tensors: ``auto`` runs CUDA shards on Triton, not on the slow ``chunked``."""
    for device in ("cpu", "cuda"):
        for name in ops.BACKENDS:
            try:
                plain = ops.resolve_backend(name, torch.device(device), [torch.float32])
            except (ImportError, RuntimeError):
                continue
            assert ops.resolve_backend(name, torch.device(device), [torch.float32], sharded=True) == plain


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
