"""MeZO(lowrank_rank=r, lowrank_interval=ν, lowrank_kind=...) (LOZO, SubZero): low-rank directions; math, subspace,
resume and replay exactness."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import zo_optim
from fed_problems import clients_match_a_scalar_only_replay, mlp_fn
from optim_infos import run_resumed, second_step_with_a_failed_direction
from zo_optim import rng

SHAPES = ((12, 9), (9,), (2, 9), (6, 2, 3))  # a matrix, a bias, a matrix with min(n0, n1) ≤ r, a 3-d weight
RANK = 2
KINDS = ("lozo", "subzero")
# the documented tag of U's seed, written out here independently of the module's constant: ASCII "lowrank"
TAG = int.from_bytes(b"lowrank", "big")


def _tensors(seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def _target() -> list[torch.Tensor]:
    return [torch.linspace(-1, 1, math.prod(s)).reshape(s) for s in SHAPES]


def _loss(ts, target):
    return sum(((t - c) ** 2 * (1 + i)).sum() for i, (t, c) in enumerate(zip(ts, target, strict=True)))


def _orthonormal(seed: int, i: int, n: int, query: int) -> torch.Tensor:
    """SubZero's documented factor, Q of the n × r Gaussian matrix A = QR with diag(R) > 0, by another route than
    the module's Householder QR: Cholesky QR (AᵀA = RᵀR, Q = A R⁻¹), in float64; the same unique Q up to rounding."""
    a = rng.normal(seed, i, n * RANK, query).double().reshape(n, RANK)
    low = torch.linalg.cholesky(a.T @ a)  # = Rᵀ, positive diagonal
    return torch.linalg.solve_triangular(low, a.T, upper=False).T


def _factors(i: int, shape, window_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SubZero's window factors (U, V) of tensor i, from the window's first step seed."""
    n0 = shape[0]
    u_seed = rng.splitmix64(window_seed ^ TAG)
    return _orthonormal(u_seed, i, n0, 0), _orthonormal(u_seed, i, math.prod(shape) // n0, 1)


def _direction(i: int, shape, seed: int, window_seed: int, query: int, kind: str = "lozo") -> torch.Tensor:
    """The documented u of tensor i in float64 for a matrix with r < min(n0, n1): U Vᵀ/√r (LOZO) or
    √(n0·n1)/r · U S Vᵀ (SubZero); else the dense z."""
    n0 = shape[0]
    n1 = math.prod(shape) // n0
    if len(shape) < 2 or RANK >= min(n0, n1):
        return rng.normal(seed, i, math.prod(shape), query).double().reshape(shape)
    if kind == "subzero":
        U, V = _factors(i, shape, window_seed)
        S = rng.normal(seed, i, RANK * RANK, query).double().reshape(RANK, RANK)
        return (math.sqrt(n0 * n1) / RANK * U @ S @ V.T).reshape(shape)
    u_seed = rng.splitmix64(window_seed ^ TAG)
    U = rng.normal(u_seed, i, n0 * RANK, 0).double().reshape(n0, RANK)
    V = rng.normal(seed, i, n1 * RANK, query).double().reshape(n1, RANK)
    return (U @ V.T / math.sqrt(RANK)).reshape(shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("momentum,wd,q", [(0.0, 0.0, 1), (0.9, 0.1, 2)])
def test_step_matches_a_plain_torch_lowrank_step(momentum, wd, q, kind):
    # 5 steps with ν = 2: windows {0, 1}, {2, 3}, {4}; each window's U (and SubZero's V) comes from its first
    # step's seed, V (SubZero's S) from each step's seed and query
    # lr small enough that the momentum run does not diverge on this problem (at 0.01 it does: L 474 → 3e3, |θ| → 12)
    lr, eps, nu = 3e-3, 1e-3, 2
    ts, target = _tensors(), _target()
    opt = zo_optim.MeZO(ts, lr=lr, zo_eps=eps, seed=5, momentum=momentum, weight_decay=wd, num_queries=q,
                        lowrank_rank=RANK, lowrank_interval=nu, lowrank_kind=kind)
    ref = [t.detach().double().clone() for t in ts]
    bufs = [torch.zeros_like(r) for r in ref]
    window_seed = None
    for t in range(5):
        seed = opt.current_seed
        if t % nu == 0:
            window_seed = seed
        with torch.no_grad():
            opt.step(lambda: _loss(ts, target))
        us = [[_direction(i, s, seed, window_seed, k, kind) for i, s in enumerate(SHAPES)] for k in range(q)]
        losses = [[_loss([r + sign * eps * u for r, u in zip(ref, us[k], strict=True)], target) for sign in (1, -1)]
                  for k in range(q)]
        gs = [(lp - lm) / (2 * eps) for lp, lm in losses]
        # float32 losses carry ½ ulp of rounding each: g off by ≤ L·2**-23/(2ε) (L ≲ 700 here); 4× that for the
        # float32 weights' own rounding inside the loss
        got = opt.last_projected_grads.double()
        for k in range(q):
            tol = 4 * float(max(losses[k])) * 2.0**-23 / (2 * eps)
            assert float(got[k]) == pytest.approx(float(gs[k]), abs=tol)
        for i in range(len(SHAPES)):
            d = sum(float(got[k]) / q * us[k][i] for k in range(q)) + wd * ref[i]
            bufs[i] = momentum * bufs[i] + d if momentum else d
            ref[i] = ref[i] - lr * bufs[i]
        for x, r in zip(ts, ref, strict=True):
            # float32 weights (|θ| < 5) through a ±ε round trip and 5 updates: a few ulp (5e-7 each)
            assert torch.allclose(x.detach().double(), r, atol=5e-6, rtol=0)


def test_the_updates_of_a_window_stay_in_its_column_space():
    # ν = 4, r = 2: the 4 updates of window 0 move the 12×9 matrix inside span(U_0) (rank 2), the next window
    # adds a new 2-d column space (rank 4 in all), while the bias (dense z) moves in every coordinate
    ts, target = _tensors(2), _target()
    opt = zo_optim.MeZO(ts, lr=0.02, seed=3, lowrank_rank=RANK, lowrank_interval=4)
    start = [x.detach().clone().double() for x in ts]
    for t in range(8):
        with torch.no_grad():
            opt.step(lambda: _loss(ts, target))
        delta = ts[0].detach().double() - start[0]
        sv = torch.linalg.svdvals(delta)
        expected_rank = 2 if t < 4 else 4
        # singular values beyond the expected rank are float32 rounding of the weights: ~1e-7 of the largest
        assert (sv[expected_rank:] < 1e-6 * sv[0]).all() and (sv[:expected_rank] > 1e-3 * sv[0]).all(), (t, sv)
    assert (ts[1].detach().double() != start[1]).all()


def test_subzero_updates_of_a_window_lie_in_its_two_sided_subspace():
    # ν = 4, r = 2: the 4 updates of a window move each low-rank matrix (the 12×9 one and the 3-d weight seen as
    # 6×6) inside span(U_w) ⊗ span(V_w) — U_w, V_w computed here from the window's first seed — so the
    # projection residual Δ − P_U Δ P_V is rounding only and Δ has rank ≤ r; the next window's increment is
    # off the previous window's subspace (a random r²-dim subspace of 108 or 36 keeps ‖P Δ‖² ≈ r⁴/(n0·n1)·‖Δ‖²).
    ts, target = _tensors(2), _target()
    nu = 4
    opt = zo_optim.MeZO(ts, lr=0.02, seed=3, lowrank_rank=RANK, lowrank_interval=nu, lowrank_kind="subzero")
    snaps, window_seeds = [[x.detach().double().clone() for x in ts]], []
    for t in range(2 * nu):
        if t % nu == 0:
            window_seeds.append(opt.current_seed)
        with torch.no_grad():
            opt.step(lambda: _loss(ts, target))
        if (t + 1) % nu == 0:
            snaps.append([x.detach().double().clone() for x in ts])
    for i in (0, 3):
        rows = SHAPES[i][0]
        # float32 weights: each of the 3 writes per step rounds an entry by ≤ ½ ulp(max|θ|); over ν steps
        # the Frobenius norm of that rounding is ≤ 3ν · ½ulp · √numel — the bound on any residual below
        ulp = max(float(torch.finfo(torch.float32).eps) * float(s[i].abs().max()) for s in snaps)
        bound = 3 * nu * ulp / 2 * math.sqrt(ts[i].numel())
        subspaces = [_factors(i, SHAPES[i], ws) for ws in window_seeds]
        for w in range(2):
            delta = (snaps[w + 1][i] - snaps[w][i]).reshape(rows, -1)
            U, V = subspaces[w]
            assert float(torch.linalg.norm(delta - U @ (U.T @ delta @ V) @ V.T)) < bound, (i, w)
            assert float(torch.linalg.svdvals(delta)[RANK]) < bound  # rank ≤ r: row and column spaces r-dim
            assert float(torch.linalg.norm(delta)) > 1e3 * bound  # the updates are far above that rounding
            U, V = subspaces[1 - w]  # the other window's subspace: most of Δ is off it
            assert float(torch.linalg.norm(delta - U @ (U.T @ delta @ V) @ V.T)) > 0.5 * float(torch.linalg.norm(delta))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resume_mid_window_is_bit_exact(kind):
    def fresh():
        ts = _tensors(3)
        return ts, zo_optim.MeZO(ts, lr=0.02, seed=7, momentum=0.9, lowrank_rank=RANK, lowrank_interval=3,
                                 lowrank_kind=kind)

    target = _target()
    ts, opt = fresh()
    for _ in range(4):  # mid-window: window 1 started at step 3
        with torch.no_grad():
            opt.step(lambda: _loss(ts, target))
    saved_w, saved = [x.detach().clone() for x in ts], copy.deepcopy(opt.state_dict())
    assert saved["zo"]["settings"] == {"lowrank_rank": RANK, "lowrank_interval": 3, "lowrank_kind": kind}
    assert saved["zo"]["runtime"]["lowrank_window"][0] == 1
    for _ in range(4):
        with torch.no_grad():
            opt.step(lambda: _loss(ts, target))
    ts2 = run_resumed(fresh, saved_w, saved, 4, lambda xs: _loss(xs, target))
    assert all(torch.equal(a, b) for a, b in zip(ts, ts2, strict=True))
    # and a resume that lost the window's seed (the runtime entry dropped) does not reproduce the run: the test
    # above can tell a resume in the right subspace from one in another
    lost = copy.deepcopy(saved)
    lost["zo"]["runtime"]["lowrank_window"] = [1, 12345]
    ts3 = run_resumed(fresh, saved_w, lost, 4, lambda xs: _loss(xs, target))
    assert not torch.equal(ts[0], ts3[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_apply_update_replays_lowrank_steps_bit_for_bit(backend, kind):
    # a prober measures (seed, g) on its own copy; two replicas only apply them; the prober follows the first
    # replica (weights and state, so it probes in the window's subspace). 7 steps with ν = 3 cross two windows.
    target = _target()
    prober_ts, a_ts, b_ts = _tensors(), _tensors(), _tensors()

    def make(ts, b=backend):
        return zo_optim.MeZO(ts, lr=1e-3, seed=3, lowrank_rank=RANK, lowrank_interval=3, lowrank_kind=kind, backend=b)

    prober, a, b = make(prober_ts), make(a_ts), make(b_ts, "reference")
    start = [x.detach().clone() for x in a_ts]
    for _ in range(7):
        with torch.no_grad():
            prober.estimate(lambda: _loss(prober_ts, target), seed=a.current_seed)
        seed, g, _ = prober.take_estimate()
        for r in (a, b):
            r.apply_update(seed, g)
        with torch.no_grad():
            for p, q in zip(prober_ts, a_ts, strict=True):
                p.copy_(q)
        prober.load_state_dict(copy.deepcopy(a.state_dict()))
    # the backend does not matter: every backend runs the same plain-torch passes
    assert all(torch.equal(x, y) for x, y in zip(a_ts, b_ts, strict=True))
    assert all(not torch.equal(x, s) for x, s in zip(a_ts, start, strict=True))
    assert _loss(a_ts, target) < _loss(start, target)


@pytest.mark.parametrize("kind", KINDS)
def test_federated_clients_equal_a_scalar_only_replay(kind):
    # the MLP's two weight matrices (8×16, 16×8) get rank-2 directions; 3 rounds of τ = 2 with ν = 3 cross windows
    def opt_fn(m):
        return zo_optim.MeZO(m.parameters(), lr=0.05, lowrank_rank=RANK, lowrank_interval=3, lowrank_kind=kind)

    replayed = clients_match_a_scalar_only_replay(opt_fn, tau=2, rounds=3)
    assert not all(torch.equal(p, q) for p, q in zip(replayed.parameters(), mlp_fn().parameters(), strict=True))


def test_bad_settings_fail_before_any_write():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="Invalid lowrank_rank"):
            zo_optim.MeZO(_tensors(), lowrank_rank=bad)
        with pytest.raises(ValueError, match="Invalid lowrank_interval"):
            zo_optim.MeZO(_tensors(), lowrank_rank=2, lowrank_interval=bad)
    for bad in ("SubZero", "lora", None, 1):
        with pytest.raises(ValueError, match="Invalid lowrank_kind"):
            zo_optim.MeZO(_tensors(), lowrank_rank=2, lowrank_kind=bad)
    with pytest.raises(ValueError, match="'subzero' needs lowrank_rank"):  # a kind alone would run the dense z
        zo_optim.MeZO(_tensors(), lowrank_kind="subzero")
    with pytest.raises(ValueError, match="cannot be combined"):
        zo_optim.MeZO(_tensors(), lowrank_rank=2, lowrank_kind="subzero", sparse_density=0.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        zo_optim.MeZO(_tensors(), lowrank_rank=2, sparse_density=0.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        zo_optim.MeZO([{"params": _tensors()[:2]}, {"params": _tensors()[2:]}], lowrank_rank=2, block_probes=True)
    half = torch.randn(8, 8, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match=r"lowrank_rank: trainable parameter 0 is torch\.bfloat16"):
        zo_optim.MeZO([half], lowrank_rank=2)
    # a weight reassigned to bfloat16 after construction: refused at the step, weights untouched
    for kind in KINDS:
        t = torch.randn(8, 8, requires_grad=True)
        opt = zo_optim.MeZO([t], lowrank_rank=2, lowrank_kind=kind)
        t.data = t.data.to(torch.bfloat16)
        before = t.detach().clone()
        with pytest.raises(ValueError, match="lowrank_rank"), torch.no_grad():
            opt.step(lambda: (t.float() ** 2).sum())  # noqa: B023 (called inside this iteration)
        assert torch.equal(t, before)
    # a corrupt window in a state dict is refused by load_state_dict
    opt = zo_optim.MeZO(_tensors(), lowrank_rank=2)
    sd = copy.deepcopy(opt.state_dict())
    sd["zo"]["runtime"]["lowrank_window"] = [-1, "x"]
    with pytest.raises(ValueError, match="lowrank_window"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("kind", KINDS)
def test_an_error_inside_the_update_of_a_tensor_leaves_it_restored_once(monkeypatch, kind):
    # q = 2: the update of each tensor builds 3 directions (2 for the sum, 1 for the fused restore). An error at
    # the 2nd direction of tensor 1 (out of memory, say) must come before any write to it: the pass engine then
    # restores that tensor exactly once, keeps tensor 0's update, and step() finishes the rest — bit-identical
    # to an error-free step. (Writing the restore first, as the plain path did, restored it twice: off by ε·u.)
    from zo_optim.optim._lowrank import LowRankPerturbation

    target = _target()

    def make():
        ts = _tensors(4)
        return ts, zo_optim.MeZO(ts, lr=0.01, seed=9, num_queries=2, lowrank_rank=RANK, lowrank_interval=3,
                                 lowrank_kind=kind)

    failed, clean = second_step_with_a_failed_direction(
        monkeypatch, make, lambda ts: _loss(ts, target), (LowRankPerturbation, "_lowrank_u"), tensor_id=1, nth=2,
        forwards=4)
    assert all(torch.equal(a, b) for a, b in zip(failed, clean, strict=True))
