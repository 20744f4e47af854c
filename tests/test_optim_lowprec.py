"""Low-precision weights: drift of the in-place ±ε round trip, the transient mode, stochastic rounding.

``python tests/test_optim_lowprec.py`` prints the drift table quoted in docs/optimizers.md.
"""

from __future__ import annotations

import pytest
import torch

import zo_optim
from optim_infos import OPTIMIZERS, ids

EPS = 1e-3


def _model(dtype: torch.dtype, seed: int = 0, width: int = 32) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # LLM-like weight scale
    return model.to(dtype)


def _closure(model: torch.nn.Module, width: int = 32):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, width, generator=g), torch.randn(8, 4, generator=g)

    def closure() -> torch.Tensor:
        return ((model(x.to(next(model.parameters()).dtype)).float() - y) ** 2).mean()

    return closure


def measure_drift(dtype: torch.dtype, perturbation: str, rounding: str, steps: int) -> dict[str, float]:
    """Run MeZO with lr = 0 and report how far the stored weights moved (fp32 arithmetic on the result)."""
    model = _model(dtype)
    before = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    opt = zo_optim.MeZO(model.parameters(), lr=0.0, zo_eps=EPS, seed=3, backend="reference",
                        perturbation=perturbation, rounding=rounding,
                        module=model if perturbation == "transient" else None)
    closure = _closure(model)
    for _ in range(steps):
        opt.step(closure)
    after = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    delta = after - before
    return {
        "rms_drift": delta.pow(2).mean().sqrt().item(),
        "mean_drift": delta.mean().item(),
        "max_drift": delta.abs().max().item(),
        "changed_fraction": (delta != 0).float().mean().item(),
        "delta": delta,
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_inplace_round_trip_drifts_in_low_precision(dtype):
    """The problem the transient mode solves: with lr = 0 the in-place round trip still moves the weights."""
    steps = 10
    d = measure_drift(dtype, "inplace", "nearest", steps=steps)
    assert d["changed_fraction"] > 0.0
    assert d["max_drift"] > 0.0
    # ... but only by rounding: each step's 3 passes (+ε, −2ε, +ε fused into the update) each round once to
    # nearest, by at most ½ spacing of the dtype at the value's size, which stays below M = |θ| + 6ε (|z| < 6:
    # a Gaussian beyond 6σ has probability 2e-9); spacing there ≤ 2^(⌊log2 M⌋ − mantissa bits). So every
    # weight moves at most steps·3·½ of that. A restore that is skipped or wrong leaves ε·|z| ≈ 1e-3 per step,
    # hundreds of spacings of the small weights.
    theta = torch.cat([p.detach().float().reshape(-1) for p in _model(dtype).parameters()])
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    spacing = torch.exp2(torch.floor(torch.log2(theta.abs() + 6 * EPS)) - mantissa)
    assert (d["delta"].abs() <= steps * 3 * 0.5 * spacing).all(), (d["delta"].abs() / spacing).max()


def test_inplace_round_trip_is_tight_in_fp32():
    d = measure_drift(torch.float32, "inplace", "nearest", steps=10)
    assert d["max_drift"] < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_transient_mode_keeps_bf16_weights_bit_identical_for_100_steps(info):
    model = _model(torch.bfloat16, width=8)
    before = [p.detach().clone() for p in model.parameters()]
    opt = info.cls(model.parameters(), **{**info.inputs[0], "lr": 0.0, "backend": "reference", "seed": 5},
                   perturbation="transient")
    opt.attach(model)
    closure = _closure(model, width=8)
    for _ in range(100):
        opt.step(closure)
    assert opt.skipped_steps == 0
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    # the forwards did see perturbed weights (the estimate is not zero)
    assert opt.last_projected_grads.abs().sum() > 0


def test_transient_hooks_perturb_one_module_at_a_time():
    model = _model(torch.bfloat16)
    opt = zo_optim.MeZO(model.parameters(), lr=0.0, backend="reference", seed=0, module=model)
    seen = []

    def spy(mod, args, out):
        # inside the step, while the second Linear runs, the first is already restored
        seen.append(torch.equal(model[0].weight, ref0))

    ref0 = model[0].weight.detach().clone()
    handle = model[2].register_forward_hook(spy)
    opt.step(_closure(model))
    handle.remove()
    assert seen and all(seen)
    assert opt.perturbation == "transient"
    opt.detach()
    assert opt.perturbation == "inplace"


def test_attach_refuses_a_model_that_does_not_own_the_params():
    model = _model(torch.float32)
    other = _model(torch.float32)
    opt = zo_optim.MeZO(model.parameters(), backend="reference", seed=0)
    with pytest.raises(ValueError, match="not registered"):
        opt.attach(other)
    transient = zo_optim.MeZO(model.parameters(), backend="reference", seed=0, perturbation="transient")
    with pytest.raises(RuntimeError, match="attach"):
        transient.step(_closure(model))


def test_update_uses_stochastic_rounding_for_bf16():
    """An update below half an ulp vanishes with nearest rounding; stochastic rounding keeps it on average."""
    results = {}
    for rounding in ("nearest", "stochastic"):
        model = _model(torch.bfloat16, width=64)
        w_fp32 = [p.detach().float() for p in model.parameters()]
        opt = zo_optim.MeZO(model.parameters(), lr=1e-7, backend="reference", seed=11, rounding=rounding, module=model)
        opt.step(_closure(model, width=64))
        # the exact update in fp32, replayed on fp32 copies of the same weights
        ref = [torch.nn.Parameter(w.clone()) for w in w_fp32]
        ref_opt = zo_optim.MeZO(ref, lr=1e-7, backend="reference", seed=11)
        ref_opt.apply_update(zo_optim.rng.step_seed(11, 0), opt.last_projected_grads)
        exact = torch.cat([(r.detach() - w).reshape(-1) for r, w in zip(ref, w_fp32, strict=True)])
        got = torch.cat([(p.detach().float() - w).reshape(-1) for p, w in zip(model.parameters(), w_fp32,
                                                                                strict=True)])
        results[rounding] = (exact, got)
    exact, got = results["nearest"]
    assert exact.abs().max() > 0 and got.abs().max() == 0  # the update is lost
    exact, got = results["stochastic"]
    changed = got != 0
    assert changed.any()
    # Each weight w + δ (δ = the exact update, below one bf16 ulp here) must land on one of its two bf16
    # neighbours: w itself or the next bf16 value towards δ, gap g away. Unbiased stochastic rounding takes
    # the far one with probability p = |δ|/g, so with s = sign(δ), s·(got − δ) has mean 0 and variance
    # p(1−p)g² = |δ|(g − |δ|), independently per weight. S = Σ s·(got − δ) is then within 6 standard
    # deviations of 0 (Chebyshev: probability ≥ 1 − 1/36 for any distribution; ~1e-9 for a normal sum).
    # A fair coin that ignores the fraction moves half the weights by g: S ≈ Σ (g/2 − |δ|), hundreds of
    # standard deviations here (all n weights count, not only the few that change).
    w = torch.cat([p.detach().reshape(-1) for p in _model(torch.bfloat16, width=64).parameters()])
    assert (w != 0).all()
    bits = w.view(torch.int16).to(torch.int32)
    sign = torch.sign(exact).to(torch.int32)
    towards = torch.where(w.float() > 0, sign, -sign)  # +1 in the bit pattern moves away from 0
    neighbour = (bits + towards).to(torch.int16).view(torch.bfloat16).float()
    gap = (neighbour - w.float()).abs()
    # (δ is the float32 w + δ − w the op rounds from: it can be 0, and then so must the change be)
    assert (got[exact == 0] == 0).all()
    assert (exact.abs() < gap)[exact != 0].all()  # below one ulp: each weight has exactly these two candidates
    assert ((got == 0) | (got == neighbour - w.float())).all()
    s = torch.sign(exact)
    stat = (s * (got - exact)).sum(dtype=torch.float64)
    sd = (exact.abs() * (gap - exact.abs())).sum(dtype=torch.float64).sqrt()
    assert stat.abs() <= 6 * sd, (stat.item(), sd.item(), int(changed.sum()))


if __name__ == "__main__":
    print(f"drift after 100 steps of MeZO with lr = 0, zo_eps = {EPS}, weights ~ N(0, 0.05^2), 1188 params")
    print(f"{'dtype':10} {'mode':10} {'rounding':11} {'rms':>10} {'mean':>11} {'max':>10} {'changed':>8}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for mode, rounding in (("inplace", "nearest"), ("inplace", "stochastic"), ("transient", "stochastic")):
            d = measure_drift(dtype, mode, rounding, steps=100)
            print(f"{str(dtype)[6:]:10} {mode:10} {rounding:11} {d['rms_drift']:10.2e} {d['mean_drift']:11.2e} "
                  f"{d['max_drift']:10.2e} {d['changed_fraction']:8.3f}")
