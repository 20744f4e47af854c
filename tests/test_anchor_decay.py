"""``anchor_decay`` (optim/_anchor.py): θ ← θ + lr·λ_a(θ_a − θ) after each unit's update, for every optimizer.

The expected weights come from the same optimizer without the option followed by a decay written here in plain
torch (θ − a(θ − θ_0), θ_0 the weights at construction), never from the option's own code.
"""

from __future__ import annotations

import copy
import io
import math
import re
from functools import partial

import pytest
import torch

import zo_optim
from backend_checks import backend_or_skip
from fed_problems import clients_match_a_scalar_only_replay, mezo
from optim_infos import (
    ALL,
    OPTIMIZERS,
    OptimizerInfo,
    assert_bitwise,
    ids,
    make_optimizer,
    state_tensors,
    tiny_model,
    weights,
)

SEED = 4321
make = partial(make_optimizer, seed=SEED)
A = 0.05  # the per-step factor lr·anchor_decay the tests use: large enough that the pull is visible in 4 steps
BACKENDS = ["reference", "chunked", "cpu", "triton"]


def groups(model: torch.nn.Module, lam: float) -> list[dict]:
    """Two param groups of the tiny MLP: the first layer with ``anchor_decay=lam``, the last without."""
    return [{"params": list(model[0].parameters()), "anchor_decay": lam}, {"params": list(model[2].parameters())}]


def scripted_closure():
    """Losses that do not depend on θ (a fixed sequence): both runs of a comparison get the same scalars g, so
    their weights differ only by the rounding of the decay, not by the loss landscape amplifying it."""
    def closure() -> torch.Tensor:
        closure.calls += 1
        return torch.tensor(1.0 + 0.01 * math.sin(1.7 * closure.calls))  # g = ΔL/ε of a few units

    closure.calls = 0
    return closure


def anchor_free_state(opt) -> list[torch.Tensor]:
    return [v.clone() for st in opt.state.values() for k, v in sorted(st.items()) if k != "anchor"]


# ---------------------------------------------------------------- the math, on every backend and optimizer


@ALL
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_decay_matches_a_plain_torch_decay_after_the_same_optimizer(info: OptimizerInfo, backend: str, dtype):
    backend_or_skip(backend)
    if dtype == torch.float64 and backend in ("cpu", "triton"):
        pytest.skip("the fused backends compute fp32/bf16/fp16 weights; float64 is refused at construction")
    lr = info.inputs[0]["lr"]
    steps = 4
    anchored, plain = tiny_model(dtype=dtype), tiny_model(dtype=dtype)
    start = weights(anchored)
    opt = make(info, groups(anchored, A / lr), backend=backend)
    ref = make(info, groups(plain, 0.0), backend=backend)
    f, g = scripted_closure(), scripted_closure()
    for _ in range(steps):
        opt.step(f)
        ref.step(g)
        with torch.no_grad():  # the decay, independently: first group only, θ − a(θ − θ_0)
            for p, p0 in zip(list(plain[0].parameters()), start[:2], strict=True):
                p.copy_(p - A * (p - p0))
    # Tolerance from float rounding: lerp_ and θ − a(θ − θ_0) round differently (a fused multiply-add, or the
    # weight taken in the op's math type) by at most 1 ulp of max(|θ|, |θ_0|) per step, and the next update
    # adds at most 1 ulp more from its different input; a contraction (1 − a) and Adam-like steps that do not
    # read θ do not grow it, so after T steps |Δ| ≤ 2T·eps·max|θ|.
    for x, y in zip(weights(anchored), weights(plain), strict=True):
        bound = 2 * steps * torch.finfo(dtype).eps * max(float(x.abs().max()), float(y.abs().max()), 1.0)
        torch.testing.assert_close(x, y, rtol=0.0, atol=bound)
    # the pull is visible (else the comparison would be vacuous): the first layer differs from the run without
    # it by far more than the bound, the second layer's state and weights are those of the plain run
    free = tiny_model(dtype=dtype)
    f = scripted_closure()
    unpulled = make(info, groups(free, 0.0), backend=backend)
    for _ in range(steps):
        unpulled.step(f)
    assert (weights(anchored)[0] - weights(free)[0]).abs().max() > 100 * bound
    assert_bitwise(weights(anchored)[2:], weights(plain)[2:])
    assert_bitwise(anchor_free_state(opt), anchor_free_state(ref))
    assert_bitwise([opt.state[p]["anchor"] for p in anchored[0].parameters()], start[:2])  # the anchor stays θ_0
    assert all("anchor" not in opt.state[p] for p in anchored[2].parameters())


@ALL
def test_zero_anchor_decay_is_bit_for_bit_the_optimizer_without_it(info: OptimizerInfo):
    runs = []
    for kwargs in ({}, {"anchor_decay": 0.0}, {"anchor_decay": 0}):
        model = tiny_model()
        opt = make(info, model, **kwargs)
        f = scripted_closure()
        for _ in range(3):
            opt.step(f)
        assert all("anchor" not in st for st in opt.state.values())
        assert opt.state_bytes() == info.bytes_per_param[0] * sum(p.numel() for p in model.parameters())
        runs.append(weights(model) + state_tensors(opt))
    assert_bitwise(runs[0], runs[1])
    assert_bitwise(runs[0], runs[2])


@ALL
def test_the_anchor_is_one_copy_of_the_weights_in_their_dtype(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model, anchor_decay=1.0)
    numel = sum(p.numel() for p in model.parameters())
    assert opt.state_bytes() == (info.bytes_per_param[0] + 4) * numel
    for p in model.parameters():
        a = opt.state[p]["anchor"]
        assert a.dtype == p.dtype and a.shape == p.shape and torch.equal(a, p) and a.data_ptr() != p.data_ptr()
    # add_param_group takes the new group's anchor (at its own weights), and only where the group decays
    extra, plain = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [extra], "anchor_decay": 2.0})
    opt.add_param_group({"params": [plain], "anchor_decay": 0.0})
    assert torch.equal(opt.state[extra]["anchor"], extra) and "anchor" not in opt.state[plain]


# ---------------------------------------------------------------- checkpoints


@ALL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_mid_run_is_bit_exact_with_the_saved_anchor(info: OptimizerInfo, dtype: torch.dtype):
    lam = A / info.inputs[0]["lr"]
    straight = tiny_model(dtype=dtype)
    opt = make(info, straight, anchor_decay=lam)
    f = scripted_closure()
    for _ in range(2):
        opt.step(f)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    at_2, calls_at_2 = weights(straight), f.calls
    for _ in range(2):
        opt.step(f)
    # the resumed optimizer is built on the step-2 weights: its own construction-time anchor would be those, so
    # only the loaded anchor (the step-0 weights) gives the straight run's numbers
    resumed = tiny_model(dtype=dtype)
    with torch.no_grad():
        for p, w in zip(resumed.parameters(), at_2, strict=True):
            p.copy_(w)
    opt2 = make(info, resumed, anchor_decay=lam)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    g = scripted_closure()
    g.calls = calls_at_2  # the closure's losses from step 2 on, as in the straight run
    for _ in range(2):
        opt2.step(g)
    assert_bitwise(weights(resumed), weights(straight))
    assert_bitwise(state_tensors(opt2), state_tensors(opt))
    assert all(opt2.state[p]["anchor"].dtype == dtype for p in resumed.parameters())  # the parameter's, not fp32


@ALL
def test_a_state_without_anchors_is_refused_before_anything_changes(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model, anchor_decay=1.0)
    f = scripted_closure()
    opt.step(f)
    good = opt.state_dict()
    before_w, before_s = weights(model), state_tensors(opt)
    for drop in ([0], [0, 1, 2, 3]):
        sd = copy.deepcopy(opt.state_dict())  # (its dicts are the live state's)
        for i in drop:
            del sd["state"][i]["anchor"]
        with pytest.raises(ValueError, match=r"param_groups\[0\] has anchor_decay=1\.0 but the state of its "
                                             rf"parameters {re.escape(str(drop))} lacks 'anchor'"):
            opt.load_state_dict(sd)
        assert_bitwise(weights(model), before_w)
        assert_bitwise(state_tensors(opt), before_s)
        assert opt.step_count == 1
    # a non-finite or misshapen anchor is refused like any buffer
    sd = copy.deepcopy(opt.state_dict())  # (its dicts are the live state's)
    sd["state"][0]["anchor"] = sd["state"][0]["anchor"].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())  # (its dicts are the live state's)
    sd["state"][0]["anchor"] = sd["state"][0]["anchor"].reshape(-1)
    with pytest.raises(ValueError, match="must have its parameter's shape"):
        opt.load_state_dict(sd)
    assert_bitwise(state_tensors(opt), before_s)
    opt.load_state_dict(good)


@ALL
def test_a_state_dict_saved_before_the_option_loads_with_it_off(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model)
    opt.step(scripted_closure())
    sd = copy.deepcopy(opt.state_dict())  # (its dicts are the live state's)
    for g in sd["param_groups"]:
        del g["anchor_decay"]
    other = make(info, tiny_model(), anchor_decay=1.0)
    other.load_state_dict(sd)
    assert other.param_groups[0]["anchor_decay"] == 0.0 and other.step_count == 1


# ---------------------------------------------------------------- scalar-only replay


@ALL
def test_apply_update_replays_step_bit_for_bit(info: OptimizerInfo):
    # transient perturbation: step() never moves θ in place, so its update starts from exactly the θ a replica has
    lam = A / info.inputs[0]["lr"]
    stepped, replayed = tiny_model(), tiny_model()
    opt = make(info, stepped, anchor_decay=lam, module=stepped)
    replica = make(info, replayed, anchor_decay=lam)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))

    def loss():
        return (stepped(x) ** 2).mean()

    for _ in range(4):
        seed = opt.current_seed
        opt.step(loss)
        replica.apply_update(seed, opt.last_projected_grads,
                             **info.extra_kwargs_for_replay(opt.last_extra_scalars))
    assert_bitwise(weights(replayed), weights(stepped))
    assert_bitwise(state_tensors(replica), state_tensors(opt))


@pytest.mark.parametrize("opt_fn", [partial(mezo, anchor_decay=2.0), partial(mezo, momentum=0.9, anchor_decay=2.0)],
                         ids=["mezo", "mezo-momentum"])
def test_federated_clients_equal_a_scalar_only_replay(opt_fn):
    replayed = clients_match_a_scalar_only_replay(opt_fn, tau=2, rounds=3)
    # ... and the replay decayed: the same replay without the pull ends elsewhere
    free = clients_match_a_scalar_only_replay(partial(mezo, momentum=opt_fn.keywords.get("momentum", 0.0)))
    assert not torch.equal(replayed[0].weight, free[0].weight)


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_a_failed_later_unit_then_step_decays_every_unit_exactly_once(info: OptimizerInfo, backend: str, monkeypatch):
    backend_or_skip(backend)
    lam = A / info.inputs[0]["lr"]

    def run(fail: bool) -> list[torch.Tensor]:
        model = tiny_model()
        opt = make(info, model, backend=backend, anchor_decay=lam)
        f = scripted_closure()
        opt.step(f)
        real, calls = opt._fused_update, [0]

        def fused(*args, **kwargs):
            calls[0] += 1
            if fail and calls[0] == 3:  # the third of the 4 units (one tensor each on these backends)
                raise RuntimeError("out of memory (injected)")
            return real(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(opt, "_fused_update", fused)
            if fail:
                with pytest.raises(RuntimeError, match="injected"):
                    opt.step(f)
                assert opt.step_count == 1 and opt.pending_seed is not None
                opt.step()
            else:
                opt.step(f)
        assert opt.step_count == 2
        return weights(model) + state_tensors(opt)

    assert_bitwise(run(True), run(False))


def test_a_failing_decay_refuses_further_steps(monkeypatch):
    """The decay of an updated unit cannot be taken back: if it fails the weights are unknown (refusal)."""
    model = tiny_model()
    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, anchor_decay=1.0, backend="reference", seed=SEED)

    def broken(self, other, weight):
        raise RuntimeError("lerp failed (injected)")

    monkeypatch.setattr(torch.Tensor, "lerp_", broken)
    with pytest.raises(zo_optim.optim.base.WeightsNotRestoredError):
        opt.step(scripted_closure())
    monkeypatch.undo()
    assert opt.refusal is not None


# ---------------------------------------------------------------- refusals before any write


@ALL
def test_bad_values_are_refused_at_construction(info: OptimizerInfo):
    lr = info.inputs[0]["lr"]
    for bad in (-0.1, float("nan"), float("inf"), True, "1", 1.0 / lr, 2.0 / lr):
        with pytest.raises(ValueError, match="Invalid anchor_decay"):
            make(info, tiny_model(), anchor_decay=bad)
        with pytest.raises(ValueError, match="Invalid anchor_decay"):
            make(info, groups(tiny_model(), bad))
    with pytest.raises(ValueError, match=r"lr·anchor_decay = 1 must be < 1"):
        make(info, tiny_model(), anchor_decay=1.0 / lr)


@ALL
def test_bad_values_at_step_time_change_nothing(info: OptimizerInfo):
    lr = info.inputs[0]["lr"]
    model = tiny_model()
    opt = make(info, model, anchor_decay=A / lr)
    f = scripted_closure()
    opt.step(f)
    before = weights(model) + state_tensors(opt)
    seed, g = opt.current_seed, torch.ones(opt.num_queries)
    for key, value, match in [("anchor_decay", 1.0 / lr, "must be < 1"), ("lr", 2.0 / (A / lr), "must be < 1"),
                              ("anchor_decay", float("nan"), "Invalid anchor_decay"),
                              ("anchor_decay", -1.0, "Invalid anchor_decay")]:
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(ValueError, match=match):
            opt.step(f)
        with pytest.raises(ValueError, match=match):
            opt.apply_update(seed, g, **info.extra_kwargs_for_replay(_extras(info, opt)))
        opt.param_groups[0][key] = old
        assert_bitwise(weights(model) + state_tensors(opt), before)
        assert opt.step_count == 1 and opt.pending_seed is None
    # a decay switched on after construction has no anchor: refused, not pulled toward nothing
    model = tiny_model()
    opt = make(info, model)
    opt.param_groups[0]["anchor_decay"] = 1.0
    before = weights(model)
    with pytest.raises(ValueError, match=r"its anchor state\[p\]\['anchor'\] is none"):
        opt.step(f)
    assert_bitwise(weights(model), before)
    for p in model.parameters():
        opt.state[p]["anchor"] = p.detach().clone()
    opt.step(f)  # the fix the message names
    first = next(model.parameters())
    opt.state[first]["anchor"] = opt.state[first]["anchor"].double()  # the wrong dtype: refused too
    before = weights(model)
    with pytest.raises(ValueError, match="shape, dtype and device"):
        opt.step(f)
    assert_bitwise(weights(model), before)


def _extras(info: OptimizerInfo, opt) -> dict[str, torch.Tensor]:
    """Extra scalars apply_update needs (HiZOO's curvature, HELENE's Σg²): positive ones, as a step would give."""
    return {k: torch.ones(opt.num_queries) for k, required in info.cls.extra_scalars.items() if required}


def test_skipped_steps_do_not_decay():
    model = tiny_model()
    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, anchor_decay=5.0, backend="reference", seed=SEED)
    f = scripted_closure()
    opt.step(f)
    before = weights(model)
    opt.step(lambda: torch.tensor(float("nan")))
    assert opt.skipped_steps == 1
    for a, b in zip(weights(model), before, strict=True):  # restored by the in-place round trip: a few ulp
        torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(b.abs().max()))
