"""MeZO(block_probes=True): one param group per step, drawn from the seed; math, sampling, replay exactness."""

from __future__ import annotations

import math

import pytest
import torch

import zo_optim
from fed_problems import clients_match_a_scalar_only_replay, mlp_fn
from optim_infos import replay_probed_steps
from zo_optim import rng
from zo_optim.optim._subspace import block_index


def _drawn(seed: int, weights: list[float]) -> int:
    # the documented draw, written out independently: u = top 53 bits of splitmix64(seed ^ "block") / 2**53
    u = (rng.splitmix64(seed ^ int.from_bytes(b"block", "big")) >> 11) / 2.0**53
    cum = 0.0
    for i, w in enumerate(weights):
        cum += w / sum(weights)
        if u < cum:
            return i
    raise AssertionError("u >= 1")


def _groups(weights=(1.0, 2.0, 0.5)):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=g).requires_grad_() for n in (10, 3, 5)]
    return ts, [{"params": [t], "block_weight": w} for t, w in zip(ts, weights, strict=True)]


def test_step_matches_a_plain_torch_block_step():
    lr, eps, weights = 0.01, 1e-3, [1.0, 2.0, 0.5]
    target = [torch.linspace(-1, 1, n) for n in (10, 3, 5)]
    seen = set()
    for base in range(8):
        ts, groups = _groups(weights)
        before = [t.detach().double().clone() for t in ts]
        opt = zo_optim.MeZO(groups, lr=lr, zo_eps=eps, seed=base, block_probes=True, backend="reference")
        seed = opt.current_seed
        with torch.no_grad():
            opt.step(lambda ts=ts: sum(((t - c) ** 2).sum() for t, c in zip(ts, target, strict=True)))
        # reference: block l, z_l from the contract (tensor id = l), g from float64 losses, step scaled by D/d_l
        blk = _drawn(seed, weights)
        seen.add(blk)
        z = rng.normal(seed, blk, ts[blk].numel()).double()

        def loss(shift, blk=blk, z=z, before=before):
            return sum(((b + (shift * z if i == blk else 0.0)) - c.double()).pow(2).sum()
                       for i, (b, c) in enumerate(zip(before, target, strict=True)))

        g = (loss(eps) - loss(-eps)) / (2 * eps)
        # the optimizer's losses are float32: each carries up to ½ ulp(L) ≈ L·2**-24 of rounding, so g is off by
        # up to L·2**-23/(2ε) (+ the float32 weights' rounding); 4× that bound
        tol = 4 * float(loss(0.0)) * 2.0**-23 / (2 * eps)
        assert float(opt.last_projected_grads[0]) == pytest.approx(float(g), abs=tol)
        factor = 18 / ts[blk].numel()
        for i, (t, b) in enumerate(zip(ts, before, strict=True)):
            want = b - lr * factor * float(opt.last_projected_grads[0]) * z if i == blk else b
            # tolerance: the ±ε round trip of float32 weights leaves ~1 ulp (|θ| < 4: 5e-7)
            assert torch.allclose(t.detach().double(), want, atol=2e-6, rtol=0), (base, i, blk)
    assert len(seen) >= 2  # the check covered more than one block


def test_blocks_are_drawn_in_proportion_to_block_weight():
    weights, n = [1.0, 2.0, 0.0, 0.5], 7000
    counts = [0] * 4
    for t in range(n):
        s = rng.step_seed(123, t)
        i = block_index(s, weights)
        assert i == _drawn(s, weights)
        counts[i] += 1
    assert counts[2] == 0
    for c, w in zip(counts, weights, strict=True):
        p = w / 3.5
        assert abs(c - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9  # binomial, 5σ


def test_frozen_group_is_never_drawn_and_bad_weights_fail_before_any_write():
    ts, groups = _groups()
    ts[1].requires_grad_(False)
    opt = zo_optim.MeZO(groups, lr=0.1, seed=0, block_probes=True, backend="reference")
    b1 = ts[1].detach().clone()
    for _ in range(20):
        with torch.no_grad():
            opt.step(lambda: sum((t**2).sum() for t in ts))
    assert torch.equal(ts[1], b1)
    with pytest.raises(ValueError, match="Invalid block_weight of param group 1: -1"):
        zo_optim.MeZO(_groups((1.0, -1.0, 1.0))[1], block_probes=True)
    with pytest.raises(ValueError, match="block_weight 0"):
        zo_optim.MeZO(_groups((0.0, 0.0, 0.0))[1], block_probes=True)
    with pytest.raises(TypeError, match="Invalid block_probes"):
        zo_optim.MeZO(_groups()[1], block_probes="yes")
    ts, groups = _groups()
    opt = zo_optim.MeZO(groups, lr=0.1, seed=0, block_probes=True, backend="reference")
    opt.param_groups[0]["block_weight"] = float("nan")
    before = [t.detach().clone() for t in ts]
    with pytest.raises(ValueError, match="Invalid block_weight of param group 0: nan"), torch.no_grad():
        opt.step(lambda: sum((t**2).sum() for t in ts))
    assert all(torch.equal(t, b) for t, b in zip(ts, before, strict=True))


def test_apply_update_replays_a_block_step_bit_for_bit():
    # a prober measures (seed, g) on its own copy; two replicas only apply the scalars (replay_probed_steps)
    probe_ts, probe_groups = _groups()
    (a_ts, a_groups), (b_ts, b_groups) = _groups(), _groups()
    prober = zo_optim.MeZO(probe_groups, lr=0.05, seed=3, block_probes=True, backend="reference")
    a = zo_optim.MeZO(a_groups, lr=0.05, seed=3, block_probes=True, backend="reference")
    b = zo_optim.MeZO(b_groups, lr=0.05, seed=3, block_probes=True, backend="reference")
    start = [t.detach().clone() for t in a_ts]
    replay_probed_steps(prober, probe_ts, [a, b], a_ts, lambda: sum((t**2).sum() for t in probe_ts), steps=10)
    assert all(torch.equal(x, y) for x, y in zip(a_ts, b_ts, strict=True))
    assert sum(not torch.equal(x, s) for x, s in zip(a_ts, start, strict=True)) >= 2  # several blocks moved


def _layer_groups(m: torch.nn.Module) -> list[dict]:
    return [{"params": list(layer.parameters())} for layer in (m[0], m[2])]


@pytest.mark.parametrize("exact", ["transient", "restore"])
def test_federated_clients_equal_a_scalar_only_replay(exact):
    # the FederatedWrapper pattern of test_federated_core: clients compute, a Replica only replays (seed, scalars)
    def opt_fn(m):
        return zo_optim.MeZO(_layer_groups(m), lr=0.05, block_probes=True, backend="reference")

    replay_model = clients_match_a_scalar_only_replay(opt_fn, tau=2, rounds=4, exact=exact)
    start = list(mlp_fn().parameters())
    moved = [not torch.equal(p, s) for p, s in zip(replay_model.parameters(), start, strict=True)]
    assert any(moved[:2]) and any(moved[2:])  # both blocks were drawn in 8 steps
