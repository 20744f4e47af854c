"""Step protocol v2: explicit seeds, weighted accumulation, no re-entrance, loss precision.

Driven by the optimizer table, so every behaviour holds for all five optimizers.
"""

from __future__ import annotations

import copy
import threading
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo import free_port, gloo_group
from optim_infos import (
    ALL,
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
from zo_optim import rng

SEED = 1234  # the values checked here were recorded with this seed
REF = reference(SEED)
make = partial(make_optimizer, seed=SEED)




def single_estimate(info: OptimizerInfo, model, closure, seed: int):
    """(g, extras) of one estimate with ``seed`` on a copy (the copy's optimizer is discarded)."""
    twin = copy.deepcopy(model)
    opt = make(info, twin, perturbation="transient", module=twin)
    opt.estimate(lambda: closure(twin), seed=seed)
    _, g, extras = opt.take_estimate()
    return g, extras


def closure_on(x, y, per_example=False):
    return lambda m: loss_closure(m, x, y, per_example=per_example)()


# ---------------------------------------------------------------- explicit seeds


@ALL
def test_explicit_seed_is_measured_and_applied(info: OptimizerInfo):
    x, y = tiny_data()
    seed = rng.round_seed(99, 3, 1)
    model = tiny_model()
    opt = make(info, model, perturbation="transient", module=model)
    replica = copy.deepcopy(model)
    opt_r = make(info, replica)
    opt.estimate(loss_closure(model, x, y), seed=seed)
    assert opt.pending_seed == seed and opt.current_seed != seed
    opt.step()
    assert opt.step_count == 1 and opt.pending_seed is None
    opt_r.apply_update(seed, opt.last_projected_grads, **info.extra_kwargs_for_replay(opt.last_extra_scalars))
    assert_bitwise(weights(model), weights(replica))
    # step(closure, seed=...) is estimate(closure, seed=...) + step()
    model2 = tiny_model()
    opt2 = make(info, model2, perturbation="transient", module=model2)
    opt2.step(loss_closure(model2, x, y), seed=seed)
    assert_bitwise(weights(model), weights(model2))


@ALL
def test_mixing_seeds_in_one_accumulation_is_refused(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model)
    opt.estimate(loss_closure(model, x, y), seed=7)
    before = weights(model)
    calls = []
    with pytest.raises(ValueError, match="same seed"):
        opt.estimate(lambda: calls.append(1) or loss_closure(model, x, y)(), seed=8)
    with pytest.raises(ValueError, match="same seed"):
        opt.estimate(loss_closure(model, x, y))  # the default seed differs from 7 too
    assert not calls  # refused before any forward
    assert_bitwise(before, weights(model))
    assert opt.pending_seed == 7 and opt._acc.count == 1  # the pending estimate is intact
    opt.step()
    assert opt.step_count == 1


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, "3", 4.0])
def test_invalid_seeds_are_refused(bad):
    info = OPTIMIZERS[0]
    model = tiny_model()
    opt = make(info, model)
    x, y = tiny_data()
    with pytest.raises(ValueError, match="Invalid seed"):
        opt.estimate(loss_closure(model, x, y), seed=bad)
    with pytest.raises(ValueError, match="Invalid seed"):
        opt.apply_update(bad, [0.0])
    assert opt.pending_seed is None


def test_numpy_integer_seed_is_accepted():
    info = OPTIMIZERS[0]
    model = tiny_model()
    opt = make(info, model, seed=np.uint64(2**63 + 5))
    assert opt.base_seed == 2**63 + 5
    x, y = tiny_data()
    opt.step(loss_closure(model, x, y), seed=np.int64(11))
    assert opt.step_count == 1


# ---------------------------------------------------------------- weighted accumulation


@ALL
def test_weighted_accumulation_is_the_weighted_mean(info: OptimizerInfo):
    x, y = tiny_data(n=12)
    parts = [(x[:3], y[:3], 3.0), (x[3:], y[3:], 9.0)]
    model = tiny_model()
    opt = make(info, model, perturbation="transient", module=model)
    seed = opt.current_seed
    singles = [single_estimate(info, model, closure_on(a, b, per_example=True), seed) for a, b, _ in parts]
    for a, b, w in parts:
        opt.estimate(loss_closure(model, a, b, per_example=True), weight=w)
    seed_p, g, extras = opt.take_estimate()
    assert seed_p == seed
    total = sum(w for *_, w in parts)
    expected = sum(w * s[0] for (*_, w), s in zip(parts, singles, strict=True)) / total
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-7)
    for k, v in extras.items():
        if k in opt.summed_extras:  # sums over examples do not depend on the split or the weights
            exp = sum(s[1][k] for s in singles)
        else:
            exp = sum(w * s[1][k] for (*_, w), s in zip(parts, singles, strict=True)) / total
        torch.testing.assert_close(v, exp, rtol=1e-6, atol=1e-7)


def mse64(m, x, y):
    """Mean squared error of a float64 model in float64: loss differences free of float32 rounding."""
    return lambda: ((m(x.double()) - y.double()) ** 2).mean()


@ALL
def test_token_weighting_equals_one_big_batch(info: OptimizerInfo):
    """Weighting micro-batch means by their sizes gives the mean over the whole batch."""
    x, y = tiny_data(n=10)
    model = tiny_model(dtype=torch.float64)
    opt = make(info, model, perturbation="transient", module=model)
    seed = opt.current_seed
    whole, _ = single_estimate(info, model, lambda m: mse64(m, x, y)(), seed)
    for a, b in ((x[:3], y[:3]), (x[3:], y[3:])):
        opt.estimate(mse64(model, a, b), weight=len(a))
    _, g, _ = opt.take_estimate()
    torch.testing.assert_close(g, whole, rtol=1e-6, atol=1e-7)
    # the plain mean of the two micro-batch means is not the big batch's gradient
    for a, b in ((x[:3], y[:3]), (x[3:], y[3:])):
        opt.estimate(mse64(model, a, b))
    _, g_unweighted, _ = opt.take_estimate()
    assert not torch.allclose(g_unweighted, whole, rtol=1e-3)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2", torch.tensor([1.0, 2.0])])
def test_invalid_weights_are_refused_before_any_forward(bad):
    model = tiny_model()
    opt = make(OPTIMIZERS[0], model)
    calls = []
    with pytest.raises(ValueError, match="Invalid weight"):
        opt.estimate(lambda: calls.append(1) or torch.tensor(1.0), weight=bad)
    assert not calls and opt.pending_seed is None


def test_tensor_and_numpy_weights_are_accepted():
    x, y = tiny_data()
    model = tiny_model()
    opt = make(OPTIMIZERS[0], model)
    opt.estimate(loss_closure(model, x, y), weight=torch.tensor(5))
    opt.estimate(loss_closure(model, x, y), weight=np.float32(2.5))
    assert opt._acc.weight == 7.5
    opt.step()


def test_step_without_closure_refuses_seed_and_weight():
    x, y = tiny_data()
    model = tiny_model()
    opt = make(OPTIMIZERS[0], model)
    opt.estimate(loss_closure(model, x, y))
    with pytest.raises(TypeError, match="with a closure"):
        opt.step(seed=3)
    with pytest.raises(TypeError, match="with a closure"):
        opt.step(weight=2.0)
    opt.step()


# ---------------------------------------------------------------- state dict while pending


@ALL
def test_state_dict_is_refused_while_an_estimate_is_pending(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model)
    opt.estimate(loss_closure(model, x, y))
    with pytest.raises(RuntimeError, match="estimate is pending"):
        opt.state_dict()
    assert opt.pending_seed is not None  # nothing was dropped
    opt.step()
    sd = opt.state_dict()
    assert sd["zo"]["step"] == 1


# ---------------------------------------------------------------- not re-entrant


def _reentrant_calls(opt, model):
    x, y = tiny_data()
    return {
        "step": lambda: opt.step(loss_closure(model, x, y)),
        "estimate": lambda: opt.estimate(loss_closure(model, x, y)),
        "apply_update": lambda: opt.apply_update(0, [0.0] * opt.num_queries,
                                                 **{k: [0.0] * opt.num_queries for k in opt.extra_scalars}),
        "load_state_dict": lambda: opt.load_state_dict({}),
        "add_param_group": lambda: opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]}),
        "state_dict": lambda: opt.state_dict(),
        "take_estimate": lambda: opt.take_estimate(),
    }


@ALL
@pytest.mark.parametrize("call", ["step", "estimate", "apply_update", "load_state_dict", "add_param_group",
                                  "state_dict", "take_estimate"])
@pytest.mark.parametrize("outer", ["step", "estimate"])
def test_calls_from_inside_the_closure_are_refused_and_weights_restored(info: OptimizerInfo, call: str, outer: str):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model)
    before = weights(model)
    n_groups = len(opt.param_groups)
    inner = _reentrant_calls(opt, model)[call]
    seen = []

    def closure():
        try:
            inner()
        except RuntimeError as e:
            seen.append(str(e))
            raise
        return loss_closure(model, x, y)()

    with pytest.raises(RuntimeError, match="not re-entrant"):
        getattr(opt, outer)(closure)
    assert seen and f".{call}()" in seen[0]
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.step_count == 0 and opt.pending_seed is None and len(opt.param_groups) == n_groups
    opt.step(loss_closure(model, x, y))  # the optimizer is usable afterwards
    assert opt.step_count == 1


def test_a_call_from_another_thread_is_refused_while_a_step_is_in_flight():
    x, y = tiny_data()
    model = tiny_model()
    opt = make(OPTIMIZERS[0], model)
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_closure():
        entered.set()
        assert release.wait(10)
        return loss_closure(model, x, y)()

    def other():
        assert entered.wait(10)
        try:
            opt.step(loss_closure(model, x, y))
        except RuntimeError as e:
            errors.append(e)
        finally:
            release.set()

    t = threading.Thread(target=other)
    t.start()
    opt.step(slow_closure)
    t.join(10)
    assert len(errors) == 1 and "another thread" in str(errors[0])
    assert opt.step_count == 1  # only the main thread's step happened


# ---------------------------------------------------------------- loss precision


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if "central" in i.cls.estimators], ids=lambda i: i.name)
def test_float64_losses_keep_their_precision(info: OptimizerInfo):
    """A float64 model with loss 1000 + ||w − c||²: g is the exact directional derivative 2(w − c)·u."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50, generator=g, dtype=torch.float64))
    c = torch.randn(50, generator=g, dtype=torch.float64)
    opt = info.cls([w], **{**info.inputs[0], **REF, "zo_eps": 1e-6, "num_queries": 1, "estimator": "central"})
    seed = opt.current_seed
    opt.estimate(lambda: 1000.0 + ((w - c) ** 2).sum())
    _, got, _ = opt.take_estimate()
    u = rng.normal(seed, 0, 50).double()
    if opt.precond_buffer is not None:
        u = u / opt.state[w][opt.precond_buffer].double().sqrt()
    expected = float(2.0 * ((w.detach() - c) * u).sum())
    assert abs(expected) > 1.0
    assert got.dtype == torch.float32
    assert abs(float(got[0]) - expected) <= 1e-4 * abs(expected), (float(got[0]), expected)


# ---------------------------------------------------------------- weighted mean across ranks



def _weighted_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port):
        results = {}
        for info in OPTIMIZERS:
            model = tiny_model(seed=0)
            x, y = tiny_data(seed=rank, n=4 + 6 * rank)  # uneven batch sizes per rank
            opt = info.cls(model.parameters(), **{**info.inputs[-1], **REF, "perturbation": "transient",
                                                  "module": model})
            seed = opt.current_seed
            local = copy.deepcopy(model)
            opt_local = info.cls(local.parameters(), **{**info.inputs[-1], **REF, "perturbation": "transient",
                                                        "module": local})
            # the local estimate alone (take_estimate never all-reduces)
            opt_local.estimate(loss_closure(local, x, y, per_example=True), seed=seed)
            _, g_local, _ = opt_local.take_estimate()
            opt.step(loss_closure(model, x, y, per_example=True), weight=len(x))
            results[info.name] = {"local": g_local, "global": opt.last_projected_grads.clone(), "w": len(x),
                                  "weights": [p.detach().clone() for p in model.parameters()]}
        torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.distributed
def test_weights_make_a_weighted_mean_across_ranks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_weighted_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for info in OPTIMIZERS:
        a, b = r[0][info.name], r[1][info.name]
        assert torch.equal(a["global"], b["global"]), info.name
        assert_bitwise(a["weights"], b["weights"])
        expected = (a["w"] * a["local"] + b["w"] * b["local"]) / (a["w"] + b["w"])
        torch.testing.assert_close(a["global"], expected, rtol=1e-6, atol=1e-7, msg=info.name)
