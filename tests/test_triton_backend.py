"""The Triton backend (``zo_optim.ops.triton``) against the reference, kernel by kernel.

Runs under Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set by conftest.py)
and natively on a CUDA machine. Complements tests/test_ops.py (every fast backend
vs the reference through the public API) with what is specific to these kernels:
the ``@triton.jit`` RNG pieces bit for bit, the rounding helpers on special
values, both the unmasked (full block) and masked (tail) paths, the one launch per
(device, dtype) group and the host-side table cache.

Small blocks (``launch.block_size(128)``) make tiny tensors fill whole blocks, so
the unmasked fast path runs without large inputs (the interpreter is slow).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend_checks import backend_or_skip

# "cuda" (compiled kernels) or "cpu" (interpreter): resolved by conftest.py from ZO_OPTIM_TRITON_DEVICE.
DEVICE = torch.device(os.environ.get("ZO_OPTIM_TRITON_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
# Skips the module only when triton is not installed and not required; a broken backend is a collection error.
backend_or_skip("triton", DEVICE)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import zo_optim.ops as ops  # noqa: E402
from zo_optim import rng  # noqa: E402
from zo_optim.ops import reference  # noqa: E402
from zo_optim.ops.triton import _rng, launch  # noqa: E402

pytestmark = pytest.mark.triton
SIZES = [0, 1, 3, 4, 5, 127, 128, 129, 256]  # 128 and 256 fill whole blocks of 128
SEED = 0xDEADBEEF12345678
MASK32 = 0xFFFFFFFF


@pytest.fixture(autouse=True, scope="module")
def _self_checked():
    """Run the backend's first-use self-check (zo_optim.ops.selfcheck) before these tests, so that the tests
    that count launches or table-cache entries see only their own."""
    from zo_optim.ops import selfcheck

    checks = selfcheck.verified("triton", DEVICE, [torch.float32, torch.bfloat16, torch.float16])
    assert all(c.passed for c in checks), selfcheck.describe(c for c in checks if not c.passed)


def _i32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


# ----------------------------------------------------------------------------- jit probes of _rng


@triton.jit
def _philox_probe(out, c_ptr, k_ptr, N: tl.constexpr):
    t = tl.arange(0, N)
    c0 = tl.load(c_ptr + 4 * t).to(tl.uint32)
    c1 = tl.load(c_ptr + 4 * t + 1).to(tl.uint32)
    c2 = tl.load(c_ptr + 4 * t + 2).to(tl.uint32)
    c3 = tl.load(c_ptr + 4 * t + 3).to(tl.uint32)
    x0, x1, x2, x3 = _rng.philox4x32_10(c0, c1, c2, c3, tl.load(k_ptr).to(tl.uint32), tl.load(k_ptr + 1).to(tl.uint32))
    tl.store(out + 4 * t, x0.to(tl.int64))
    tl.store(out + 4 * t + 1, x1.to(tl.int64))
    tl.store(out + 4 * t + 2, x2.to(tl.int64))
    tl.store(out + 4 * t + 3, x3.to(tl.int64))


@triton.jit
def _stream_probe(out, base, seed_lo, seed_hi, tensor_id, slot, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Block pid of a stream starting at element ``base`` (int64): 0 Gaussian, 1 Rademacher, 2 rounding words."""
    pid = tl.program_id(0)
    i0 = base + pid * BLOCK
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    tid = tensor_id.to(tl.uint32, bitcast=True)
    s = slot.to(tl.uint32, bitcast=True)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if KIND == 0:
        tl.store(out + offs, _rng.gaussian_block(i0, k0, k1, tid, s, BLOCK))
    elif KIND == 1:
        tl.store(out + offs, _rng.rademacher_block(i0, k0, k1, tid, s, BLOCK))
    else:
        tl.store(out + offs, _rng.rounding_block(i0, k0, k1, tid, s, BLOCK).to(tl.int64))


@triton.jit
def _round_probe(out_ptr, x_ptr, w_ptr, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    if STOCHASTIC:
        y = _rng.stochastic_round(x, tl.load(w_ptr + offs).to(tl.uint32), DTYPE)
    else:
        y = _rng.round_nearest(x, DTYPE)
    tl.store(out_ptr + offs, y)


@triton.jit
def _widen_probe(out_ptr, x_ptr, DTYPE: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, _rng.to_f32(tl.load(x_ptr + offs), DTYPE))


def _stream(kind: int, seed: int, tensor_id: int, slot: int, base: int, n_blocks: int, block: int) -> torch.Tensor:
    dtype = torch.int64 if kind == 2 else torch.float32
    out = torch.empty(n_blocks * block, dtype=dtype, device=DEVICE)
    _stream_probe[(n_blocks,)](
        out, base, _i32(seed & MASK32), _i32(seed >> 32), _i32(tensor_id), _i32(slot), KIND=kind, BLOCK=block,
        num_warps=1,
    )
    return out.cpu()


# ----------------------------------------------------------------------------- RNG pieces


def test_philox_known_answers_and_random_counters():
    counters = [(0, 0, 0, 0), (MASK32,) * 4, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (1, 2, 3, 4)]
    gen = torch.Generator().manual_seed(0)
    counters += torch.randint(0, 2**32, (12, 4), generator=gen).tolist()
    c = torch.tensor(counters, dtype=torch.int64)
    for key in ([0, 0], [MASK32, MASK32], [0xA4093822, 0x299F31D0], [0x12345678, 0x9ABCDEF0]):
        k = torch.tensor(key, dtype=torch.int64)
        out = torch.empty_like(c, device=DEVICE)
        _philox_probe[(1,)](out, c.to(DEVICE), k.to(DEVICE), N=16)
        assert torch.equal(out.cpu(), rng.philox4x32_10(c, k)), key
    # The Random123 known answers of docs/rng.md, spelled out.
    out = torch.empty_like(c, device=DEVICE)
    _philox_probe[(1,)](out, c.to(DEVICE), torch.tensor([0xA4093822, 0x299F31D0], device=DEVICE), N=16)
    assert " ".join(f"{int(v):08x}" for v in out[2].cpu()) == "d16cfe09 94fdcceb 5001e420 24126ea1"


@pytest.mark.parametrize("block", [128, 256])
def test_gaussian_block_matches_contract(block):
    n_blocks = 1024 // block
    z = _stream(0, SEED, 7, 3, 0, n_blocks, block)
    ref = rng.normal(SEED, 7, n_blocks * block, query=3)
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-6)


def test_rademacher_and_rounding_words_bitwise():
    z = _stream(1, SEED, 11, 2, 0, 4, 256)
    assert torch.equal(z, rng.rademacher(SEED, 11, 1024, query=2))
    w = _stream(2, SEED, 11, 5, 0, 4, 256)
    assert torch.equal(w, rng.rounding_words(SEED, 11, 1024, rounding_slot=5))


def test_streams_far_into_a_tensor():
    """Element offsets beyond 2**31 (int64 i0) up to the contract's last counter."""
    base = 4 * (2**32 - 64)  # the last 256 elements addressable by the contract
    z = _stream(0, SEED, 1, 0, base, 1, 256)
    words = rng._words(SEED, 1, 64, 0, 0, start=2**32 - 64)
    torch.testing.assert_close(z, rng.box_muller4(words).reshape(-1), rtol=0, atol=1e-6)
    w = _stream(2, SEED, 1, 4, base, 1, 256)
    assert torch.equal(w, rng._words(SEED, 1, 64, 4, 1, start=2**32 - 64).reshape(-1))
    rbase = 128 * (2**32 - 2)
    r = _stream(1, SEED, 1, 0, rbase, 1, 256)
    bits = (rng._words(SEED, 1, 2, 0, 0, start=2**32 - 2).unsqueeze(-1) >> torch.arange(32)) & 1
    assert torch.equal(r, bits.reshape(-1).float() * 2 - 1)


# ----------------------------------------------------------------------------- rounding helpers


def _special_f32(n_random: int) -> torch.Tensor:
    """float32 values around every rounding hazard of bf16/fp16, plus random bit patterns."""
    specials = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 65504.0, 65505.0, 65519.0, 65520.0, 1e5,
                2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-149, -(2.0**-149), 1e-40, -1e-40, 2.0**-126,
                3.3895313892515355e38, 3.3961e38, 3.4e38, -3.4e38, 1.00390625, 1.005859375, 1.0009765625,
                1.00048828125, 1.00146484375]
    x = torch.tensor(specials, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31, (n_random,), generator=gen, dtype=torch.int64).to(torch.int32)
    # Exact ties of bf16 (low 16 bits 0x8000) and of fp16 in its normal range (low 13 bits 0x1000),
    # with odd and even neighbours, so round-half-even is told apart from round-half-up/down.
    upper = torch.randint(0, 2**16, (64,), generator=gen, dtype=torch.int64)
    bf16_ties = ((upper << 16) | 0x8000).to(torch.int64)
    fp16_ties = (torch.randint(0x38800000 >> 13, 0x47000000 >> 13, (64,), generator=gen) << 13) | 0x1000
    ties = torch.cat([bf16_ties, fp16_ties]).to(torch.int32)  # wraps to the int32 bit pattern
    # Random bits cover all binades; scaled normals cover the common range; fp16 subnormals explicitly.
    return torch.cat([x, ties.view(torch.float32), bits.view(torch.float32), torch.randn(n_random, generator=gen),
                      torch.randn(n_random, generator=gen) * 2.0**-17])


def _bits16(t: torch.Tensor) -> torch.Tensor:
    b = t.view(torch.int16)
    # Any NaN is a NaN: compare NaNs by class only.
    return torch.where(t.isnan(), torch.full_like(b, -1), b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN/inf lanes, interpreter only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_nearest_bitwise(dtype):
    x = _special_f32(256)
    n = 1024
    x = torch.cat([x, torch.zeros(n - x.numel())])
    out = torch.empty(n, dtype=dtype, device=DEVICE)
    _round_probe[(1,)](out, x.to(DEVICE), x.to(DEVICE), DTYPE=launch._TL_DTYPES[dtype], STOCHASTIC=False, N=n)
    assert torch.equal(_bits16(out.cpu()), _bits16(x.to(dtype)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN/inf lanes, interpreter only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_bitwise(dtype):
    x = _special_f32(256)
    n = 1024
    x = torch.cat([x, torch.zeros(n - x.numel())])
    words = rng.rounding_words(SEED, 3, n, 0)
    # Thresholds exactly at the decision boundary: u == frac must round down.
    words[:64] = 0
    words[64:128] = MASK32
    out = torch.empty(n, dtype=dtype, device=DEVICE)
    _round_probe[(1,)](out, x.to(DEVICE), words.to(DEVICE), DTYPE=launch._TL_DTYPES[dtype], STOCHASTIC=True, N=n)
    assert torch.equal(_bits16(out.cpu()), _bits16(rng.stochastic_round(x, dtype, words)))


def test_bf16_widening_is_exact_for_every_bit_pattern():
    # The interpreter's own bf16 -> f32 conversion flushes subnormals; ours works by bits.
    allb = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    out = torch.empty(allb.numel(), dtype=torch.float32, device=DEVICE)
    _widen_probe[(1,)](out, allb.to(DEVICE), DTYPE=tl.bfloat16, N=allb.numel())
    ref = allb.float()
    same = (out.cpu().view(torch.int32) == ref.view(torch.int32)) | (ref.isnan() & out.cpu().isnan())
    assert bool(same.all())


# ----------------------------------------------------------------------------- ops vs reference


def _params(dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dt).to(DEVICE) for n, dt in zip(SIZES, dtypes, strict=True)]


def _state(salt, positive=False):
    gen = torch.Generator().manual_seed(100 + salt)
    return [((torch.rand(n, generator=gen) + 0.5) if positive else torch.randn(n, generator=gen)).to(DEVICE)
            for n in SIZES]


def _ulps16(a: torch.Tensor, b: torch.Tensor) -> int:
    def ordered(t):
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def _assert_matches(out, ref, what, exact):
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        o, r = o.cpu(), r.cpu()
        if exact:
            assert torch.equal(o, r), f"{what}[{i}] ({o.dtype}, {o.numel()} elements) not bitwise equal"
        elif o.dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-5, msg=lambda m, i=i: f"{what}[{i}]: {m}")
        else:
            assert _ulps16(o, r) <= 1, f"{what}[{i}] ({o.dtype}) more than one ulp apart"


OPS = {
    "perturb_": (dict(scale=1e-2, query=2), dict(precond=("precond", True))),
    "sgd_update_": (dict(lr=0.1, weight_decay=0.01, momentum=0.9), dict(momentum_buffers=("buf", False))),
    "adamw_update_": (dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3),
                      dict(exp_avgs=("m", False), exp_avg_sqs=("v", True))),
    "precond_sgd_update_": (dict(lr=0.1, rule="hizoo", update_precond=True, precond_decay=0.9, precond_rate=0.1,
                                 weight_decay=0.01), dict(precond=("precond", True))),
    "hiso": (dict(lr=0.1, rule="hiso", update_precond=True, precond_decay=0.9, precond_rate=0.1, hessian_eps=1e-3),
             dict(precond=("precond", True))),
    "helene_update_": (dict(lr=0.1, alpha=0.5, beta1=0.9, beta2=0.99, gamma=1.0, eps=1e-8, weight_decay=0.1,
                            clip=[1.0, 0.5, 2.0, 1.0, 1.5, 0.1, 1.0, 0.3, 0.7], update_hessian=True),
                       dict(exp_avgs=("m", False), hessians=("h", True))),
}


def _run_op(name, backend, dtypes, distribution, rounding, q=3, restore_query=1, extra=None):
    kwargs, states_spec = OPS[name]
    op = "precond_sgd_update_" if name == "hiso" else name
    params = _params(dtypes)
    states = {k: _state(sum(map(ord, salt)), pos) for k, (salt, pos) in states_spec.items()}
    kw = dict(kwargs, distribution=distribution, rounding=rounding, **(extra or {}))
    ids = [1000 + 17 * i for i in range(len(params))]
    if op != "perturb_":
        kw.update(coeffs=torch.tensor([0.5, -1.25, 2.0, 0.75][:q], device=DEVICE), restore_scale=1e-3,
                  restore_query=restore_query)
        if kw.get("rule") == "hizoo" or op == "helene_update_":
            key = "precond_coeffs" if op == "precond_sgd_update_" else "hessian_coeffs"
            kw[key] = torch.tensor([0.1, 0.2, 0.3, 0.4][:q], device=DEVICE)
    if backend == "reference":
        getattr(reference, op)(params, ids, SEED, **kw, **states)
    else:
        getattr(ops, op)(params, ids, SEED, **kw, **states, backend=backend)
    return params, states


MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16,
         torch.float32, torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_op_matches_reference_on_full_and_tail_blocks(name, distribution, rounding):
    """Mixed sizes and dtypes in one call, blocks of 128: full blocks (128, 256) take the
    unmasked path, the rest the masked one. With Rademacher z every float32 operation is
    the reference's, so the results are bitwise equal (torch's CPU sqrt is not correctly
    rounded, sqrt_rn is: AdamW's float32 params may differ by an ulp)."""
    with launch.block_size(128):
        out, out_states = _run_op(name, "triton", MIXED, distribution, rounding)
    ref, ref_states = _run_op(name, "reference", MIXED, distribution, rounding)
    exact = distribution == "rademacher"
    if exact and name == "adamw_update_" and DEVICE.type == "cpu":
        _assert_matches([p.float() for p in out], [p.float() for p in ref], name, exact=False)
        for o, r in zip(out, ref, strict=True):
            if o.dtype != torch.float32:
                assert torch.equal(o.cpu(), r.cpu())
    else:
        _assert_matches(out, ref, name, exact)
    for key in out_states:
        _assert_matches(out_states[key], ref_states[key], f"{name}:{key}", exact)


@pytest.mark.parametrize("q,restore_query", [(1, 0), (2, 1), (2, 5), (4, 3)])
def test_query_loop_and_restore_outside_the_queries(q, restore_query):
    dtypes = [torch.float32] * len(SIZES)
    with launch.block_size(128):
        out, st_out = _run_op("helene_update_", "triton", dtypes, "rademacher", "nearest", q=q,
                              restore_query=restore_query)
    ref, st_ref = _run_op("helene_update_", "reference", dtypes, "rademacher", "nearest", q=q,
                          restore_query=restore_query)
    _assert_matches(out, ref, "params", exact=True)
    _assert_matches(st_out["exp_avgs"], st_ref["exp_avgs"], "m", exact=True)
    _assert_matches(st_out["hessians"], st_ref["hessians"], "h", exact=True)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    seed=st.integers(0, 2**64 - 1),
    query=st.integers(0, 2**32 - 1),
    scale=st.floats(-1.0, 1.0),
)
def test_perturb_random_sizes_and_seeds(sizes, seed, query, scale):
    gen = torch.Generator().manual_seed(len(sizes))
    params = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    ref = [p.clone() for p in params]
    ids = list(range(3, 3 + len(sizes)))
    with launch.block_size(128):
        ops.perturb_(params, ids, seed, scale, query=query, distribution="rademacher", backend="triton")
    reference.perturb_(ref, ids, seed, scale, query=query, distribution="rademacher")
    _assert_matches(params, ref, "perturb", exact=True)


def test_misaligned_tensors_take_the_unhinted_path():
    """A contiguous view at an odd element offset is not 16-byte aligned: no alignment hint."""
    base = torch.randn(1 + 256 + 1 + 128, device=DEVICE)
    params = [base[1:257], base[258:]]
    assert params[0].data_ptr() % 16 != 0
    ref = [p.clone() for p in params]
    launch.table_cache.clear()
    with launch.block_size(128):
        ops.perturb_(params, [0, 1], SEED, 0.5, distribution="rademacher", backend="triton")
    (tables,) = launch.table_cache._entries.values()
    assert not tables.aligned
    reference.perturb_(ref, [0, 1], SEED, 0.5, distribution="rademacher")
    _assert_matches(params, ref, "perturb", exact=True)


# ----------------------------------------------------------------------------- launches and tables


@pytest.fixture
def launches(monkeypatch):
    calls = []
    original = launch._launch

    def counting(kernel, grid, *args, **kw):
        calls.append((kernel, grid, kw.get("DTYPE")))
        return original(kernel, grid, *args, **kw)

    monkeypatch.setattr(launch, "_launch", counting)
    return calls


def test_one_launch_per_dtype_group(launches):
    params = _params(MIXED)
    with launch.block_size(128):
        ops.perturb_(params, list(range(len(params))), SEED, 1e-3, backend="triton")
    assert sorted(str(d) for _, _, d in launches) == ["bf16", "fp16", "fp32"]
    # Blocks of 128 over each group's tensors: one program per block, empty tensors none.
    per_dtype = {}
    for n, dt in zip(SIZES, MIXED, strict=True):
        per_dtype[dt] = per_dtype.get(dt, 0) + math.ceil(n / 128)
    assert {str(d): g[0] for _, g, d in launches} == {str(launch._TL_DTYPES[k]): v for k, v in per_dtype.items()}


def test_one_launch_for_many_tensors_and_none_for_empty_ones(launches):
    params = [torch.randn(n, device=DEVICE) for n in [3, 0, 5, 1, 0, 7] * 5]
    ops.sgd_update_(params, list(range(len(params))), SEED, torch.ones(1, device=DEVICE), lr=0.1,
                    backend="triton")
    assert len(launches) == 1
    launches.clear()
    ops.perturb_([torch.empty(0, device=DEVICE)], [0], SEED, 1.0, backend="triton")
    assert launches == []


def test_table_cache_hits_and_invalidation():
    launch.table_cache.clear()
    params = [torch.randn(n, device=DEVICE) for n in (5, 130)]
    bufs = [torch.zeros_like(p) for p in params]
    coeffs = torch.tensor([0.25], device=DEVICE)

    def step(ps, bs):
        ops.sgd_update_(ps, [0, 1], SEED, coeffs, lr=0.1, momentum=0.9, momentum_buffers=bs, backend="triton")

    step(params, bufs)
    step(params, bufs)
    assert (launch.table_cache.misses, launch.table_cache.hits) == (1, 1)
    # A re-allocated tensor (as after model.to() or a state reset) must miss, and be the one updated.
    params[1] = params[1].clone()
    expect = [p.clone() for p in params]
    expect_bufs = [b.clone() for b in bufs]
    step(params, bufs)
    assert launch.table_cache.misses == 2
    reference.sgd_update_(expect, [0, 1], SEED, coeffs, lr=0.1, momentum=0.9, momentum_buffers=expect_bufs)
    _assert_matches(params, expect, "params", exact=False)
    _assert_matches(bufs, expect_bufs, "buffers", exact=False)
    # New state buffers, other tensor ids, other clip values: all part of the key.
    step(params, [b.clone() for b in bufs])
    assert launch.table_cache.misses == 3
    ops.sgd_update_(params, [7, 1], SEED, coeffs, lr=0.1, backend="triton")
    assert launch.table_cache.misses == 4
    m, h = [torch.zeros_like(p) for p in params], [torch.ones_like(p) for p in params]
    for clip in ([1.0, 1.0], [1.0, 1.0], [2.0, 1.0]):
        ops.helene_update_(params, [0, 1], SEED, coeffs, lr=0.1, alpha=1.0, beta1=0.9, beta2=0.99, gamma=1.0,
                           eps=1e-8, clip=clip, exp_avgs=m, hessians=h, update_hessian=False, backend="triton")
    assert (launch.table_cache.misses, launch.table_cache.hits) == (6, 2)


def test_table_cache_is_bounded():
    cache = launch.TableCache(maxsize=2)
    for n in (1, 2, 3):
        cache.get(DEVICE, 128, 3, [(0, n, 0)])
    assert len(cache) == 2 and cache.misses == 3
    cache.get(DEVICE, 128, 3, [(0, 3, 0)])
    assert cache.hits == 1


def test_table_cache_is_bounded_in_bytes():
    cache = launch.TableCache(maxsize=100, max_bytes=3 * 8 * 4)  # a 1-block, 3-column table is 4 int64
    for n in (1, 2, 3, 4):
        cache.get(DEVICE, 128, 3, [(0, n, 0)])
    assert len(cache) == 3 and cache.nbytes == 3 * 32
    cache.get(DEVICE, 128, 3, [(0, 256, 0)])  # 2 blocks: 5 int64, evicts the two oldest
    assert len(cache) == 2 and cache.nbytes == 32 + 40
    cache.get(DEVICE, 128, 3, [(0, 2000, 0)])  # 16 blocks: 19 int64, over the bound on its own
    assert len(cache) == 1 and cache.nbytes == 19 * 8  # the newest table always stays


def test_table_cache_holds_a_step_of_nine_groups():
    """Two keys per (group, dtype) and step: 9 groups must hit from the second step on."""
    launch.table_cache.clear()
    groups = [[torch.randn(4, device=DEVICE), torch.randn(3, device=DEVICE)] for _ in range(9)]
    bufs = [[torch.zeros_like(p) for p in g] for g in groups]
    coeffs = torch.tensor([0.1], device=DEVICE)
    for step in range(3):
        for g, b in zip(groups, bufs, strict=True):
            ops.perturb_(g, [0, 1], step, 1e-3, backend="triton")
            ops.sgd_update_(g, [0, 1], step, coeffs, lr=0.1, momentum=0.9, momentum_buffers=b, backend="triton")
    assert (launch.table_cache.misses, launch.table_cache.hits) == (18, 36)


def test_tables_encode_every_block():
    t = launch._build_tables(DEVICE, 128, 3, [(16, 300, 5), (32, 0, 6), (48, 128, 7)])
    assert t.ncol == 3 and t.n_blocks == 3 + 0 + 1 and t.aligned
    blk = t.blk_tab.cpu().tolist()
    assert blk == [0, 1, 2, 2 << 32]
    assert t.slot_tab.cpu().tolist() == [16, 300, 5, 32, 0, 6, 48, 128, 7]


def test_block_size_must_be_a_power_of_two_of_at_least_128():
    with pytest.raises(ValueError, match="Invalid block size"):
        with launch.block_size(96):
            pass


def test_counter_words_out_of_uint32_range_are_refused_untouched():
    params = [torch.randn(5, device=DEVICE)]
    before = params[0].clone()
    with pytest.raises(ValueError, match="query"):
        ops.perturb_(params, [0], SEED, 1.0, query=2**32, backend="triton")
    with pytest.raises(ValueError, match="rounding_slot"):
        ops.sgd_update_(params, [0], SEED, torch.ones(1, device=DEVICE), lr=0.1, rounding_slot=2**32,
                        backend="triton")
    assert torch.equal(params[0], before)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA only: the kernels compiled for the GPU")
def test_kernels_are_compiled_not_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from zo_optim.ops.triton import kernels

    assert os.environ.get("TRITON_INTERPRET") != "1"
    assert isinstance(kernels.perturb_kernel, JITFunction)
    assert not isinstance(kernels.perturb_kernel, InterpretedFunction)
    x = torch.randn(1000, device=DEVICE)
    before = x.clone()
    ops.perturb_([x], [0], SEED, 1e-3, backend="triton")
    torch.cuda.synchronize()
    assert x.is_cuda and not torch.equal(x, before)
