"""MeZO(sparse_density=ρ) (Sparse-MeZO): masked z from the contract; math, restriction, resume and replay exactness."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import zo_optim
from backend_checks import backend_or_skip
from fed_problems import clients_match_a_scalar_only_replay
from optim_infos import replay_probed_steps, run_resumed, second_step_with_a_failed_direction
from zo_optim import rng
from zo_optim.optim._sparse import backend_z_, reference_z

SIZES = (40, 12, 7)


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).requires_grad_() for n in SIZES]


def _target() -> list[torch.Tensor]:
    return [torch.linspace(-1, 1, n) for n in SIZES]


def _loss(ts, target):
    return sum(((t - c) ** 2 * (1 + i)).sum() for i, (t, c) in enumerate(zip(ts, target, strict=True)))


def _smallest(theta: torch.Tensor, rho: float) -> torch.Tensor:
    # the documented mask written out independently: the ceil(ρn) entries of smallest |θ| by a full sort
    # (randn draws have no ties, so "≤ threshold" selects exactly these)
    k = math.ceil(rho * theta.numel())
    m = torch.zeros(theta.numel(), dtype=torch.bool)
    m[torch.argsort(theta.detach().abs().reshape(-1))[:k]] = True
    return m.reshape(theta.shape)


@pytest.mark.parametrize("momentum,wd,q", [(0.0, 0.0, 1), (0.9, 0.1, 2)])
def test_step_matches_a_plain_torch_sparse_step(momentum, wd, q):
    lr, eps, rho = 0.01, 1e-3, 0.3
    ts, target = _tensors(), _target()
    opt = zo_optim.MeZO(ts, lr=lr, zo_eps=eps, seed=5, momentum=momentum, weight_decay=wd, num_queries=q,
                        sparse_density=rho)
    ref = [t.detach().double().clone() for t in ts]
    bufs = [torch.zeros_like(r) for r in ref]
    for _ in range(3):
        seed = opt.current_seed
        masks = [_smallest(r, rho) for r in ref]
        with torch.no_grad():
            opt.step(lambda: _loss(ts, target))
        # reference in float64: u_k = m ⊙ z_k (contract z, tensor id = position), g_k from float64 losses
        us = [[rng.normal(seed, i, n, k).double() * m for i, (n, m) in enumerate(zip(SIZES, masks, strict=True))]
              for k in range(q)]
        gs = [(_loss([r + eps * u for r, u in zip(ref, us[k], strict=True)], target)
               - _loss([r - eps * u for r, u in zip(ref, us[k], strict=True)], target)) / (2 * eps) for k in range(q)]
        # float32 losses (L ≲ 200) carry ½ ulp of rounding each: g off by ≤ L·2**-23/(2ε) ≈ 0.012; 4× that
        got = opt.last_projected_grads.double()
        for k in range(q):
            assert float(got[k]) == pytest.approx(float(gs[k]), abs=4 * 200 * 2.0**-23 / (2 * eps))
        for i in range(3):
            # the reference update uses the optimizer's own g (the float32 loss rounding is checked above)
            d = sum(float(got[k]) / q * us[k][i] for k in range(q)) + wd * ref[i]
            bufs[i] = momentum * bufs[i] + d if momentum else d
            ref[i] = ref[i] - lr * bufs[i]
        for t, r in zip(ts, ref, strict=True):
            # float32 weights (|θ| < 4) through a ±ε round trip and 3 updates: a few ulp (5e-7 each)
            assert torch.allclose(t.detach().double(), r, atol=5e-6, rtol=0)


def _replayed(backend: str, density, momentum: float, wd: float, steps: int = 5) -> list[torch.Tensor]:
    # updates from fixed (seed, g): no loss feedback, so rounding differences cannot grow through g
    ts = _tensors()
    opt = zo_optim.MeZO(ts, lr=0.02, seed=11, momentum=momentum, weight_decay=wd, sparse_density=density,
                        backend=backend)
    for k in range(steps):
        opt.apply_update(rng.step_seed(11, k), [(-1.0) ** k * (3.0 + k)])
    return ts


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.5, 0.1)])
def test_density_one_equals_the_reference_backends_dense_mezo(momentum, wd):
    # ρ = 1: every mask is all ones, so the plain-torch masked passes must do what the reference backend's fused
    # ops (the executable spec of a dense MeZO update) do, up to float32 rounding: |step| ≲ lr·|g|·|z| < 0.02·7·5,
    # rounded once or twice per update (ulp(4) = 5e-7): 5 updates stay within a few 1e-6
    for a, b, start in zip(_replayed("reference", 1.0, momentum, wd), _replayed("reference", None, momentum, wd),
                           _tensors(), strict=True):
        assert torch.allclose(a, b, atol=3e-6, rtol=0)
        assert (a != start).all()  # ρ = 1 moves every weight
    # and one real step (restore fused into the update) from the same start: same g, same weights
    for density in (1.0, None):
        ts, target = _tensors(), _target()
        opt = zo_optim.MeZO(ts, lr=0.02, seed=11, momentum=momentum, sparse_density=density, backend="reference")
        with torch.no_grad():
            opt.step(lambda ts=ts, target=target: _loss(ts, target))
        if density is not None:
            first, g1 = ts, float(opt.last_projected_grads[0])
    assert float(opt.last_projected_grads[0]) == pytest.approx(g1, rel=1e-5)
    assert all(torch.allclose(a, b, atol=2e-6, rtol=0) for a, b in zip(first, ts, strict=True))


@pytest.mark.parametrize("backend", ["cpu", "chunked", "triton"])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.5, 0.1)])
def test_fast_path_equals_the_reference_path(backend, momentum, wd):
    # fast path (z from the numba kernel; without momentum the fused ops with P = 1 / +inf as the mask) against
    # the plain-torch masked passes on z from zo_optim.rng; the masks are identical (same θ up to rounding, and
    # randn draws are far from each other at the threshold), z agrees to float32 rounding (~1e-7 relative)
    backend_or_skip(backend)  # triton: its interpreter on these CPU tensors (P = +inf must give u = 0 there too)
    t = torch.zeros(5000)
    ref = reference_z(77, 3, t, 1, "gaussian")
    fast = backend_z_(torch.empty(5000), 77, 3, 1, "gaussian", backend)
    assert torch.allclose(ref, fast, atol=1e-5, rtol=1e-5)
    for a, b in zip(_replayed("reference", 0.3, momentum, wd), _replayed(backend, 0.3, momentum, wd), strict=True):
        assert torch.allclose(a, b, atol=3e-6, rtol=0)
    # the restriction holds on the fast path too: outside the first step's mask nothing moves in one update
    ts = _tensors()
    masks = [_smallest(x, 0.3) for x in ts]
    before = [x.detach().clone() for x in ts]
    zo_optim.MeZO(ts, lr=0.02, seed=11, sparse_density=0.3, backend=backend).apply_update(5, [4.0])
    for x, b, m in zip(ts, before, masks, strict=True):
        assert torch.equal(x[~m].detach(), b[~m]) and not torch.equal(x[m].detach(), b[m])


def test_only_the_masked_coordinates_are_perturbed_and_updated():
    # the restriction itself: in every forward and after every update, the weights outside the step's mask
    # (the smallest ⌈ρn⌉ of |θ| at the step's start) are bit-identical to θ; fails if the mask is ignored
    rho = 0.25
    ts, target = _tensors(1), _target()
    opt = zo_optim.MeZO(ts, lr=0.05, seed=2, sparse_density=rho)
    for _ in range(6):
        before = [t.detach().clone() for t in ts]
        masks = [_smallest(b, rho) for b in before]
        seen = []

        def closure(before=before, masks=masks, seen=seen):
            for t, b, m in zip(ts, before, masks, strict=True):
                assert torch.equal(t[~m], b[~m])  # unmasked: untouched during the probes
                seen.append(int((t != b).sum()))
            return _loss(ts, target)

        with torch.no_grad():
            opt.step(closure)
        assert all(s >= 1 for s in seen)  # the probes did move the masked weights
        for t, b, m in zip(ts, before, masks, strict=True):
            assert torch.equal(t[~m].detach(), b[~m])
            assert int((t != b).sum()) <= math.ceil(rho * t.numel())


def test_state_dict_resume_is_bit_exact():
    def fresh():
        ts = _tensors(3)
        return ts, zo_optim.MeZO(ts, lr=0.02, seed=7, momentum=0.9, sparse_density=0.4)

    target = _target()
    ts, opt = fresh()
    for _ in range(3):
        with torch.no_grad():
            opt.step(lambda: _loss(ts, target))
    # state_dict() shares the buffers (no copies, like torch.optim): deep-copy it as a checkpoint file would
    saved_w, saved = [t.detach().clone() for t in ts], copy.deepcopy(opt.state_dict())
    assert saved["zo"]["settings"] == {"sparse_density": 0.4}
    for _ in range(4):
        with torch.no_grad():
            opt.step(lambda: _loss(ts, target))
    ts2 = run_resumed(fresh, saved_w, saved, 4, lambda xs: _loss(xs, target))
    assert all(torch.equal(a, b) for a, b in zip(ts, ts2, strict=True))


def test_apply_update_replays_a_sparse_step_bit_for_bit():
    # the mask is a function of θ only: a replica with the same θ recomputes it from (seed, g) alone
    prober_ts, a_ts, b_ts = _tensors(), _tensors(), _tensors()
    target = _target()
    prober = zo_optim.MeZO(prober_ts, lr=0.05, seed=3, sparse_density=0.3)
    a = zo_optim.MeZO(a_ts, lr=0.05, seed=3, sparse_density=0.3)
    b = zo_optim.MeZO(b_ts, lr=0.05, seed=3, sparse_density=0.3)
    start = [t.detach().clone() for t in a_ts]
    replay_probed_steps(prober, prober_ts, [a, b], a_ts, lambda: _loss(prober_ts, target), steps=8)
    assert all(torch.equal(x, y) for x, y in zip(a_ts, b_ts, strict=True))
    assert all(not torch.equal(x, s) for x, s in zip(a_ts, start, strict=True))


def test_federated_clients_equal_a_scalar_only_replay():
    def opt_fn(m):
        return zo_optim.MeZO(m.parameters(), lr=0.05, sparse_density=0.5)

    clients_match_a_scalar_only_replay(opt_fn, tau=2, rounds=3)


def test_bad_settings_fail_before_any_write():
    for bad in (0.0, 1.5, -0.1, float("nan"), True, "half"):
        with pytest.raises(ValueError, match="Invalid sparse_density"):
            zo_optim.MeZO(_tensors(), sparse_density=bad)
    half = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match=r"sparse_density: trainable parameter 0 is torch\.bfloat16"):
        zo_optim.MeZO([half], sparse_density=0.5)
    # a weight reassigned to bfloat16 after construction: refused at the step, weights untouched
    t = torch.randn(8, requires_grad=True)
    opt = zo_optim.MeZO([t], sparse_density=0.5)
    t.data = t.data.to(torch.bfloat16)
    before = t.detach().clone()
    with pytest.raises(ValueError, match="sparse_density"), torch.no_grad():
        opt.step(lambda: (t.float() ** 2).sum())
    assert torch.equal(t, before)


def test_an_error_inside_the_momentum_update_on_a_fused_backend_is_finished_exactly(monkeypatch):
    # with momentum the masked update runs tensor by tensor in plain torch even on the fused backends: an error at
    # tensor 1 (out of memory, say) comes after tensor 0 was updated. The pass engine must know that (units of one
    # tensor), restore only tensors 1.., and step() finishes them — bit-identical to an error-free step.
    from zo_optim.optim._sparse import SparsePerturbation

    backend_or_skip("cpu")
    target = _target()

    def make():
        ts = _tensors(6)
        return ts, zo_optim.MeZO(ts, lr=0.02, seed=4, momentum=0.9, sparse_density=0.5, backend="cpu")

    failed, clean = second_step_with_a_failed_direction(
        monkeypatch, make, lambda ts: _loss(ts, target), (SparsePerturbation, "_sparse_u"), tensor_id=1, nth=1,
        forwards=2)
    assert all(torch.equal(a, b) for a, b in zip(failed, clean, strict=True))
