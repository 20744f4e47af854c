"""Each optimizer's update rule against the math of its docstring, computed by hand from the RNG contract.

Runs in ``perturbation="transient"`` mode so the probes see exactly θ ± εu (no
in-place round-trip error) and the recorded scalars are exact.
"""

from __future__ import annotations

import math

import pytest
import torch

import zo_optim
from zo_optim import rng

LR, EPS = 1e-2, 1e-3


class Quad(torch.nn.Module):
    """A separable quadratic in one module, with per-example losses available."""

    def __init__(self, d: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(d, generator=g))
        self.b = torch.nn.Parameter(torch.randn(3, generator=g))
        self.targets = torch.randn(4, d, generator=g)

    def forward(self) -> torch.Tensor:  # [4] per-example losses
        return ((self.w - self.targets) ** 2).sum(dim=1) * torch.linspace(0.5, 2.0, 4) + self.b.pow(2).sum()


def z(seed: int, tid: int, p: torch.Tensor, k: int = 0) -> torch.Tensor:
    return rng.normal(seed, tid, p.numel(), k).reshape(p.shape)


def loss_at(model: Quad, deltas: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        saved = [p.detach().clone() for p in model.parameters()]
        for p, d in zip(model.parameters(), deltas, strict=True):
            p.add_(d)
        out = model()
        for p, s in zip(model.parameters(), saved, strict=True):
            p.copy_(s)
    return out


def test_mezo_step_matches_the_formula():
    model = Quad()
    opt = zo_optim.MeZO(model.parameters(), lr=LR, zo_eps=EPS, seed=3, backend="reference", module=model)
    theta = [p.detach().clone() for p in model.parameters()]
    s = rng.step_seed(3, 0)
    zs = [z(s, i, p) for i, p in enumerate(theta)]
    g = (loss_at(model, [EPS * zz for zz in zs]).mean() - loss_at(model, [-EPS * zz for zz in zs]).mean()) / (2 * EPS)
    opt.step(lambda: model().mean())
    torch.testing.assert_close(opt.last_projected_grads, g.reshape(1), rtol=1e-4, atol=1e-4)
    for p, t0, zz in zip(model.parameters(), theta, zs, strict=True):
        torch.testing.assert_close(p.detach(), t0 - LR * g * zz, rtol=1e-5, atol=1e-6)


def test_forward_estimator_and_multiple_queries():
    model = Quad()
    opt = zo_optim.MeZO(model.parameters(), lr=LR, zo_eps=EPS, seed=4, backend="reference", module=model,
                        estimator="forward", num_queries=3)
    theta = [p.detach().clone() for p in model.parameters()]
    s = rng.step_seed(4, 0)
    l0 = model().mean()
    gs = []
    for k in range(3):
        zs = [z(s, i, p, k) for i, p in enumerate(theta)]
        gs.append((loss_at(model, [EPS * zz for zz in zs]).mean() - l0) / EPS)
    opt.step(lambda: model().mean())
    torch.testing.assert_close(opt.last_projected_grads, torch.stack(gs), rtol=1e-4, atol=1e-4)
    for i, (p, t0) in enumerate(zip(model.parameters(), theta, strict=True)):
        ghat = sum(gs[k] * z(s, i, t0, k) for k in range(3)) / 3
        torch.testing.assert_close(p.detach(), t0 - LR * ghat, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("estimator", "q", "passes"), [("central", 1, 2), ("central", 2, 5), ("forward", 2, 3)])
def test_inplace_pass_schedule(estimator, q, passes):
    """Explicit perturbation passes per step; the last restore is fused into the update (3q or 2q in all)."""
    model = Quad()
    opt = zo_optim.MeZO(model.parameters(), lr=LR, seed=0, backend="reference", estimator=estimator, num_queries=q)
    opt.step(lambda: model().mean())
    assert opt._inplace.passes == passes


def test_zo_adam_first_step_is_sign_like():
    model = Quad()
    opt = zo_optim.ZOAdam(model.parameters(), lr=LR, zo_eps=EPS, seed=5, backend="reference", module=model)
    theta = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: model().mean())
    g = opt.last_projected_grads[0]
    s = rng.step_seed(5, 0)
    for i, (p, t0) in enumerate(zip(model.parameters(), theta, strict=True)):
        ghat = g * z(s, i, t0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * ghat)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], 0.001 * ghat * ghat)
        # bias-corrected m/sqrt(v) = sign(ĝ) when |ĝ| >> eps
        torch.testing.assert_close(p.detach(), t0 - LR * torch.sign(ghat), rtol=1e-4, atol=1e-5)


def test_hizoo_sigma_update_and_gradient_use_the_old_sigma():
    model = Quad()
    alpha = 0.5
    opt = zo_optim.HiZOO(model.parameters(), lr=LR, zo_eps=EPS, hessian_smooth=alpha, seed=6, backend="reference",
                         module=model)
    params = list(model.parameters())
    closure = lambda: model().mean()
    # step 1: Σ0 = 1, so u = z
    opt.step(closure)
    s0 = rng.step_seed(6, 0)
    h0 = opt.last_extra_scalars["curvature"][0]
    sigma1 = [(1 - alpha) * 1.0 + alpha * h0 * z(s0, i, p) ** 2 for i, p in enumerate(params)]
    for p, sig in zip(params, sigma1, strict=True):
        torch.testing.assert_close(opt.state[p]["hessian"], sig, rtol=1e-5, atol=1e-6)
    # step 2: the perturbation and the gradient both use Σ1 (the Σ before this step's update)
    theta1 = [p.detach().clone() for p in params]
    s1 = rng.step_seed(6, 1)
    us = [z(s1, i, p) / sig.sqrt() for i, (p, sig) in enumerate(zip(params, sigma1, strict=True))]
    lp, lm, l0 = (loss_at(model, [EPS * u for u in us]).mean(), loss_at(model, [-EPS * u for u in us]).mean(),
                  model().mean())
    opt.step(closure)
    g = opt.last_projected_grads[0]
    torch.testing.assert_close(g, (lp - lm) / (2 * EPS), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(opt.last_extra_scalars["curvature"][0], (lp + lm - 2 * l0).abs() / (2 * EPS**2),
                               rtol=2e-2, atol=1e-2)
    for p, t1, u in zip(params, theta1, us, strict=True):
        torch.testing.assert_close(p.detach(), t1 - LR * g * u, rtol=1e-5, atol=1e-6)


def test_helene_annealing_agnb_and_hessian_interval():
    model = Quad()
    beta1, beta2, T, k, lam = 0.9, 0.99, 50.0, 2, 1.0
    opt = zo_optim.HELENE(model.named_parameters(), lr=LR, zo_eps=EPS, betas=(beta1, beta2), anneal_T=T,
                          hessian_interval=k, clip_lambda=lam, seed=7, backend="reference", module=model)
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    opt.step(model)  # per-example losses [4]
    s0 = rng.step_seed(7, 0)
    g = opt.last_projected_grads[0]
    sq = opt.last_extra_scalars["sq_grad_sum"][0]
    alpha1 = beta1 + (1 - beta1) * math.exp(-1 / T)  # t counts from 1
    for i, (p, t0) in enumerate(zip(params, theta0, strict=True)):
        zz = z(s0, i, p)
        m = alpha1 * g * zz
        h = (1 - beta2) * sq * zz * zz  # A-GNB: (Σ_b g_b²)·z⊙z
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["hessian"], h, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.detach(), t0 - LR * m / (torch.clamp(h, min=lam) + 1e-8), rtol=1e-5, atol=1e-6)
    h1 = [opt.state[p]["hessian"].clone() for p in params]
    opt.step(model)  # t = 2: no Hessian refresh (t mod k = 1 only at t = 1, 3, ...)
    for p, h in zip(params, h1, strict=True):
        assert torch.equal(opt.state[p]["hessian"], h)
    opt.step(lambda: model().mean())  # t = 3: refresh; scalar loss → ĥ = ĝ⊙ĝ
    assert not opt.last_extra_scalars
    s2 = rng.step_seed(7, 2)
    g3 = opt.last_projected_grads[0]
    for i, (p, h) in enumerate(zip(params, h1, strict=True)):
        ghat = g3 * z(s2, i, p)
        torch.testing.assert_close(opt.state[p]["hessian"], beta2 * h + (1 - beta2) * ghat * ghat, rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.parametrize("lam", [1e-3, 5.0], ids=["h_above_lambda", "clamp_acts"])
def test_helene_hessian_bias_correction_option(lam: float):
    """Opt-in: the update uses h / (1 - β2^n) (n = Hessian refreshes so far); h itself is stored uncorrected.

    λ = 5 makes the clamp act (h/c < λ somewhere), so λ·c must be scaled as well as γ/c.
    """
    beta2, k = 0.99, 2
    plain_model, corr_model = Quad(), Quad()
    corr_model.load_state_dict(plain_model.state_dict())
    kwargs = dict(lr=LR, zo_eps=EPS, betas=(0.9, beta2), hessian_interval=k, clip_lambda=lam, seed=3,
                  backend="reference")
    plain = zo_optim.HELENE(plain_model.parameters(), **kwargs)
    corr = zo_optim.HELENE(corr_model.parameters(), hessian_bias_correction=True, **kwargs)
    assert corr.state_dict()["param_groups"][0]["hessian_bias_correction"] is True
    for step in range(1, 4):
        before = [p.detach().clone() for p in corr_model.parameters()]
        plain.step(lambda: plain_model().mean())
        corr.step(lambda: corr_model().mean())
        c = 1 - beta2 ** ((step - 1) // k + 1)
        for p, q, b in zip(plain_model.parameters(), corr_model.parameters(), before, strict=True):
            torch.testing.assert_close(corr.state[q]["hessian"], plain.state[p]["hessian"], rtol=1e-5, atol=1e-9)
            m, h = corr.state[q]["exp_avg"], corr.state[q]["hessian"]
            expected = b - LR * m / (torch.clamp(h / c, min=lam) + 1e-8)
            torch.testing.assert_close(q.detach(), expected, rtol=1e-5, atol=1e-6)
        plain_model.load_state_dict(corr_model.state_dict())  # same starting point for the next step


def test_helene_clip_lambda_callable_and_dim_mode():
    model = Quad()
    opt = zo_optim.HELENE(model.named_parameters(), clip_lambda=lambda name, p: 4.0 if name == "w" else 9.0,
                          lambda_mode="dim", backend="reference", seed=0)
    group = opt.param_groups[0]
    assert opt.clip_values(group, group["params"]) == [4.0 / math.sqrt(6), 9.0 / math.sqrt(3)]
    opt2 = zo_optim.HELENE(model.parameters(), clip_lambda=2.0, backend="reference", seed=0)
    assert opt2.clip_values(opt2.param_groups[0], list(model.parameters())) == [2.0, 2.0]
    assert "clip_lambda" in opt.state_dict()["param_groups"][0]  # the callable stays out of the state dict
    assert opt.state_dict()["param_groups"][0]["clip_lambda"] is None


def test_hiso_preconditioner_frozen_between_updates():
    model = Quad()
    beta, eps_h = 0.95, 1e-8
    opt = zo_optim.HiSo(model.parameters(), lr=LR, zo_eps=EPS, num_queries=2, beta=beta, hessian_eps=eps_h,
                        k_interval=2, seed=8, backend="reference", module=model)
    params = list(model.parameters())
    closure = lambda: model().mean()
    opt.step(closure)  # step 1: K stays 1
    for p in params:
        assert torch.equal(opt.state[p]["hessian"], torch.ones_like(p))
    theta1 = [p.detach().clone() for p in params]
    opt.step(closure)  # step 2: update with u = z/√K (K = 1), then K ← βK + (1−β)(ĝ² + ε_H)
    s1 = rng.step_seed(8, 1)
    g = opt.last_projected_grads
    for i, (p, t1) in enumerate(zip(params, theta1, strict=True)):
        ghat = (g[0] * z(s1, i, p, 0) + g[1] * z(s1, i, p, 1)) / 2
        torch.testing.assert_close(p.detach(), t1 - LR * ghat, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["hessian"], beta + (1 - beta) * (ghat * ghat + eps_h))
    opt.freeze_precond = True
    k2 = [opt.state[p]["hessian"].clone() for p in params]
    opt.step(closure)
    opt.step(closure)
    for p, k in zip(params, k2, strict=True):
        assert torch.equal(opt.state[p]["hessian"], k)


def test_helene_sq_grad_sum_does_not_depend_on_the_micro_batch_split():
    """Σ_b g_b² runs over the whole batch: 2 micro-batches of 2 give the h of one batch of 4.

    (rtol 1e-3: the float32 finite differences of half-batch means round differently; averaging
    the sums instead, the bug this guards against, is off by 2×.)
    """
    whole_model, split_model = Quad(), Quad()
    kwargs = dict(lr=LR, zo_eps=EPS, hessian_interval=1, seed=5, backend="reference")
    whole = zo_optim.HELENE(whole_model.parameters(), module=whole_model, **kwargs)
    split = zo_optim.HELENE(split_model.parameters(), module=split_model, **kwargs)
    for _ in range(2):
        whole.step(whole_model)
        split.estimate(lambda: split_model()[:2])
        split.estimate(lambda: split_model()[2:])
        split.step()
        torch.testing.assert_close(split.last_projected_grads, whole.last_projected_grads, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(split.last_extra_scalars["sq_grad_sum"], whole.last_extra_scalars["sq_grad_sum"],
                                   rtol=1e-3, atol=1e-5)
    for p, q in zip(whole_model.parameters(), split_model.parameters(), strict=True):
        torch.testing.assert_close(split.state[q]["hessian"], whole.state[p]["hessian"], rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-3, atol=1e-5)


def test_helene_invalid_clip_value_fails_before_any_pass():
    """λ of every group is evaluated before the first perturbation, so a bad one leaves all weights untouched."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named[:2]], "param_names": [n for n, _ in named[:2]]},
              {"params": [p for _, p in named[2:]], "param_names": [n for n, _ in named[2:]]}]
    opt = zo_optim.HELENE(groups, lr=0.0, clip_lambda=lambda name, p: -1.0 if name.startswith("2.") else 1.0,
                          backend="reference", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"Invalid clip_lambda for '2\.weight'"):
        opt.step(lambda: model(x).square().mean())
    for a, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, p.detach())


def test_hiso_directions_are_z_over_sqrt_k():
    """With K ≠ 1 the probes and the update both use u = z / √K (K the preconditioner before the update)."""
    model = Quad()
    opt = zo_optim.HiSo(model.parameters(), lr=LR, zo_eps=EPS, num_queries=2, k_interval=1, seed=9,
                        backend="reference", module=model)
    opt.state_bytes()  # creates K
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        opt.state[p]["hessian"].copy_(torch.rand(p.shape, generator=g) * 3 + 0.25)
    ks = [opt.state[p]["hessian"].clone() for p in model.parameters()]
    theta = [p.detach().clone() for p in model.parameters()]
    s = rng.step_seed(9, 0)
    us = [[z(s, i, t, k) / kk.sqrt() for i, (t, kk) in enumerate(zip(theta, ks, strict=True))] for k in range(2)]
    l0 = model().mean()
    gs = torch.stack([(loss_at(model, [EPS * u for u in us[k]]).mean() - l0) / EPS for k in range(2)])
    opt.step(lambda: model().mean())
    torch.testing.assert_close(opt.last_projected_grads, gs, rtol=1e-4, atol=1e-4)
    for i, (p, t0) in enumerate(zip(model.parameters(), theta, strict=True)):
        ghat = (gs[0] * us[0][i] + gs[1] * us[1][i]) / 2
        torch.testing.assert_close(p.detach(), t0 - LR * ghat, rtol=1e-4, atol=1e-5)


def test_hiso_freeze_precond_survives_a_resume():
    model = Quad()
    opt = zo_optim.HiSo(model.parameters(), lr=LR, zo_eps=EPS, seed=8, backend="reference", module=model)
    closure = lambda: model().mean()
    opt.step(closure)
    opt.freeze_precond = True
    sd = opt.state_dict()
    assert sd["zo"]["runtime"] == {"freeze_precond": True}
    assert sd["zo"]["settings"] == {"k_interval": 1, "hessian_min": 1e-10}
    model_b = Quad()
    model_b.load_state_dict(model.state_dict())
    opt_b = zo_optim.HiSo(model_b.parameters(), lr=LR, zo_eps=EPS, seed=0, backend="reference", module=model_b)
    opt_b.load_state_dict(sd)
    assert opt_b.freeze_precond
    for o, m in ((opt, model), (opt_b, model_b)):
        o.step(lambda m=m: m().mean())
    for p, q in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["hessian"], opt_b.state[q]["hessian"])
