"""The ``chunked`` backend against the reference: the same bits, temporaries bounded by one slice.

The chunked backend runs the reference's own code on flat slices with their element offset, so
every op must match the reference bit for bit (both distributions, both roundings, every dtype
including float64, views, restore, q > 1) whatever the slice length, including lengths that cut
a Philox counter (4 Gaussian / 128 Rademacher elements) in the middle.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zo_optim.ops as ops
from zo_optim import rng
from zo_optim.ops import chunked

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OPS = ["perturb_", "sgd_update_", "adamw_update_", "hizoo", "hiso", "helene_update_"]


def _chunk(numel: int):
    return mock.patch.object(chunked, "CHUNK_NUMEL", numel)


# --------------------------------------------------------------- the streams at an offset


@pytest.mark.parametrize("offset", [0, 1, 3, 4, 5, 127, 128, 129, 300])
@pytest.mark.parametrize("numel", [0, 1, 2, 7, 130, 260])
def test_streams_at_an_offset_are_slices_of_the_whole(offset, numel):
    seed, tid = 0xDEADBEEF12345678, 17
    whole = offset + numel
    assert torch.equal(rng.normal(seed, tid, numel, 2, offset=offset), rng.normal(seed, tid, whole, 2)[offset:])
    assert torch.equal(rng.rademacher(seed, tid, numel, 1, offset=offset), rng.rademacher(seed, tid, whole, 1)[offset:])
    assert torch.equal(rng.rounding_words(seed, tid, numel, 3, offset=offset),
                       rng.rounding_words(seed, tid, whole, 3)[offset:])


def test_stream_offset_is_checked():
    with pytest.raises(ValueError, match="Invalid offset: -1"):
        rng.normal(1, 0, 4, offset=-1)
    with pytest.raises(ValueError, match="RNG contract addresses"):
        rng.rademacher(1, 0, 2, offset=rng.MAX_NUMEL - 1)


# --------------------------------------------------------------- every op, bit for bit


def _tensors(sizes, dtypes, views, seed, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, dtype, view in zip(sizes, dtypes, views, strict=True):
        t = (torch.rand(n, 3, generator=gen) + 0.5 if positive else torch.randn(n, 3, generator=gen)).to(dtype)
        out.append(t.t() if view else t)  # a transposed view: the dispatcher's contiguous copy + write-back
    return out


def _call(op, params, ids, backend, states, com):
    q = com["q"]
    coeffs = torch.tensor(com["coeffs"])
    common = dict(restore_scale=com["restore_scale"], restore_query=com["restore_query"],
                  distribution=com["distribution"], rounding=com["rounding"], rounding_slot=com["slot"],
                  backend=backend)
    if op == "perturb_":
        ops.perturb_(params, ids, com["seed"], 0.3, query=com["restore_query"], precond=states[0],
                     distribution=com["distribution"], rounding=com["rounding"], rounding_slot=com["slot"],
                     backend=backend)
    elif op == "sgd_update_":
        ops.sgd_update_(params, ids, com["seed"], coeffs, lr=0.1, weight_decay=0.01, momentum=0.9,
                        momentum_buffers=states[1], **common)
    elif op == "adamw_update_":
        ops.adamw_update_(params, ids, com["seed"], coeffs, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                          weight_decay=0.01, step=3, exp_avgs=states[1], exp_avg_sqs=states[0], **common)
    elif op in ("hizoo", "hiso"):
        ops.precond_sgd_update_(params, ids, com["seed"], coeffs, lr=0.1, precond=states[0], rule=op,
                                update_precond=True, precond_decay=0.9, precond_rate=0.1,
                                precond_coeffs=torch.linspace(0.5, 1.5, q) if op == "hizoo" else None,
                                hessian_eps=1e-8 if op == "hiso" else 0.0, precond_min=1e-3, weight_decay=0.01,
                                **common)
    else:
        ops.helene_update_(params, ids, com["seed"], coeffs, lr=0.1, alpha=0.5, beta1=0.9, beta2=0.99, gamma=1.0,
                           eps=1e-8, clip=[0.5 * (i + 1) for i in range(len(params))], exp_avgs=states[1],
                           hessians=states[0], update_hessian=True,
                           hessian_coeffs=torch.linspace(0.5, 1.5, q) if com["a_gnb"] else None, **common)


@st.composite
def settings_(draw):
    n = draw(st.integers(1, 3))
    q = draw(st.sampled_from([1, 3]))
    return dict(
        sizes=draw(st.lists(st.integers(0, 150), min_size=n, max_size=n)),
        dtypes=draw(st.lists(st.sampled_from(DTYPES), min_size=n, max_size=n)),
        views=draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        chunk=draw(st.sampled_from([1, 3, 4, 37, 128, 129, 1 << 18])),
        q=q,
        coeffs=draw(st.lists(st.floats(-2.0, 2.0), min_size=q, max_size=q)),
        restore_scale=draw(st.sampled_from([0.0, 1e-3, -0.5])),
        restore_query=draw(st.integers(0, q)),
        distribution=draw(st.sampled_from(["gaussian", "rademacher"])),
        rounding=draw(st.sampled_from(["nearest", "stochastic"])),
        slot=draw(st.integers(0, 5)),
        seed=draw(st.integers(0, 2**64 - 1)),
        a_gnb=draw(st.booleans()),
    )


@pytest.mark.parametrize("op", OPS)
@SETTINGS
@given(com=settings_())
def test_every_op_matches_the_reference_bit_for_bit(op, com):
    ids = [(com["seed"] + 7919 * i) % 2**32 for i in range(len(com["sizes"]))]
    results = []
    for backend in ("reference", "chunked"):
        params = _tensors(com["sizes"], com["dtypes"], com["views"], 1)
        states = [_tensors(com["sizes"], [torch.float32] * len(ids), com["views"], 2, positive=True),
                  _tensors(com["sizes"], [torch.float32] * len(ids), com["views"], 3)]
        with _chunk(com["chunk"]) if backend == "chunked" else contextlib.nullcontext():
            _call(op, params, ids, backend, states, com)
        results.append(params + states[0] + states[1])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert a.dtype == b.dtype and a.stride() == b.stride(), i
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"tensor {i}: {m}")


# --------------------------------------------------------------- bounded temporaries, resolution


def test_no_stream_is_generated_beyond_one_slice():
    """What bounds the memory: every request for z or rounding words covers at most one slice."""
    requested: list[int] = []
    real = {name: getattr(rng, name) for name in ("normal", "rademacher", "rounding_words")}

    def spy(name):
        def gen(seed, tensor_id, numel, *args, **kwargs):
            requested.append(numel)
            return real[name](seed, tensor_id, numel, *args, **kwargs)
        return gen

    params = [torch.randn(5000).to(torch.bfloat16), torch.randn(1000)]
    with _chunk(256), mock.patch.multiple(rng, **{name: spy(name) for name in real}):
        ops.perturb_(params, [0, 1], 9, 1e-3, rounding="stochastic", backend="chunked")
        ops.sgd_update_(params, [0, 1], 9, torch.tensor([1.0, 2.0]), lr=1e-3, restore_scale=-1e-3,
                        rounding="stochastic", backend="chunked")
    assert requested and max(requested) == 256
    # perturb_: z of every element + the bf16 tensor's rounding words; sgd_update_: z of both queries + words
    assert sum(requested) == (6000 + 5000) + (2 * 6000 + 5000)


def test_auto_falls_back_to_chunked_for_float64():
    cpu = torch.device("cpu")
    assert ops.resolve_backend("auto", cpu, [torch.float32, torch.float64]) == "chunked"
    assert ops.resolve_backend("chunked", cpu, [torch.float64]) == "chunked"
    assert "chunked" in ops.available_backends("cpu")
    p = [torch.full((600,), 1.0 + 1e-12, dtype=torch.float64)]
    with _chunk(128):
        ops.perturb_(p, [0], 1, 0.0, backend="auto")  # float64 math: 1 + 1e-12 survives
    assert torch.equal(p[0], torch.full((600,), 1.0 + 1e-12, dtype=torch.float64))


def test_auto_without_a_fast_backend_warns_once_with_the_fix(no_numba):
    import warnings

    import zo_optim

    w = torch.nn.Parameter(torch.randn(300))
    opt = zo_optim.MeZO([w], lr=1e-3, seed=0)  # backend="auto"
    with pytest.warns(UserWarning, match=r"runs the plain-torch 'chunked' backend.*zo-optim\[cpu\]") as record:
        opt.step(lambda: (w * w).sum())
    assert record[0].filename == __file__  # it names the caller's line, not ours or torch's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: (w * w).sum())  # once per optimizer
        zo_optim.MeZO([w], lr=1e-3, seed=0, backend="chunked").step(lambda: (w * w).sum())  # chosen: silent
        wide = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        zo_optim.MeZO([wide], lr=1e-3, seed=0).step(lambda: (wide * wide).sum())  # float64 runs there by design
    assert ops.slow_fallback_notice("auto", torch.device("cpu"), [torch.float32]) is not None
    assert ops.slow_fallback_notice("chunked", torch.device("cpu"), [torch.float32]) is None
