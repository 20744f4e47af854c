"""``lr_decay_steps`` (optim/_schedule.py): the update of step t uses lr·max(0, 1 − t/T), for every optimizer.

The expected numbers come from the same optimizer with the option off, driven by torch's own
``torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / T))`` stepped once after each step (which
writes ``group["lr"]`` from outside), never from the option's own code. The option promises equality bit for bit:
both compute the float product lr·factor with the same factor, and the update then reads that one float.
"""

from __future__ import annotations

import copy
import io
from functools import partial

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import zo_optim
from backend_checks import backend_or_skip
from fed_problems import clients_match_a_scalar_only_replay, hiso
from optim_infos import (
    ALL,
    OptimizerInfo,
    assert_bitwise,
    loss_closure,
    make_optimizer,
    richest,
    state_tensors,
    tiny_data,
    tiny_model,
    weights,
)
from zo_optim.federated.replica import config_digest

SEED = 8765
make = partial(make_optimizer, seed=SEED)
T = 5  # lr_decay_steps of the tests
STEPS = 7  # > T: the steps t = 5, 6 have lr 0
#: (T, steps) per backend: Triton runs here in its interpreter (~0.3 s an op call), so it gets a shorter run that
#: still crosses T (steps t = 3 at lr 0)
SIZES = {"reference": (T, STEPS), "chunked": (T, STEPS), "cpu": (T, STEPS), "triton": (3, 4)}
A = 0.05  # lr·anchor_decay where a test pulls (test_anchor_decay's factor: visible in a few steps)
BACKENDS = ["reference", "chunked", "cpu", "triton"]


def linear(steps: int):
    """LambdaLR's lambda, written here: step t's factor, 1 at t = 0, 0 from t = ``steps`` on."""
    return lambda t: max(0.0, 1.0 - t / steps)


def saved_bytes(state_dict: dict) -> bytes:
    """What ``torch.save`` writes (storages numbered in order, so equal state dicts give equal bytes)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def groups(model: torch.nn.Module, case: str, lr: float, decay: int) -> list[dict]:
    """The param groups of ``case``: ``one`` (one group), ``two`` (the first layer decays, the last does not),
    ``anchor`` (one group with the pull toward the start). ``decay``: lr_decay_steps of the decayed group (0: off)."""
    option = {"lr_decay_steps": decay} if decay else {}
    if case == "two":
        return [{"params": list(model[0].parameters()), **option}, {"params": list(model[2].parameters())}]
    extra = {"anchor_decay": A / lr} if case == "anchor" else {}
    return [{"params": list(model.parameters()), **option, **extra}]


def run(info: OptimizerInfo, case: str, *, option: bool, scheduler: bool, backend: str = "reference",
        dtype: torch.dtype = torch.float32, steps: int = STEPS, decay: int = T, i: int | None = None):
    """``steps`` steps of ``info``'s richest configuration on the tiny MLP (real losses: any difference in one step
    changes every later one), with ``lr_decay_steps=decay`` (``option``) or LambdaLR's line over ``decay`` steps
    (``scheduler``) or neither; returns (weights + state tensors, optimizer)."""
    lr = info.inputs[richest_or(info, i)]["lr"]
    model = tiny_model(dtype=dtype)
    opt = make(info, groups(model, case, lr, decay if option else 0), i, backend=backend)
    sched = None
    if scheduler:  # the decayed group follows the line, the other (case "two") keeps lr: factor 1.0, exact
        sched = LambdaLR(opt, [linear(decay), *([lambda t: 1.0] if case == "two" else [])])
    closure = loss_closure(model, *tiny_data())
    for _ in range(steps):
        opt.step(closure)
        if sched is not None:
            sched.step()
    return weights(model) + state_tensors(opt), opt


def richest_or(info: OptimizerInfo, i: int | None) -> int:
    return richest(info) if i is None else i


# ---------------------------------------------------------------- the math, against torch's LambdaLR


@ALL
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", ["one", "two", "anchor"])
def test_option_equals_lambdalr_bit_for_bit(info: OptimizerInfo, backend: str, dtype: torch.dtype, case: str):
    backend_or_skip(backend)
    if dtype == torch.float64 and backend in ("cpu", "triton"):
        pytest.skip("the fused backends compute fp32/bf16/fp16 weights; float64 is refused at construction")
    if case != "one" and (backend == "triton" or dtype == torch.float64):
        pytest.skip("kept cheap: the group cases run in fp32 on the backends but Triton's slow interpreter (the "
                    "groups go through the same Python path on every backend and dtype)")
    decay, steps = SIZES[backend]
    got, opt = run(info, case, option=True, scheduler=False, backend=backend, dtype=dtype, steps=steps, decay=decay)
    want, _ = run(info, case, option=False, scheduler=True, backend=backend, dtype=dtype, steps=steps, decay=decay)
    assert_bitwise(got, want)
    assert opt.step_count == steps
    lr = info.inputs[richest_or(info, None)]["lr"]
    assert opt.param_groups[0]["lr"] == lr  # the option reads the lr, it never writes it
    if backend == "reference":  # not vacuous: the constant-lr run ends elsewhere (once per case and dtype)
        constant, _ = run(info, case, option=False, scheduler=False, dtype=dtype)
        assert not all(torch.equal(a, b) for a, b in zip(got, constant, strict=True))
    if case == "two":  # the other group keeps its lr (its weights: LambdaLR's factor 1.0 in the comparison)
        assert opt.param_groups[1]["lr_decay_steps"] == 0 and opt.param_groups[1]["lr"] == lr


@ALL
def test_the_first_step_uses_the_full_lr(info: OptimizerInfo):
    """t counts from 0: step 0's factor is 1 (a schedule read at t + 1 would give 1 − 1/T), step 1's is 1 − 1/T."""
    decayed, _ = run(info, "one", option=True, scheduler=False, steps=1)
    constant, _ = run(info, "one", option=False, scheduler=False, steps=1)
    assert_bitwise(decayed, constant)
    decayed, _ = run(info, "one", option=True, scheduler=False, steps=2)
    constant, _ = run(info, "one", option=False, scheduler=False, steps=2)
    assert not all(torch.equal(a, b) for a, b in zip(decayed, constant, strict=True))


def test_weights_stop_moving_at_step_t():
    """MeZO without weight decay, transient perturbation (θ is never perturbed in place, so a step of lr 0 leaves it
    bit for bit): θ moves in steps t = 0 … T−1 (factor ≥ 1/T) and never from step T on, while the counter runs."""
    model = tiny_model()
    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, lr_decay_steps=T, module=model, backend="reference", seed=SEED)
    closure = loss_closure(model, *tiny_data())
    after = [weights(model)]
    for _ in range(T + 2):
        opt.step(closure)
        after.append(weights(model))
    for t in range(T):  # step t (factor 1 − t/T > 0) moved θ: after[t] → after[t + 1]
        assert not torch.equal(after[t][0], after[t + 1][0]), t
    assert_bitwise(after[T + 1], after[T])
    assert_bitwise(after[T + 2], after[T])
    assert opt.step_count == T + 2


# ---------------------------------------------------------------- scalar-only replay


@ALL
@pytest.mark.parametrize("case", ["one", "anchor"])
def test_apply_update_replays_the_decayed_steps_bit_for_bit(info: OptimizerInfo, case: str):
    # transient perturbation: step() never moves θ in place, so its update starts from exactly the θ a replica has
    lr = info.inputs[0]["lr"]
    stepped, replayed = tiny_model(), tiny_model()
    opt = make(info, groups(stepped, case, lr, T), module=stepped)
    replica = make(info, groups(replayed, case, lr, T))
    closure = loss_closure(stepped, *tiny_data())
    for _ in range(STEPS):
        seed = opt.current_seed
        opt.step(closure)
        replica.apply_update(seed, opt.last_projected_grads, **info.extra_kwargs_for_replay(opt.last_extra_scalars))
    assert_bitwise(weights(replayed), weights(stepped))
    assert_bitwise(state_tensors(replica), state_tensors(opt))
    assert replica.step_count == opt.step_count == STEPS


def test_federated_hiso_clients_equal_a_scalar_only_replay():
    # 3 rounds of 2 local steps = 6 steps, T = 4: the last rounds cross T (lr 0 from step 4 on)
    replayed = clients_match_a_scalar_only_replay(partial(hiso, lr_decay_steps=4), tau=2, rounds=3)
    # ... and the replay decayed: the same replay at a constant lr ends elsewhere
    constant = clients_match_a_scalar_only_replay(hiso, tau=2, rounds=3)
    assert not torch.equal(replayed[0].weight, constant[0].weight)


def test_config_digest_pins_lr_decay_steps():
    digests = {steps: config_digest(hiso(tiny_model(), lr_decay_steps=steps)) for steps in (0, 4, 10)}
    assert len(set(digests.values())) == 3
    assert config_digest(hiso(tiny_model(), lr_decay_steps=4)) == digests[4]  # same T, same digest
    # a NumPy integer steps like the int it equals (is_int accepts it), so it digests like it too
    np = pytest.importorskip("numpy")
    assert config_digest(hiso(tiny_model(), lr_decay_steps=np.int64(4))) == digests[4]


# ---------------------------------------------------------------- checkpoints


@ALL
@pytest.mark.parametrize("case", ["one", "anchor"])
def test_resume_mid_schedule_is_bit_exact(info: OptimizerInfo, case: str):
    lr = info.inputs[richest_or(info, None)]["lr"]
    straight = tiny_model()
    opt = make(info, groups(straight, case, lr, T), None)
    closure = loss_closure(straight, *tiny_data())
    for _ in range(3):
        opt.step(closure)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    at_3 = weights(straight)
    for _ in range(STEPS - 3):
        opt.step(closure)
    resumed = tiny_model(seed=1)  # other weights: only the copied ones give the straight run's numbers
    with torch.no_grad():
        for p, w in zip(resumed.parameters(), at_3, strict=True):
            p.copy_(w)
    opt2 = make(info, groups(resumed, case, lr, T), None)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.step_count == 3
    closure2 = loss_closure(resumed, *tiny_data())
    for _ in range(STEPS - 3):
        opt2.step(closure2)
    assert_bitwise(weights(resumed), weights(straight))
    assert_bitwise(state_tensors(opt2), state_tensors(opt))


@ALL
def test_a_state_dict_saved_before_the_option_loads_with_it_off(info: OptimizerInfo):
    model = tiny_model()
    old = make(info, model)
    closure = loss_closure(model, *tiny_data())
    for _ in range(2):
        old.step(closure)
    original = copy.deepcopy(old.state_dict())  # (its dicts are the live state's)
    keys = list(original["param_groups"][0])
    assert keys[-4:] == ["anchor_decay", "lr_decay_steps", "params", "zo"]  # the newest option last of the options
    saved = copy.deepcopy(original)
    for g in saved["param_groups"]:  # as a version before the option saved it
        del g["lr_decay_steps"]
    other_model = tiny_model()
    with torch.no_grad():
        for p, q in zip(other_model.parameters(), model.parameters(), strict=True):
            p.copy_(q)
    other = make(info, other_model, lr_decay_steps=T)
    other.load_state_dict(saved)
    assert other.param_groups[0]["lr_decay_steps"] == 0 and other.step_count == 2
    # saved again: the key appended where it was, so the bytes are those of a state dict that had it
    assert saved_bytes(other.state_dict()) == saved_bytes(original)
    # and it runs at the constant lr: the old optimizer's continuation, bit for bit
    other_closure = loss_closure(other_model, *tiny_data())
    for _ in range(T):
        old.step(closure)
        other.step(other_closure)
    assert_bitwise(weights(other_model), weights(model))
    assert_bitwise(state_tensors(other), state_tensors(old))


# ---------------------------------------------------------------- refusals before any write

BAD = [-1, 2.5, 5.0, True, "10", None]


@ALL
def test_bad_values_are_refused_at_construction_and_in_add_param_group(info: OptimizerInfo):
    for bad in BAD:
        with pytest.raises(ValueError, match="Invalid lr_decay_steps"):
            make(info, tiny_model(), lr_decay_steps=bad)
        with pytest.raises(ValueError, match="Invalid lr_decay_steps"):
            make(info, [{"params": list(tiny_model().parameters()), "lr_decay_steps": bad}])
    model = tiny_model()
    opt = make(info, model, anchor_decay=1.0)  # anchor_decay: a write add_param_group would make (the anchor)
    for bad in BAD:
        extra = torch.nn.Parameter(torch.randn(3))
        with pytest.raises(ValueError, match="Invalid lr_decay_steps"):
            opt.add_param_group({"params": [extra], "lr_decay_steps": bad})
        assert len(opt.param_groups) == 1 and extra not in opt.state
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr_decay_steps": 3})  # a good one is taken
    assert opt.param_groups[1]["lr_decay_steps"] == 3 and opt.param_groups[0]["lr_decay_steps"] == 0


@ALL
def test_bad_values_at_step_time_change_nothing(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model, lr_decay_steps=T)
    closure = loss_closure(model, *tiny_data())
    opt.step(closure)
    before = weights(model) + state_tensors(opt)
    seed, g = opt.current_seed, torch.ones(opt.num_queries)
    extras = {k: torch.ones(opt.num_queries) for k, required in info.cls.extra_scalars.items() if required}
    for bad in BAD:
        opt.param_groups[0]["lr_decay_steps"] = bad
        with pytest.raises(ValueError, match="Invalid lr_decay_steps"):
            opt.step(closure)
        with pytest.raises(ValueError, match="Invalid lr_decay_steps"):
            opt.apply_update(seed, g, **info.extra_kwargs_for_replay(extras))
        assert_bitwise(weights(model) + state_tensors(opt), before)
        assert opt.step_count == 1 and opt.pending_seed is None
    # a state dict carrying a bad value is refused at load, the optimizer as it was
    opt.param_groups[0]["lr_decay_steps"] = T
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr_decay_steps"] = -1
    with pytest.raises(ValueError, match="Invalid lr_decay_steps"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr_decay_steps"] == T
    opt.step(closure)  # fixed: it steps again
    assert opt.step_count == 2
