"""``estimate(closure, restore=False)``: the split form at the passes of ``step(closure)``.

The deferred restore leaves the weights at the last probe point; ``step()`` fuses the restore into
the update, the next ``estimate`` moves on from there, ``restore_weights()`` / ``take_estimate()`` /
``attach()`` / any refusal bring them back to θ. Driven by the optimizer table (every configuration
of all five optimizers), reference backend, plain torch models.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from optim_infos import (
    ALL,
    ALL_CONFIGS,
    OPTIMIZERS,
    OptimizerInfo,
    assert_bitwise,
    loss_closure,
    make_optimizer,
    reference,
    tiny_data,
    tiny_model,
    weights,
)

SEED = 4321  # the values checked here were recorded with this seed
REF = reference(SEED)
make = partial(make_optimizer, seed=SEED)




def assert_state_bitwise(a, b) -> None:
    for pa, pb in zip(a.state.values(), b.state.values(), strict=True):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k


def batches(n: int):
    return [tiny_data(seed=s, n=8) for s in range(n)]


@ALL_CONFIGS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_estimate_then_step_is_bitwise_step_with_closure(info: OptimizerInfo, i: int, dtype):
    """Same passes, same fused update: the split form reproduces step(closure) bit for bit, in every dtype."""
    fused_model, split_model = tiny_model(dtype=dtype), tiny_model(dtype=dtype)
    fused, split = make(info, fused_model, i), make(info, split_model, i)
    for x, y in batches(4):
        fused.step(loss_closure(fused_model, x, y))
        split.estimate(loss_closure(split_model, x, y), restore=False)
        assert split.weights_perturbed
        assert split._inplace.passes == fused._inplace.passes  # no restore pass of its own
        split.step()
        assert not split.weights_perturbed
        assert_bitwise(weights(fused_model), weights(split_model))
    assert_state_bitwise(fused, split)
    assert fused.step_count == split.step_count


@ALL
def test_accumulation_saves_one_pass_per_micro_batch_and_matches_the_restoring_form(info: OptimizerInfo):
    """k micro-batches (central, q = 1): 2k passes + the fused update, against 3k + a separate update."""
    deferred_model, restoring_model = tiny_model(), tiny_model()
    deferred, restoring = make(info, deferred_model), make(info, restoring_model)
    before = weights(deferred_model)
    eps, bound_u = deferred.zo_eps, 6.0  # |u| ≤ 6: a Gaussian beyond 6σ has probability 2e-9
    data = batches(3)
    for x, y in data:
        deferred.estimate(loss_closure(deferred_model, x, y), restore=False)
        restoring.estimate(loss_closure(restoring_model, x, y))
    probes = 1 if deferred.estimator == "forward" else 2
    assert restoring._inplace.passes == (probes + 1) * len(data)
    if deferred.estimator == "forward" or deferred.needs_center_loss:
        # L(θ) is measured first, at θ: each later micro-batch restores first, so only the last restore is saved
        assert deferred._inplace.passes == restoring._inplace.passes - 1
    else:
        # the deferred form jumps −ε → +ε in one pass; the restoring form restores (+1) and moves (+1) again
        assert deferred._inplace.passes == probes * len(data)
    deferred.step()
    # The two forms probe θ ± ε·u through different rounding paths (a jump of 2ε vs back and forth), so their
    # losses and hence g differ in the last float32 bits, and a weight by lr·|Δg|·|u| — an amount no fixed
    # tolerance bounds for every lr and |u|. So the restoring form applies the deferred form's own scalars:
    # the update is then the same float32 expression on both sides and only the perturbation round trips differ.
    seed, _, _ = restoring.take_estimate()
    restoring.apply_update(seed, deferred.last_projected_grads, **deferred.last_extra_scalars)
    assert_state_bitwise(deferred, restoring)  # state is a function of (seed, scalars) alone
    # Each in-place pass writes fl(θ + c·u): one float32 rounding of at most ½ ulp of a value of size at most
    # M = |θ| + 2ε|u| + |update| (the probe points and the update stay within that), so after the n passes of
    # the two forms together the weights can differ by at most n·½·ulp(M) per element. A broken (skipped or
    # doubled) restore leaves ε·|u| ≈ 1e-3·|u|, thousands of ulps of these O(1) weights.
    n = deferred._inplace.passes + restoring._inplace.passes + 2  # + the two update passes
    for a, b, theta in zip(weights(deferred_model), weights(restoring_model), before, strict=True):
        size = theta.abs() + 2 * eps * bound_u + (a - theta).abs() + (b - theta).abs()
        ulp = torch.nextafter(size, torch.tensor(float("inf"))) - size
        assert ((a - b).abs() <= n * 0.5 * ulp).all(), ((a - b).abs() / ulp).max()


@ALL
@pytest.mark.parametrize("how", ["restore_weights", "take_estimate", "attach"])
def test_leaving_the_deferred_state_restores_the_weights(info: OptimizerInfo, how: str):
    """Bit-identical to the weights an estimate with restore=True leaves."""
    x, y = tiny_data()
    deferred_model, restoring_model = tiny_model(), tiny_model()
    deferred, restoring = make(info, deferred_model), make(info, restoring_model)
    deferred.estimate(loss_closure(deferred_model, x, y), restore=False)
    restoring.estimate(loss_closure(restoring_model, x, y))
    if how == "restore_weights":
        deferred.restore_weights()
        deferred.restore_weights()  # idempotent
        assert deferred.pending_seed is not None  # the estimate is kept ...
        deferred.step()  # ... and applied with a separate update pass, like the restoring form
        restoring.step()
        assert_state_bitwise(deferred, restoring)
    elif how == "take_estimate":
        assert deferred.take_estimate()[0] == restoring.take_estimate()[0]
    else:
        deferred.attach(deferred_model)
        assert deferred.perturbation == "transient"
    assert not deferred.weights_perturbed
    assert_bitwise(weights(deferred_model), weights(restoring_model))


def _fails(kind: str, model: torch.nn.Module, x, y):
    good = loss_closure(model, x, y)
    if kind == "nan":
        return lambda: good() * float("nan")
    if kind == "error":
        def closure():
            raise RuntimeError("boom")
        return closure
    if kind == "interrupt":
        calls = {"n": 0}

        def closure():
            calls["n"] += 1
            if calls["n"] == 2:  # between the probes of the second micro-batch
                raise KeyboardInterrupt
            return good()
        return closure
    raise AssertionError(kind)


@ALL
@pytest.mark.parametrize("kind", ["nan", "error", "interrupt", "wrong_seed", "frozen", "bad_lr"])
def test_a_failure_after_a_deferred_estimate_restores_the_weights(info: OptimizerInfo, kind: str):
    """Whatever fails next — a micro-batch's closure, a refused estimate or step — the weights come back to θ."""
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, on_nonfinite="raise")
    twin_model = tiny_model()
    twin = make(info, twin_model, on_nonfinite="raise")
    twin.estimate(loss_closure(twin_model, x, y))  # θ after one restoring estimate: what failures must leave
    opt.estimate(loss_closure(model, x, y), restore=False)
    assert opt.weights_perturbed
    with pytest.raises((RuntimeError, ValueError, KeyboardInterrupt)):
        if kind in ("nan", "error", "interrupt"):
            opt.estimate(_fails(kind, model, x, y), restore=False)
        elif kind == "wrong_seed":
            opt.estimate(loss_closure(model, x, y), seed=opt.current_seed + 1, restore=False)
        elif kind == "frozen":
            next(model.parameters()).requires_grad_(False)
            opt.step()
        else:
            opt.param_groups[0]["lr"] = float("nan")
            opt.step()
    assert not opt.weights_perturbed
    if kind in ("wrong_seed", "frozen", "bad_lr"):  # refused before any pass: exactly the restored θ
        assert_bitwise(weights(model), weights(twin_model))
    else:  # the failing micro-batch's own passes ran too: θ up to float32 round trips (ε·u is ~1e-3 here)
        for a, b in zip(weights(model), weights(twin_model), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@ALL
def test_a_skipped_step_after_a_deferred_estimate_restores_the_weights(info: OptimizerInfo):
    x, y = tiny_data()
    model, twin_model = tiny_model(), tiny_model()
    opt, twin = make(info, model), make(info, twin_model)
    twin.estimate(loss_closure(twin_model, x, y))
    opt.estimate(loss_closure(model, x, y), restore=False)
    opt.estimate(lambda: torch.tensor(float("inf")), restore=False)  # on_nonfinite="skip": restored at once
    assert not opt.weights_perturbed
    opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(weights(model), weights(twin_model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_state_dict_and_load_are_refused_while_deferred_and_change_nothing():
    info = OPTIMIZERS[0]
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model)
    saved = copy.deepcopy(make(info, tiny_model()).state_dict())
    opt.estimate(loss_closure(model, x, y), restore=False)
    before = weights(model)
    with pytest.raises(RuntimeError, match="pending"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="pending"):
        opt.load_state_dict(saved)
    assert opt.weights_perturbed
    assert_bitwise(weights(model), before)


@ALL
def test_transient_mode_ignores_restore_false(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    before = weights(model)
    opt = make(info, model, perturbation="transient", module=model)
    opt.estimate(loss_closure(model, x, y), restore=False)
    assert not opt.weights_perturbed
    assert_bitwise(weights(model), before)


@pytest.mark.parametrize("bad", [0, 1, "no", None])
def test_restore_must_be_a_bool(bad):
    model = tiny_model()
    opt = make(OPTIMIZERS[0], model)
    before = weights(model)
    with pytest.raises(TypeError, match="Invalid restore"):
        opt.estimate(loss_closure(model, *tiny_data()), restore=bad)
    assert opt.pending_seed is None
    assert_bitwise(weights(model), before)


@pytest.mark.parametrize("call", ["attach", "detach"])
def test_switching_modes_from_inside_the_closure_is_refused(call: str):
    """A closure that attaches/detaches mid-step would strand the running step's perturbation."""
    x, y = tiny_data()
    model, twin_model = tiny_model(), tiny_model()
    opt, twin = make(OPTIMIZERS[0], model), make(OPTIMIZERS[0], twin_model)
    twin.estimate(loss_closure(twin_model, x, y))
    good = loss_closure(model, x, y)

    def closure():
        opt.attach(model) if call == "attach" else opt.detach()
        return good()

    with pytest.raises(RuntimeError, match="in flight"):
        opt.estimate(closure, restore=False)
    assert opt.perturbation == "inplace" and not opt.weights_perturbed
    for a, b in zip(weights(model), weights(twin_model), strict=True):  # restored from +ε: float32 round trip
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
