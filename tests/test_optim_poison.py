"""Values that would poison the weights are refused before any write (issue 7, item 6 and Σ's floor)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import zo_optim
from backend_checks import backend_or_skip
from optim_infos import ALL, OPTIMIZERS, OptimizerInfo, ids, loss_closure, make_optimizer, tiny_data, tiny_model
from zo_optim import ops
from zo_optim.optim.base import ZO_EPS_RANGE

PRECOND = [i for i in OPTIMIZERS if i.cls.precond_buffer is not None]
NAN, INF = float("nan"), float("inf")


make = partial(make_optimizer, seed=3)  # inputs[0]; the values checked here were recorded with this seed


def snapshot(model, opt) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [
        v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    ]


def assert_unchanged(before: list[torch.Tensor], model, opt, t: int) -> None:
    after = snapshot(model, opt)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)
    assert opt.step_count == t and opt.pending_seed is None


def replay_kwargs(info: OptimizerInfo, q: int, value: float = 0.1) -> dict:
    return {k: [value] * q for k, req in info.cls.extra_scalars.items() if req}


# ---------------------------------------------------------------- apply_update


@ALL
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_apply_update_refuses_non_finite_scalars(info: OptimizerInfo, bad: float):
    model = tiny_model()
    opt = make(info, model)
    opt.step(loss_closure(model, *tiny_data()))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="non-finite projected_grads"):
        opt.apply_update(opt.current_seed, [bad], **replay_kwargs(info, 1))
    for name in replay_kwargs(info, 1):
        with pytest.raises(ValueError, match=f"non-finite {name}"):
            opt.apply_update(opt.current_seed, [0.5], **{**replay_kwargs(info, 1), name: [bad]})
    assert_unchanged(before, model, opt, 1)
    opt.apply_update(opt.current_seed, [0.5], **replay_kwargs(info, 1))  # finite scalars still apply
    assert opt.step_count == 2


def test_hizoo_apply_update_refuses_negative_curvature():
    model = tiny_model()
    opt = zo_optim.HiZOO(model.parameters(), lr=1e-2, hessian_smooth=0.1, backend="reference", seed=0)
    opt.step(loss_closure(model, *tiny_data()))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="negative curvature"):
        opt.apply_update(opt.current_seed, [0.5], curvature=[-1.0])
    assert_unchanged(before, model, opt, 1)


# ---------------------------------------------------------------- hyper-parameters changed after construction


@ALL
@pytest.mark.parametrize("key,value", [("lr", NAN), ("lr", INF), ("lr", -1.0), ("weight_decay", NAN)])
def test_bad_hyperparameter_set_later_is_refused_at_step_time(info: OptimizerInfo, key: str, value: float):
    model = tiny_model()
    opt = make(info, model)
    closure = loss_closure(model, *tiny_data())
    opt.step(closure)
    before = snapshot(model, opt)
    good = opt.param_groups[0][key] if key in opt.param_groups[0] else 0.0
    opt.param_groups[0][key] = value
    calls = [0]

    def counting():
        calls[0] += 1
        return closure()

    with pytest.raises(ValueError, match="Invalid"):
        opt.step(counting)
    assert calls[0] == 0  # refused before the first perturbation (and before any forward)
    with pytest.raises(ValueError, match="Invalid"):
        opt.apply_update(opt.current_seed, [0.5], **replay_kwargs(info, 1))
    assert_unchanged(before, model, opt, 1)
    # set between estimate() and step(): step() refuses and keeps the estimate for a retry
    opt.param_groups[0][key] = good
    opt.estimate(closure)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match="Invalid"):
        opt.step()
    assert opt.pending_seed == opt.current_seed and opt.step_count == 1
    opt.param_groups[0][key] = good
    opt.step()
    assert opt.step_count == 2 and all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- preconditioner edited by the user


@pytest.mark.parametrize("info", PRECOND, ids=ids(PRECOND))
@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF])
def test_bad_preconditioner_is_refused_before_the_first_pass(info: OptimizerInfo, bad: float):
    model = tiny_model()
    opt = make(info, model)
    closure = loss_closure(model, *tiny_data())
    opt.step(closure)
    p = list(model.parameters())[1]
    opt.state[p]["hessian"][2] = bad
    before = snapshot(model, opt)
    calls = [0]

    def counting():
        calls[0] += 1
        return closure()

    with pytest.raises(ValueError, match=r"trainable parameter 1 .* must be finite and > 0"):
        opt.step(counting)
    assert calls[0] == 0
    with pytest.raises(ValueError, match="must be finite and > 0"):
        opt.estimate(closure)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        opt.apply_update(opt.current_seed, [0.5], **replay_kwargs(info, 1))
    assert_unchanged(before, model, opt, 1)
    opt.state[p]["hessian"].fill_(1.0)
    opt.step(closure)
    assert opt.step_count == 2


# ---------------------------------------------------------------- non-finite losses never write NaN


@ALL
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_loss_at_any_probe_restores_finite_weights(info: OptimizerInfo, bad: float):
    model = tiny_model()
    opt = make(info, model, **({"hessian_smooth": 0.5} if info.cls is zo_optim.HiZOO else {}))
    closure = loss_closure(model, *tiny_data())
    opt.step(closure)  # the state buffers exist from the first step on
    for k in range(info.forwards_per_step):
        before = snapshot(model, opt)

        def poisoned(calls=[0], k=k):  # noqa: B006 (a per-probe counter)
            calls[0] += 1
            return closure() * bad if calls[0] == k + 1 else closure()

        opt.step(poisoned)
        after = snapshot(model, opt)
        assert opt.skipped_steps == k + 1
        for a, b in zip(after, before, strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0.0, atol=1e-6)


# ---------------------------------------------------------------- zo_eps range


@ALL
@pytest.mark.parametrize("eps", [1e30, 1e-50, 0.0, -1e-3, NAN, INF, 101.0, 1e-19])
def test_zo_eps_outside_the_range_is_refused(info: OptimizerInfo, eps: float):
    model = tiny_model()
    with pytest.raises(ValueError, match="Invalid zo_eps"):
        make(info, model, zo_eps=eps)
    opt = make(info, model)
    with pytest.raises(ValueError, match="Invalid zo_eps"):
        opt.zo_eps = eps  # a later change is validated too
    assert opt.zo_eps == info.inputs[0].get("zo_eps", 1e-3)


@ALL
@pytest.mark.parametrize("eps", list(ZO_EPS_RANGE))
def test_zo_eps_at_the_ends_of_the_range_works(info: OptimizerInfo, eps: float):
    model = tiny_model(dtype=torch.float64)
    opt = make(info, model, zo_eps=eps)
    opt.step(loss_closure(model, *tiny_data()))
    assert opt.step_count == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    opt.zo_eps = 1e-3
    assert opt.state_dict()["zo"]["zo_eps"] == 1e-3


# ---------------------------------------------------------------- HiZOO's Σ floor


def test_hizoo_sigma_floor_keeps_the_round_trip_exact_on_a_flat_loss():
    """α = 0.5 on a flat loss: Σ halves every step. Unbounded, the ±εu round trip drifted 0.025 in 56 steps."""
    w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 257))
    start = w.detach().clone()
    opt = zo_optim.HiZOO([w], lr=0.0, hessian_smooth=0.5, backend="reference", seed=9)
    for _ in range(80):
        opt.step(lambda: torch.zeros((), dtype=torch.float64) + 1.0)  # flat: h = 0 and g = 0
    sigma = opt.state[w]["hessian"]
    assert float(sigma.min()) == pytest.approx(opt.hessian_min)
    # lr = 0: only the round trips move the weights; |εu| <= 1e-3 * 100 * |z|, a few ulp of that per step.
    # Measured: 8 float32 ulp of 1.0 after 80 steps (unbounded: 5e8 ulp, the weights moved by 63)
    assert float((w.detach() - start).abs().max()) <= 16 * torch.finfo(torch.float32).eps


def test_hessian_min_is_validated():
    p = torch.nn.Parameter(torch.ones(3))
    for cls in (zo_optim.HiZOO, zo_optim.HiSo):
        for bad in (0.0, -1.0, 2.0, NAN):
            with pytest.raises(ValueError, match="Invalid hessian_min"):
                cls([p], hessian_min=bad)
    with pytest.raises(ValueError, match="Invalid precond_min"):
        ops.precond_sgd_update_([torch.ones(3)], [0], 1, torch.ones(1), lr=0.1, precond=[torch.ones(3)],
                                rule="hiso", update_precond=True, precond_decay=0.9, precond_rate=0.1,
                                precond_min=INF, backend="reference")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("rule", ["hizoo", "hiso"])
def test_precond_clamp_matches_the_reference(backend: str, rule: str):
    """The clamp of P to [precond_min, float32 max] is the same on every backend (floor, ceiling, in between)."""
    backend_or_skip(backend)
    g = torch.Generator().manual_seed(0)
    n = 300
    theta = torch.randn(n, generator=g)
    precond = torch.exp(torch.randn(n, generator=g) * 3.0)
    precond[:5] = 3.0e38  # overflows to inf without the ceiling
    coeffs = torch.tensor([0.3, -0.2])
    outs = {}
    for name in ("reference", backend):
        th, pc = theta.clone(), precond.clone()
        ops.precond_sgd_update_(
            [th], [4], 11, coeffs, lr=0.01, precond=[pc], rule=rule, update_precond=True,
            precond_decay=2.0, precond_rate=0.9,  # 2·3e38 overflows
            precond_coeffs=torch.tensor([1e3, 0.0]) if rule == "hizoo" else None,
            hessian_eps=0.0, precond_min=0.05, restore_scale=-1e-3, restore_query=1, backend=name,
        )
        outs[name] = (th, pc)
    (th_r, pc_r), (th_b, pc_b) = outs["reference"], outs[backend]
    assert float(pc_r.min()) == pytest.approx(0.05) and torch.isfinite(pc_r).all()
    assert float(pc_r.max()) == torch.finfo(torch.float32).max
    torch.testing.assert_close(pc_b, pc_r, rtol=2e-6, atol=0.0)
    torch.testing.assert_close(th_b, th_r, rtol=2e-6, atol=1e-7)
