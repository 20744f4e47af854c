"""The self-check of the Triton backend (zo_optim.ops.selfcheck) and the on-device fallback it falls back to.

The mismatch is forced with a patched kernel: under Triton's interpreter a ``@triton.jit`` kernel reads
the jit functions it calls from its module's globals at run time, so replacing ``kernels.direction_block``
with one that scales z by 1.0001 breaks every op kernel the way a miscompiled Box-Muller or Philox would
on a GPU (Rademacher z of ±1.0001 is no longer bitwise ±1; Gaussian z is off by up to ~5e-4 > 1e-6).
Compiled kernels on a GPU are cached, so these run under the interpreter only.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

import zo_optim.ops as ops
from zo_optim import rng
from zo_optim.ops import chunked, reference, selfcheck

SEED = 0x0123456789ABCDEF
DEVICE = torch.device(os.environ.get("ZO_OPTIM_TRITON_DEVICE") or "cpu")
interpreter_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="patches a kernel: the Triton interpreter only")


@pytest.fixture
def fresh(monkeypatch):
    """An empty self-check cache and warning record for this test (restored afterwards)."""
    monkeypatch.setattr(selfcheck, "_cache", {})
    monkeypatch.setattr(selfcheck, "_warned", set())
    monkeypatch.setattr(selfcheck, "_passed", set())


@pytest.fixture
def broken_kernels(monkeypatch, fresh):
    pytest.importorskip("triton")
    from triton_skewed import skewed_direction_block
    from zo_optim.ops.triton import kernels

    monkeypatch.setattr(kernels, "direction_block", skewed_direction_block)


@pytest.fixture
def auto_picks_triton_on_cpu(monkeypatch):
    """The backend table with CPU among triton's devices, so that "auto" resolves to the (interpreted) kernels
    for CPU tensors as it does for CUDA tensors on a GPU machine."""
    pytest.importorskip("triton")
    entry = ops._TABLE["triton"]
    monkeypatch.setitem(ops._TABLE, "triton", dataclasses.replace(entry, devices=(*entry.devices, "cpu")))
    assert ops.resolve_backend("auto", torch.device("cpu"), [torch.float32]) == "triton"


def _params():
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(300, generator=gen).to(DEVICE), torch.randn(7, 9, generator=gen).to(torch.bfloat16).to(DEVICE)]


# ----------------------------------------------------------------------------- the healthy backend


def test_every_check_passes_on_the_healthy_kernels(fresh):
    pytest.importorskip("triton")
    checks = selfcheck.verified("triton", DEVICE, [torch.float32, torch.bfloat16, torch.float16])
    assert {(c.dtype, c.name) for c in checks} == {
        ("-", "philox-kat"), ("-", "rademacher"), ("-", "gaussian"),
        *((dt, name) for dt in ("float32", "bfloat16", "float16") for name in ("perturb", "restore+update")),
    }
    assert all(c.passed for c in checks), selfcheck.describe(c for c in checks if not c.passed)


def test_first_use_runs_the_check_once_per_device_and_dtype(fresh, monkeypatch):
    pytest.importorskip("triton")
    runs = []
    real = selfcheck.run_checks
    monkeypatch.setattr(selfcheck, "run_checks", lambda b, d, dt=None: runs.append((b, str(d), dt)) or real(b, d, dt))
    for _ in range(3):
        ops.perturb_(_params(), [0, 1], SEED, 1e-3, backend="triton")
    # the dtype-independent RNG checks once, then each dtype group of the call once, all on the first call
    assert sorted(runs, key=str) == sorted([("triton", str(DEVICE), None), ("triton", str(DEVICE), torch.float32),
                                            ("triton", str(DEVICE), torch.bfloat16)], key=str)
    ops.perturb_([torch.zeros(5, dtype=torch.float16, device=DEVICE)], [0], SEED, 1e-3, backend="triton")
    assert runs[-1] == ("triton", str(DEVICE), torch.float16) and len(runs) == 4


@interpreter_only
def test_shards_get_their_own_check_and_a_lost_offset_fails_it(fresh, monkeypatch):
    pytest.importorskip("triton")
    from zo_optim.ops.triton import launch

    plain = {c.name for c in selfcheck.verified("triton", DEVICE, [torch.float32])}
    assert not any(n.startswith("shard") for n in plain)  # no shard variant compiled for unsharded users
    checks = selfcheck.verified("triton", DEVICE, [torch.float32], sharded=True)
    assert {c.name for c in checks} - plain == {"shard-rademacher", "shard-gaussian"}
    assert all(c.passed for c in checks), selfcheck.describe(c for c in checks if not c.passed)
    # offsets rounded down to the 4-element Philox group (the hard case of an unaligned shard) fail both
    real = launch._for_each_group

    def rounded(params, tensor_ids, states, extra_cols=None, offsets=None):
        return real(params, tensor_ids, states, extra_cols, None if offsets is None else [o // 4 * 4 for o in offsets])

    monkeypatch.setattr(launch, "_for_each_group", rounded)
    failed = {c.name for c in selfcheck.run_checks("triton", DEVICE, shards=True) if not c.passed}
    assert failed == {"shard-rademacher", "shard-gaussian"}


def test_other_backends_are_not_gated(fresh, monkeypatch):
    monkeypatch.setattr(selfcheck, "run_checks", lambda *a: pytest.fail("a plain-torch backend was self-checked"))
    ops.perturb_([torch.zeros(5)], [0], SEED, 1e-3, backend="chunked")


# ----------------------------------------------------------------------------- a forced mismatch


@interpreter_only
def test_the_patched_kernel_fails_the_checks_that_it_should(broken_kernels):
    failed = {(c.dtype, c.name) for c in selfcheck.verified("triton", DEVICE, [torch.float32]) if not c.passed}
    # Philox itself is intact; everything built on z is off
    assert failed == {("-", "rademacher"), ("-", "gaussian"), ("float32", "perturb"), ("float32", "restore+update")}


@interpreter_only
def test_explicit_triton_raises_before_any_write(broken_kernels):
    params = _params()
    bufs = [torch.randn(p.shape, device=DEVICE) for p in params]
    before = [t.clone() for t in params + bufs]
    coeffs = torch.tensor([0.5, -1.0], device=DEVICE)
    with pytest.raises(RuntimeError, match=r"failed its self-check.*nothing was written.*rademacher.*zo-optim check"):
        ops.sgd_update_(params, [0, 1], SEED, coeffs, lr=0.1, momentum=0.9, momentum_buffers=bufs,
                        restore_scale=1e-3, backend="triton")
    for t, b in zip(params + bufs, before, strict=True):
        assert torch.equal(t, b)
    # the verdict is cached: the next call refuses the same way without re-running the checks
    with pytest.raises(RuntimeError, match="failed its self-check"):
        ops.perturb_(params, [0, 1], SEED, 1e-3, backend="triton")
    for t, b in zip(params, before[:2], strict=True):
        assert torch.equal(t, b)


@interpreter_only
def test_auto_warns_once_and_runs_on_the_device_fallback(broken_kernels, auto_picks_triton_on_cpu):
    params = _params()
    expected = [p.clone() for p in params]
    with pytest.warns(selfcheck.SelfCheckWarning) as caught:
        ops.perturb_(params, [0, 1], SEED, 1e-2, query=2, distribution="rademacher")
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "FAILED its self-check on cpu" in msg and "rademacher" in msg and "zo-optim check" in msg
    assert "'chunked'" in msg
    # the fallback ran: the reference's bits (the patched kernel would have stored z·1.0001)
    reference.perturb_(expected, [0, 1], SEED, 1e-2, query=2, distribution="rademacher")
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p, e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per (backend, device), not one per call
        ops.perturb_(params, [0, 1], SEED, -1e-2, query=2, distribution="rademacher")


@interpreter_only
def test_an_optimizer_with_auto_trains_on_the_fallback(broken_kernels, auto_picks_triton_on_cpu):
    from zo_optim import MeZO

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64))
    ref_w = torch.nn.Parameter(w.detach().clone())
    with pytest.warns(selfcheck.SelfCheckWarning):
        opt = MeZO([w], lr=1e-2, zo_eps=1e-3, seed=3)
        for _ in range(2):
            opt.step(lambda: (w**2).sum())
    ref = MeZO([ref_w], lr=1e-2, zo_eps=1e-3, seed=3, backend="chunked")
    for _ in range(2):
        ref.step(lambda: (ref_w**2).sum())
    assert torch.equal(w, ref_w)


def test_a_backend_that_crashes_is_a_failed_check(fresh, monkeypatch):
    def boom(*args):
        raise RuntimeError("PTX compile failed for sm_120")

    monkeypatch.setattr(selfcheck, "_rng_checks", boom)
    (check,) = selfcheck.run_checks("chunked", "cpu")
    assert not check.passed and "PTX compile failed" in check.detail


# ----------------------------------------------------------------------------- the fallback on the device


def test_streams_on_a_device_are_the_cpu_streams():
    """The device argument only moves the computation: on CPU it is the default generation, bit for bit."""
    for off in (0, 5, 129):
        assert torch.equal(rng.normal(SEED, 3, 777, 2, offset=off, device="cpu"), rng.normal(SEED, 3, 777, 2, off))
        assert torch.equal(rng.rademacher(SEED, 3, 777, 2, off, device="cpu"), rng.rademacher(SEED, 3, 777, 2, off))
        words = rng.rounding_words(SEED, 3, 777, 4, off, device="cpu")
        assert torch.equal(words, rng.rounding_words(SEED, 3, 777, 4, off))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streams_on_cuda_follow_the_contract():
    z = rng.normal(SEED, 3, 5000, 2, device="cuda")
    torch.testing.assert_close(z.cpu(), rng.normal(SEED, 3, 5000, 2), rtol=0, atol=selfcheck.GAUSSIAN_ATOL)
    assert torch.equal(rng.rademacher(SEED, 3, 5000, 2, device="cuda").cpu(), rng.rademacher(SEED, 3, 5000, 2))
    assert torch.equal(rng.rounding_words(SEED, 3, 5000, 1, device="cuda").cpu(), rng.rounding_words(SEED, 3, 5000, 1))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_chunked_generates_z_on_the_tensors_device(monkeypatch, device, rounding):
    """Every Philox evaluation of a chunked op runs on the tensors' device: none on the CPU for meta tensors
    (before, z was generated on the CPU and copied over). 'meta' runs the same code without data."""
    seen = []
    real = rng.philox4x32_10
    monkeypatch.setattr(rng, "philox4x32_10", lambda c, k: seen.append((c.device.type, k.device.type)) or real(c, k))
    params = [torch.zeros(3000, device=device), torch.zeros(40, dtype=torch.bfloat16, device=device)]
    bufs = [torch.zeros(p.shape, device=device) for p in params]
    coeffs = torch.tensor([0.5, -1.0], device=device)
    with monkeypatch.context() as m:
        m.setattr(chunked, "CHUNK_NUMEL", 1024)
        ops.perturb_(params, [0, 1], SEED, 1e-3, rounding=rounding, backend="chunked")
        ops.sgd_update_(params, [0, 1], SEED, coeffs, lr=0.1, momentum=0.9, momentum_buffers=bufs,
                        restore_scale=1e-3, rounding=rounding, distribution="rademacher", backend="chunked")
    n_stochastic = 2 if rounding == "stochastic" else 0  # the bf16 tensor's rounding words, once per op
    # perturb: 3 slices + 1; sgd: q = 2 directions and the restore's own query (1 < q: reused), per slice
    assert len(seen) == (3 + 1) + 2 * (3 + 1) + n_stochastic
    assert set(seen) == {(device, device)}
