"""Every op on every fast backend against the reference backend (issue 2, item 4).

Each fast backend (``cpu``: numba; ``triton``: Triton's interpreter on CPU, set
up by conftest.py) is compared with :mod:`zo_optim.ops.reference` on random
inputs: odd sizes, 3-D and non-contiguous views, float32/bfloat16/float16
params, several tensors of mixed sizes and dtypes per call, both distributions,
preconditioners, restore on/off, q = 1 and 3, both rounding modes. A backend
whose optional dependency is not installed is skipped; one that is broken, or
required by ``--require-backends`` (CI), fails (tests/backend_checks.py).

Tolerances, from float32 rounding:

* z: the integer Philox words are bit-identical, but logf/sinf/cosf come from
  different libraries (Sleef in torch, libm in numba, libdevice in Triton), each
  within ~1 ulp, so z agrees within a few float32 ulp: ``|z| < 6`` gives
  ``atol=1e-6`` (4 ulp at |z| in [2, 4), 2 ulp above 4, where |z| > 4 has
  probability 6e-5).
* Rademacher z and stochastic-rounding decisions are integer work: bitwise.
* float32 updates: a few ulp of z carried through a handful of float32 ops with
  O(1) coefficients: ``rtol=atol=2e-5``, orders of magnitude below what a wrong
  term (O(lr·coeff)) would produce.
* bfloat16/float16 params: the float32 results before the one rounding differ by
  a few float32 ulp at most, which can move a value across a rounding boundary
  (nearest) or flip a stochastic-rounding decision whose threshold it straddles,
  so at most one ulp of the param dtype, never more.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zo_optim.ops as ops
from backend_checks import backend_or_skip
from zo_optim import rng

FAST_BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (base shape, view) pairs: contiguous odd sizes and non-contiguous views of them.
SHAPES = {
    "0": ((0,), None),
    "1": ((1,), None),
    "3": ((3,), None),
    "4": ((4,), None),
    "5": ((5,), None),
    "127": ((127,), None),
    "128": ((128,), None),
    "129": ((129,), None),
    "3d": ((3, 5, 7), None),
    "t": ((9, 13), "t"),
    "slice": ((258,), "slice"),
    "perm3d": ((2, 3, 5), "perm"),
    "empty2d": ((0, 4), "t"),
    "4097": ((4097,), None),  # two full cpu blocks of 2048 and a tail of one (not drawn by hypothesis)
}


def _view(base: torch.Tensor, how: str | None) -> torch.Tensor:
    if how == "t":
        return base.t()
    if how == "slice":
        return base[1::2]
    if how == "perm":
        return base.permute(2, 0, 1)
    return base


def need(backend: str) -> str:
    """``backend`` if it can run CPU tensors here; a missing dependency skips, a broken backend fails.

    See tests/backend_checks.py: under ``--require-backends`` (CI) a required backend that cannot
    load is an error, never a skip.
    """
    return backend_or_skip(backend)


class Case:
    """A deterministic set of params and state buffers that can be rebuilt for each backend."""

    def __init__(self, shapes: list[str], dtypes: list[torch.dtype], seed: int):
        self.shapes, self.dtypes, self.seed = shapes, dtypes, seed
        self.ids = [(seed * 7919 + 104729 * i) % (2**32) for i in range(len(shapes))]

    def params(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for key, dtype in zip(self.shapes, self.dtypes, strict=True):
            shape, how = SHAPES[key]
            out.append(_view(torch.randn(shape, generator=gen).to(dtype), how))
        return out

    def state(self, salt: int, positive: bool = False) -> list[torch.Tensor]:
        """float32 buffers with the same view layout as their params (so non-contiguous state is written back)."""
        gen = torch.Generator().manual_seed(self.seed + 1000 * salt)
        out = []
        for key in self.shapes:
            shape, how = SHAPES[key]
            s = torch.rand(shape, generator=gen) + 0.5 if positive else torch.randn(shape, generator=gen)
            out.append(_view(s, how))
        return out


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Map 16-bit float bits to integers whose difference counts representable steps."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_same_values(out: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = 2e-5, atol: float = 2e-5):
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    steps = (_ordered(out) - _ordered(ref)).abs()
    assert steps.numel() == 0 or int(steps.max()) <= 1, f"{what}: {int(steps.max())} ulp of {out.dtype} apart"


def assert_all_close(outs, refs, what):
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert_same_values(o, r, f"{what}[{i}]")


# --------------------------------------------------------------- strategies

shape_lists = st.lists(st.sampled_from(sorted(set(SHAPES) - {"4097"})), min_size=1, max_size=4)
seeds = st.integers(0, 2**64 - 1)
case_seeds = st.integers(0, 2**20)


@st.composite
def cases(draw) -> Case:
    shapes = draw(shape_lists)
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in shapes]
    return Case(shapes, dtypes, draw(case_seeds))


@st.composite
def common(draw) -> dict:
    q = draw(st.sampled_from([1, 3]))
    restore = draw(st.booleans())
    return dict(
        q=q,
        coeffs=torch.tensor(draw(st.lists(st.floats(-2.0, 2.0), min_size=q, max_size=q)), dtype=torch.float32),
        restore_scale=draw(st.sampled_from([1e-3, -0.5])) if restore else 0.0,
        restore_query=draw(st.integers(0, q)),  # q itself: a direction outside the update's queries
        distribution=draw(st.sampled_from(["gaussian", "rademacher"])),
        rounding=draw(st.sampled_from(["nearest", "stochastic"])),
        rounding_slot=draw(st.integers(0, 5)),
    )


def _run_both(backend, op, case, seed, kwargs, states):
    """Run ``op`` on fresh copies for the backend and the reference; return (out, ref) params and states."""
    results = []
    for name in (backend, "reference"):
        params = case.params()
        st_ = {k: (None if v is None else [s.clone() for s in v]) for k, v in states.items()}
        getattr(ops, op)(params, case.ids, seed, **kwargs, **st_, backend=name)
        results.append((params, st_))
    return results


def assert_all_equal(outs, refs, what):
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        torch.testing.assert_close(o, r, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _compare(results, states, distribution="gaussian", op=""):
    """Rademacher z makes every operation the reference's: bitwise equal, except AdamW's
    params (torch's CPU sqrt is not correctly rounded, the fast backends' is: one float32
    ulp, which can also move a bfloat16/float16 rounding by one ulp)."""
    (out, out_states), (ref, ref_states) = results
    exact = distribution == "rademacher"
    check = assert_all_equal if exact else assert_all_close
    (assert_all_close if op == "adamw_update_" else check)(out, ref, "params")
    for k in states:
        if states[k] is not None:
            check(out_states[k], ref_states[k], k)


# --------------------------------------------------------------- z itself


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_z_matches_contract(backend, distribution):
    need(backend)
    sizes = [0, 1, 3, 4, 5, 127, 128, 129, 300]
    params = [torch.zeros(n) for n in sizes]
    ids = [0, 1, 2, 3, 2**32 - 1, 17, 5, 6, 123456]
    seed, query = 0xDEADBEEF12345678, 2
    ops.perturb_(params, ids, seed, 1.0, query=query, distribution=distribution, backend=backend)
    gen = rng.normal if distribution == "gaussian" else rng.rademacher
    for p, n, tid in zip(params, sizes, ids, strict=True):
        expected = gen(seed, tid, n, query)
        if distribution == "gaussian":
            torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, expected), "Rademacher z must be bit-exact"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_z_independent_of_grouping(backend):
    need(backend)
    sizes = [5, 129, 0, 64]
    together = [torch.zeros(n) for n in sizes]
    ops.perturb_(together, [9, 8, 7, 6], 42, 1.0, backend=backend)
    for t, n, tid in zip(together, sizes, [9, 8, 7, 6], strict=True):
        alone = torch.zeros(n)
        ops.perturb_([alone], [tid], 42, 1.0, backend=backend)
        assert torch.equal(alone, t)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_stochastic_rounding_decisions_bitwise(backend, dtype, distribution):
    """θ + s·z computed exactly in float32, so every rounding decision is integer work: bitwise."""
    need(backend)
    gen = torch.Generator().manual_seed(3)
    # |θ| < 2**6 with 8 (bf16) / 11 (fp16) significant bits plus a multiple of 2**-14 spans < 24 bits.
    base = (torch.randn(700, generator=gen) * 8).to(dtype)
    scale = 2.0**-14
    if distribution == "gaussian":
        # z·2**-14 is not exact, but perturbing exact zeros stores z·scale rounded once: compare
        # through a fp32 copy of z instead (the decision then only depends on the integer words).
        base = torch.zeros(700, dtype=dtype)
        scale = 1.0
    outs = []
    for name in (backend, "reference"):
        p = base.clone()
        ops.perturb_([p], [11], 2024, scale, distribution=distribution, rounding="stochastic",
                     rounding_slot=1, backend=name)
        outs.append(p)
    if distribution == "rademacher":
        assert torch.equal(outs[0], outs[1])
    else:
        # 0 + z is z in float32; z agrees to a few ulp, far from where a 16-bit rounding decision flips
        # except in rare straddling cases: at most one ulp of the param dtype, and nearly all bitwise.
        assert_same_values(outs[0], outs[1], "sr(z)")
        assert (outs[0] != outs[1]).sum() <= 2


# --------------------------------------------------------------- ops


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=cases(), seed=seeds, com=common(), use_precond=st.booleans(), scale=st.sampled_from([1e-3, -2e-3, 0.7]))
def test_perturb(backend, case, seed, com, use_precond, scale):
    need(backend)
    states = {"precond": case.state(1, positive=True) if use_precond else None}
    kwargs = dict(scale=scale, query=com["restore_query"], distribution=com["distribution"],
                  rounding=com["rounding"], rounding_slot=com["rounding_slot"])
    results = _run_both(backend, "perturb_", case, seed, kwargs, states)
    _compare(results, {}, com["distribution"], "perturb_")


def _update_kwargs(com):
    return dict(coeffs=com["coeffs"], restore_scale=com["restore_scale"], restore_query=com["restore_query"],
                distribution=com["distribution"], rounding=com["rounding"], rounding_slot=com["rounding_slot"])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=cases(), seed=seeds, com=common(), momentum=st.sampled_from([None, 0.0, 0.9]),
       weight_decay=st.sampled_from([0.0, 0.1]), lr=st.sampled_from([1e-3, 0.5]))
def test_sgd_update(backend, case, seed, com, momentum, weight_decay, lr):
    need(backend)
    states = {"momentum_buffers": None if momentum is None else case.state(2)}
    kwargs = dict(_update_kwargs(com), lr=lr, weight_decay=weight_decay, momentum=momentum or 0.0)
    results = _run_both(backend, "sgd_update_", case, seed, kwargs, states)
    _compare(results, states, com["distribution"], "sgd_update_")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=cases(), seed=seeds, com=common(), step=st.integers(1, 50), weight_decay=st.sampled_from([0.0, 0.01]),
       lr=st.sampled_from([1e-3, 0.1]))
def test_adamw_update(backend, case, seed, com, step, weight_decay, lr):
    need(backend)
    states = {"exp_avgs": case.state(3), "exp_avg_sqs": case.state(4, positive=True)}
    kwargs = dict(_update_kwargs(com), lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, step=step)
    results = _run_both(backend, "adamw_update_", case, seed, kwargs, states)
    _compare(results, states, com["distribution"], "adamw_update_")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=cases(), seed=seeds, com=common(), rule=st.sampled_from(["hizoo", "hiso"]), update=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.1]), rate=st.sampled_from([1e-8, 0.05]))
def test_precond_sgd_update(backend, case, seed, com, rule, update, weight_decay, rate):
    need(backend)
    states = {"precond": case.state(5, positive=True)}
    q = com["q"]
    precond_coeffs = torch.linspace(0.1, 1.0, q) if rule == "hizoo" else None
    kwargs = dict(_update_kwargs(com), lr=0.05, rule=rule, update_precond=update, precond_decay=1.0 - rate,
                  precond_rate=rate, precond_coeffs=precond_coeffs, hessian_eps=1e-8, weight_decay=weight_decay)
    results = _run_both(backend, "precond_sgd_update_", case, seed, kwargs, states)
    _compare(results, states, com["distribution"], "precond_sgd_update_")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=cases(), seed=seeds, com=common(), update=st.booleans(), gnb=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.1]), clip=st.sampled_from([0.5, 1.0, 3.0]))
def test_helene_update(backend, case, seed, com, update, gnb, weight_decay, clip):
    need(backend)
    states = {"exp_avgs": case.state(6), "hessians": case.state(7, positive=True)}
    q = com["q"]
    kwargs = dict(_update_kwargs(com), lr=0.01, alpha=0.95, beta1=0.9, beta2=0.99, gamma=1.0, eps=1e-8,
                  clip=[clip * (i + 1) / 2 for i in range(len(case.shapes))], update_hessian=update,
                  hessian_coeffs=torch.linspace(0.5, 2.0, q) if gnb else None, weight_decay=weight_decay)
    results = _run_both(backend, "helene_update_", case, seed, kwargs, states)
    _compare(results, states, com["distribution"], "helene_update_")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_many_tensors_in_one_call(backend):
    """Dozens of mixed sizes, dtypes and empty tensors in one call (one launch per op on the fast backends)."""
    need(backend)
    sizes = [0, 1, 3, 0, 4, 5, 7, 31, 2, 128, 0, 9] * (3 if backend == "triton" else 6)
    if backend == "cpu":
        sizes += [10_000, 4097]  # several work items of one tensor
    case = Case(["1"] * len(sizes), [DTYPES[i % 3] for i in range(len(sizes))], 5)
    case.params = lambda: [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DTYPES[i % 3])
                           for i, n in enumerate(sizes)]
    states = {"momentum_buffers": [torch.randn(n) for n in sizes]}
    kwargs = dict(coeffs=torch.tensor([0.3, -1.2, 0.8]), lr=0.01, momentum=0.9, restore_scale=1e-3,
                  restore_query=2, rounding="stochastic")
    _compare(_run_both(backend, "sgd_update_", case, 77, kwargs, states), states)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_mezo_step_round_trip(backend):
    """+ε, −2ε, fused restore with lr=0 returns fp32 weights to within rounding of where they started."""
    need(backend)
    p = torch.randn(257)
    start = p.clone()
    ops.perturb_([p], [3], 99, 1e-3, backend=backend)
    ops.perturb_([p], [3], 99, -2e-3, backend=backend)
    ops.sgd_update_([p], [3], 99, torch.tensor([5.0]), lr=0.0, restore_scale=1e-3, backend=backend)
    torch.testing.assert_close(p, start, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_special_values(backend, dtype, rounding):
    """NaN/inf propagate, overflow and subnormals round like the reference (NaN payloads may differ)."""
    need(backend)
    values = [float("nan"), float("inf"), -float("inf"), 65504.0, 65519.0, 70000.0, 3.3e38, 1e-8, 6e-8, -0.0, 0.0]
    base = torch.tensor(values * 7).to(dtype)
    outs = []
    for name in (backend, "reference"):
        p = base.clone()
        ops.perturb_([p], [4], 8, 1e-7, rounding=rounding, backend=name)
        outs.append(p)
    out, ref = outs
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ~ref.isnan()
    assert_same_values(out[finite], ref[finite], f"{dtype} {rounding}")


# --------------------------------------------------------------- bad input: clear error, nothing modified


def _contents(t: torch.Tensor) -> torch.Tensor:
    """What an op could modify: the storage of a huge stride-0 expand, else the tensor."""
    if t.layout == torch.strided and t.numel() > 2**24:
        return torch.tensor([], dtype=t.dtype).set_(t.untyped_storage())
    return t.to_dense()


def _snapshot(tensors):
    return [_contents(t).clone() if t.device.type != "meta" else t for t in tensors]


def _unchanged(before, after):
    for b, a in zip(before, after, strict=True):
        if a.device.type != "meta":
            assert torch.equal(b, _contents(a)), "an op modified its input"


def _good(n=6):
    return [torch.randn(n), torch.randn(3, 2)]


BAD_PARAMS = {
    "mixed devices": (lambda: [torch.randn(4), torch.empty(4, device="meta")], ValueError, "params[1]"),
    "int tensor": (lambda: [torch.randn(4), torch.arange(4)], TypeError, "params[1]"),
    "bool tensor": (lambda: [torch.ones(3, dtype=torch.bool)], TypeError, "params[0]"),
    "sparse tensor": (lambda: [torch.randn(4), torch.eye(3).to_sparse()], TypeError, "params[1]"),
    "beyond the counter range": (
        # A stride-0 expand: 2**34 + 4 elements in 4 bytes of memory, after a real tensor that must stay untouched.
        lambda: [torch.randn(4), torch.zeros(1).expand(2**34 + 4)], ValueError, "params[1]",
    ),
}


@pytest.mark.parametrize("backend", [*FAST_BACKENDS, "auto"])
@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_params_refused_untouched(backend, case):
    if backend != "auto":
        need(backend)
    make, exc, name = BAD_PARAMS[case]
    params = make()
    before = _snapshot(params)
    with pytest.raises(exc, match=name.replace("[", r"\[").replace("]", r"\]")):
        ops.sgd_update_(params, list(range(len(params))), 1, torch.tensor([1.0]), lr=0.1, restore_scale=1e-3,
                        backend=backend)
    _unchanged(before, params)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bad_state_refused_untouched(backend):
    need(backend)
    params = _good()
    before = _snapshot(params)
    bad_states = [
        ([torch.zeros(6), torch.zeros(2, 3)], r"momentum_buffers\[1\]"),  # wrong shape
        ([torch.zeros(6, dtype=torch.float64), torch.zeros(3, 2)], r"momentum_buffers\[0\]"),  # wrong dtype
        ([torch.zeros(6)], "momentum_buffers has 1 tensors"),  # wrong count
    ]
    for buffers, msg in bad_states:
        kept = _snapshot(buffers)
        with pytest.raises(ValueError, match=msg):
            ops.sgd_update_(params, [0, 1], 1, torch.tensor([1.0]), lr=0.1, momentum=0.9, momentum_buffers=buffers,
                            restore_scale=1e-3, backend=backend)
        _unchanged(kept, buffers)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\]"):
        ops.adamw_update_(params, [0, 1], 1, torch.tensor([1.0]), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, step=1, exp_avgs=[torch.zeros(6), torch.zeros(3, 2)],
                          exp_avg_sqs=[torch.zeros(5), torch.zeros(3, 2)], backend=backend)
    _unchanged(before, params)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bad_coeffs_refused_untouched(backend):
    need(backend)
    params = _good()
    precond = [torch.ones(6), torch.ones(3, 2)]
    before, pbefore = _snapshot(params), _snapshot(precond)
    common_kw = dict(lr=0.1, precond=precond, rule="hizoo", update_precond=True, precond_decay=0.9, precond_rate=0.1,
                     restore_scale=1e-3, backend=backend)
    with pytest.raises(ValueError, match="precond_coeffs has 2 entries, expected 3"):
        ops.precond_sgd_update_(params, [0, 1], 1, torch.ones(3), precond_coeffs=torch.ones(2), **common_kw)
    with pytest.raises(ValueError, match="coeffs must be a non-empty 1-D float32"):
        ops.precond_sgd_update_(params, [0, 1], 1, torch.ones(3, dtype=torch.float64), precond_coeffs=torch.ones(3),
                                **common_kw)
    with pytest.raises(ValueError, match="coeffs must be a non-empty 1-D float32"):
        ops.sgd_update_(params, [0, 1], 1, torch.ones(1, 1), lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="coeffs is on meta"):
        ops.sgd_update_(params, [0, 1], 1, torch.ones(1, device="meta"), lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="clip has 1 values for 2 params"):
        ops.helene_update_(params, [0, 1], 1, torch.ones(1), lr=0.1, alpha=1.0, beta1=0.9, beta2=0.99, gamma=1.0,
                           eps=1e-8, clip=[1.0], exp_avgs=[torch.zeros(6), torch.zeros(3, 2)],
                           hessians=[torch.zeros(6), torch.zeros(3, 2)], update_hessian=True, backend=backend)
    _unchanged(before, params)
    _unchanged(pbefore, precond)


def test_missing_cpu_backend_gives_install_hint(no_numba):
    params = _good()
    before = _snapshot(params)
    with pytest.raises(ImportError, match=r"zo-optim\[cpu\]"):
        ops.perturb_(params, [0, 1], 1, 1e-3, backend="cpu")
    _unchanged(before, params)
    assert "cpu" not in ops.available_backends("cpu")
    # "auto" falls back to the chunked plain-torch backend, which still works.
    ops.perturb_(params, [0, 1], 1, 1e-3, backend="auto")
    assert not torch.equal(params[0], before[0])


def test_missing_triton_backend_gives_install_hint(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name.startswith("zo_optim.ops.triton") or name == "triton":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr(ops, "_loaded", {k: v for k, v in ops._loaded.items() if k != "triton"})
    params = _good()
    before = _snapshot(params)
    with pytest.raises(ImportError, match=r"zo-optim\[triton\]"):
        ops.perturb_(params, [0, 1], 1, 1e-3, backend="triton")
    _unchanged(before, params)


def test_a_failed_backend_import_is_not_retried_on_every_dispatch(no_numba, monkeypatch):
    """Python does not cache a failed import: retrying it on every op of backend="auto" cost 4 ms a dispatch."""
    real_import = importlib.import_module
    tries = []

    def counting_import(name, *args, **kwargs):
        tries.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", counting_import)
    params = _good()
    for _ in range(3):
        ops.perturb_(params, [0, 1], 1, 1e-3, backend="auto")
        with pytest.raises(ImportError, match=r"backend 'cpu' is unavailable .*numba.*zo-optim\[cpu\]"):
            ops.load_backend("cpu")
    assert tries.count("zo_optim.ops.cpu") == 1


def test_import_zo_optim_does_not_import_numba_or_triton():
    code = "import sys, zo_optim, zo_optim.ops; assert 'numba' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------- cpu backend: the float conversions, bit for bit


def _cpu_numerics():
    need("cpu")
    return _compile_numerics_harness()


@functools.cache
def _compile_numerics_harness():
    import numba

    from zo_optim.ops.cpu import _numerics as num

    @numba.njit
    def to_16(bits, words, fmt, stochastic, out):
        for i in range(bits.shape[0]):
            b, w = numba.uint64(bits[i]), numba.uint64(words[i])
            if fmt == num.BF16:
                out[i] = num.bf16_stochastic(b, w) if stochastic else num.bf16_nearest(b)
            else:
                out[i] = num.f16_stochastic(b, w) if stochastic else num.f16_nearest(b)

    @numba.njit
    def from_f16(h, out):
        for i in range(h.shape[0]):
            out[i] = num.half_to_f32(numba.uint64(h[i]))

    return to_16, from_f16


def _threshold_words(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rounding words that sit exactly on (or one step above) each value's stochastic-rounding threshold."""
    mant_bits, emin = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}[dtype]
    a = x.abs().to(torch.float64)
    _, e = torch.frexp(a)
    ulp = torch.pow(2.0, (torch.clamp(e.to(torch.int64) - 1, min=emin) - mant_bits).to(torch.float64))
    frac = a / ulp - torch.floor(a / ulp)
    u24 = torch.floor(frac * 2**24).to(torch.int64) + torch.randint(0, 2, x.shape, generator=gen)
    return (u24.clamp(0, 2**24 - 1) << 8) | torch.randint(0, 256, x.shape, generator=gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_cpu_rounding_is_bit_exact(dtype, stochastic):
    """float32 -> bf16/fp16 (nearest = torch's conversion; stochastic = rng.stochastic_round), incl. ties,
    subnormals, overflow, inf/nan, on random bit patterns and on words at the exact rounding threshold."""
    to_16, _ = _cpu_numerics()
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(0, 2**32, (100_000,), generator=gen)
    # Every exponent near the 16-bit formats' subnormal, normal and overflow edges, random mantissas.
    exps = torch.tensor([0, 1, *range(99, 116), *range(140, 146), 253, 254, 255])
    edge_bits = (exps.repeat_interleave(4000) << 23) | torch.randint(0, 2**23, (len(exps) * 4000,), generator=gen)
    edge_bits |= torch.randint(0, 2, edge_bits.shape, generator=gen) << 31
    bits = torch.cat([random_bits, edge_bits])
    x = torch.from_numpy(bits.numpy().astype("uint32").view("float32"))
    words = torch.randint(0, 2**32, bits.shape, generator=gen)
    words[::2] = _threshold_words(x[::2], dtype, gen)
    out = torch.empty(bits.shape, dtype=torch.int16)
    to_16(bits.numpy().astype("uint32"), words.numpy().astype("uint32"), 1 if dtype == torch.bfloat16 else 2,
          stochastic, out.numpy().view("uint16"))
    expected = rng.stochastic_round(x, dtype, words) if stochastic else x.to(dtype)
    got = out.view(dtype)
    both_nan = torch.isnan(got) & torch.isnan(expected)
    mismatch = (got.view(torch.int16) != expected.view(torch.int16)) & ~both_nan
    assert not mismatch.any(), f"{int(mismatch.sum())} mismatches, e.g. bits {hex(int(bits[mismatch][0]))}"


def test_cpu_half_to_float_is_exact():
    _, from_f16 = _cpu_numerics()
    h = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    out = torch.empty(h.shape, dtype=torch.float32)
    from_f16(h.numpy().view("uint16"), out.numpy())
    torch.testing.assert_close(out, h.view(torch.float16).float(), rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------- review fixes


@pytest.mark.parametrize("backend", ["reference", "chunked", *FAST_BACKENDS])
def test_strided_coeffs_read_by_logical_index(backend):
    """A non-contiguous coeffs view (a column of a [q, 2] tensor) means its logical values."""
    if backend != "reference":
        need(backend)
    table = torch.tensor([[0.5, 100.0], [-1.0, 100.0], [2.0, 100.0]])
    strided, dense = table[:, 0], table[:, 0].clone()
    precond = [torch.rand(8) + 0.5]
    results = []
    for coeffs in (strided, dense):
        p, pc = [torch.zeros(8)], [t.clone() for t in precond]
        ops.precond_sgd_update_(p, [0], 5, coeffs, lr=1.0, precond=pc, rule="hizoo", update_precond=True,
                                precond_decay=0.9, precond_rate=0.1, distribution="rademacher", backend=backend,
                                precond_coeffs=torch.tensor([[1.0, 9.0]] * 3)[:, 0])
        h = [torch.ones(8)]
        q = [torch.zeros(8)]
        ops.helene_update_(q, [0], 5, coeffs, lr=1.0, alpha=1.0, beta1=0.9, beta2=0.99, gamma=1.0, eps=1e-8,
                           clip=[1.0], exp_avgs=[torch.zeros(8)], hessians=h, update_hessian=True,
                           hessian_coeffs=torch.tensor([[1.0, 9.0]] * 3)[:, 0], distribution="rademacher",
                           backend=backend)
        results.append((p[0], pc[0], q[0], h[0]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    p = [torch.zeros(8)]
    ops.sgd_update_(p, [0], 5, strided, lr=1.0, distribution="rademacher", backend=backend)
    z = [rng.rademacher(5, 0, 8, k) for k in range(3)]
    torch.testing.assert_close(p[0], -(0.5 * z[0] - 1.0 * z[1] + 2.0 * z[2]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_float64_params_keep_float64_precision(backend):
    p = [torch.full((4,), 1.0 + 1e-12, dtype=torch.float64)]
    ops.perturb_(p, [0], 1, 0.0, backend=backend)
    assert torch.equal(p[0], torch.full((4,), 1.0 + 1e-12, dtype=torch.float64))
    start = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = [start.clone()]
    ops.perturb_(p, [0], 1, 1e-3, backend=backend)
    ops.perturb_(p, [0], 1, -2e-3, backend=backend)
    ops.sgd_update_(p, [0], 1, torch.tensor([0.0]), lr=0.0, restore_scale=1e-3, backend=backend)
    torch.testing.assert_close(p[0], start, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", ["reference", "chunked", *FAST_BACKENDS])
def test_leaf_params_requiring_grad_outside_no_grad(backend):
    if backend != "reference":
        need(backend)
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(3, 5).t())  # non-contiguous leaf
    ops.perturb_([a, b], [0, 1], 1, 1.0, backend=backend)
    assert a.detach().abs().sum() > 0 and b.detach().abs().sum() > 0
    ref = [torch.zeros(4), torch.zeros(3, 5).t()]
    ops.perturb_(ref, [0, 1], 1, 1.0, backend="reference")
    torch.testing.assert_close(a.detach(), ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), ref[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "chunked", *FAST_BACKENDS, "auto"])
@pytest.mark.parametrize("word", ["query", "restore_query", "rounding_slot"])
@pytest.mark.parametrize("value", [2**32, -1, True, 1.0])
def test_bad_counter_words_refused_untouched(backend, word, value):
    if backend not in ("reference", "auto"):
        need(backend)
    params = [torch.randn(4), torch.randn(4).to(torch.bfloat16)]
    buffers = [torch.randn(4), torch.randn(4)]
    before, bbefore = _snapshot(params), _snapshot(buffers)
    with pytest.raises(ValueError, match=f"Invalid {word}"):
        if word == "query":
            ops.perturb_(params, [0, 1], 1, 1.0, query=value, rounding="stochastic", backend=backend)
        else:
            ops.sgd_update_(params, [0, 1], 1, torch.tensor([1.0]), lr=1.0, momentum=0.9, momentum_buffers=buffers,
                            restore_scale=1e-3, rounding="stochastic", backend=backend, **{word: value})
    _unchanged(before, params)
    _unchanged(bbefore, buffers)


@pytest.mark.parametrize("backend", ["reference", "chunked", *FAST_BACKENDS])
@pytest.mark.parametrize("bad", [1e39, float("inf"), float("nan"), -0.5])
def test_bad_helene_clip_refused_untouched(backend, bad):
    if backend != "reference":
        need(backend)
    params = _good()
    states = [[torch.zeros(6), torch.zeros(3, 2)] for _ in range(2)]
    kept = [_snapshot(params), *map(_snapshot, states)]
    with pytest.raises(ValueError, match=r"Invalid clip\[1\]"):
        ops.helene_update_(params, [0, 1], 1, torch.ones(1), lr=0.1, alpha=1.0, beta1=0.9, beta2=0.99, gamma=1.0,
                           eps=1e-8, clip=[1.0, bad], exp_avgs=states[0], hessians=states[1], update_hessian=True,
                           hessian_coeffs=torch.ones(1), restore_scale=1e-3, backend=backend)
    for before, after in zip(kept, [params, *states], strict=True):
        _unchanged(before, after)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_backends_bump_the_version_counter(backend):
    """A raw-pointer write must look like an in-place op to autograd."""
    need(backend)
    params = [torch.zeros(6), torch.zeros(2, 3).t()]
    bufs = [torch.zeros(6), torch.zeros(2, 3).t()]
    before = [t._version for t in params + bufs]
    ops.sgd_update_(params, [0, 1], 1, torch.tensor([1.0]), lr=0.1, momentum=0.9, momentum_buffers=bufs,
                    backend=backend)
    assert all(t._version > v for t, v in zip(params + bufs, before, strict=True))
    precond = [torch.ones(6)]
    v_p, v_c = params[0]._version, precond[0]._version
    ops.perturb_(params[:1], [0], 1, 1e-3, precond=precond, backend=backend)
    assert params[0]._version > v_p and precond[0]._version == v_c  # the preconditioner is only read
    w = torch.ones(6, requires_grad=True)
    x = w * 2.0
    y = x.sin()  # saves x for backward
    ops.perturb_([x.detach()], [0], 1, 1e-3, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_non_tensor_params_and_bool_ids_refused():
    with pytest.raises(TypeError, match=r"params\[0\] is a list"):
        ops.perturb_([[1.0, 2.0], torch.zeros(2)], [0, 1], 1, 1.0, backend="reference")
    with pytest.raises(TypeError, match=r"params\[1\] is a float"):
        ops.perturb_([torch.zeros(2), 1.0], [0, 1], 1, 1.0, backend="reference")
    p = [torch.zeros(2)]
    with pytest.raises(ValueError, match=r"Invalid tensor_id for params\[0\]: True"):
        ops.perturb_(p, [True], 1, 1.0, backend="reference")
    assert torch.equal(p[0], torch.zeros(2))


def test_auto_resolution():
    cpu = torch.device("cpu")
    assert ops.resolve_backend("auto", cpu, [torch.float32, torch.float64]) == "chunked"
    assert ops.resolve_backend("auto", cpu, [torch.float64]) == "chunked"
    need("cpu")
    assert ops.resolve_backend("auto", cpu, [torch.float32, torch.bfloat16]) == "cpu"
    assert ops.resolve_backend("auto", cpu) == "cpu"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_backend_refuses_float64(backend):
    need(backend)
    params = [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="use backend='reference'"):
        ops.perturb_(params, [0, 1], 1, 1.0, backend=backend)
    assert not any(p.any() for p in params)


def test_cpu_backend_refuses_other_devices():
    need("cpu")
    with pytest.raises(RuntimeError, match="backend 'cpu' runs CPU tensors, got tensors on meta"):
        ops.perturb_([torch.empty(3, device="meta")], [0], 1, 1.0, backend="cpu")


OP_KWARGS = {
    "perturb_": lambda case: ({"precond": case.state(1, positive=True)}, dict(scale=0.3, query=1)),
    "sgd_update_": lambda case: (
        {"momentum_buffers": case.state(2)}, dict(coeffs=torch.tensor([0.5, -1.0]), lr=0.1, momentum=0.9,
                                                  restore_scale=1e-3, weight_decay=0.1),
    ),
    "adamw_update_": lambda case: (
        {"exp_avgs": case.state(3), "exp_avg_sqs": case.state(4, positive=True)},
        dict(coeffs=torch.tensor([0.5, -1.0]), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3,
             restore_scale=1e-3),
    ),
    "precond_sgd_update_": lambda case: (
        {"precond": case.state(5, positive=True)},
        dict(coeffs=torch.tensor([0.5, -1.0]), lr=0.05, rule="hizoo", update_precond=True, precond_decay=0.9,
             precond_rate=0.1, precond_coeffs=torch.tensor([0.3, 0.7]), restore_scale=1e-3),
    ),
    "helene_update_": lambda case: (
        {"exp_avgs": case.state(6), "hessians": case.state(7, positive=True)},
        dict(coeffs=torch.tensor([0.5, -1.0]), lr=0.01, alpha=0.95, beta1=0.9, beta2=0.99, gamma=1.0, eps=1e-8,
             clip=[0.5, 1.0], update_hessian=True, hessian_coeffs=torch.tensor([1.0, 2.0]), restore_scale=1e-3),
    ),
}


@pytest.mark.parametrize("op", sorted(OP_KWARGS))
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_cpu_block_tail_every_op(op, distribution):
    """4097 elements: two full cpu blocks and a one-element tail, beside a float16 transpose."""
    need("cpu")
    case = Case(["4097", "t"], [torch.float32, torch.float16], seed=11)
    states, kwargs = OP_KWARGS[op](case)
    kwargs = dict(kwargs, distribution=distribution)
    _compare(_run_both("cpu", op, case, 2**40 + 3, kwargs, states), states, distribution, op)


def test_cpu_multithreaded_perturb_matches_the_contract():
    """2**18 elements run on several numba threads (MIN_ELEMENTS_PER_THREAD = 2**16): z is rng.normal's."""
    need("cpu")
    n = 2**18
    p = [torch.zeros(n)]
    ops.perturb_(p, [9], 123, 1.0, query=2, backend="cpu")
    torch.testing.assert_close(p[0], rng.normal(123, 9, n, 2), rtol=0, atol=1e-6)
