"""Common tests of every ZO optimizer, driven by the table in ``optim_infos.py``."""

from __future__ import annotations

import copy
import io
from functools import partial
from unittest.mock import patch

import pytest
import torch

import zo_optim
from backend_checks import backend_or_skip
from optim_infos import (
    ALL,
    OPTIMIZERS,
    OptimizerInfo,
    assert_bitwise,
    ids,
    loss_closure,
    make_optimizer,
    reference,
    tiny_data,
    tiny_model,
    weights,
)
from zo_optim import ops, rng
from zo_optim.optim.base import NonFiniteLossError

SEED = 1234  # the values checked here were recorded with this seed
REF = reference(SEED)
make = partial(make_optimizer, seed=SEED)




def state_tensors(opt) -> list[torch.Tensor]:
    return [v.clone() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]


# ---------------------------------------------------------------- construction


@ALL
def test_constructor_inputs_and_state_bytes(info: OptimizerInfo):
    for i, kwargs in enumerate(info.inputs):
        model = tiny_model()
        opt = make(info, model, i)
        x, y = tiny_data()
        loss = opt.step(loss_closure(model, x, y))
        assert loss.dim() == 0 and torch.isfinite(loss)
        numel = sum(p.numel() for p in model.parameters())
        assert opt.state_bytes() == info.bytes_per_param[i] * numel, kwargs
        for st in opt.state.values():
            for v in st.values():
                assert v.dtype == torch.float32


@ALL
def test_constructor_errors(info: OptimizerInfo):
    for err in info.errors:
        model = tiny_model()
        with pytest.raises(err.error, match=err.match):
            info.cls(model.parameters(), **{**info.inputs[0], **err.kwargs})


@ALL
def test_structural_errors(info: OptimizerInfo):
    model = tiny_model()
    with pytest.raises(TypeError, match="single Tensor"):
        info.cls(next(model.parameters()), **info.inputs[0])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        info.cls(model.parameters(), **info.inputs[0])


@ALL
def test_missing_closure_is_a_type_error_with_the_fix(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model)
    with pytest.raises(TypeError, match=r"def closure\(\)"):
        opt.step()
    with pytest.raises(TypeError, match="closure"):
        opt.estimate(None)


@ALL
def test_bad_closure_return_restores(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model)
    before = weights(model)
    with pytest.raises(TypeError, match="must return the loss"):
        opt.step(lambda: None)
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- schedule and seeds


@ALL
def test_forwards_and_passes_per_step(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model)
    x, y = tiny_data()
    inner = loss_closure(model, x, y)
    calls = []

    def closure():
        calls.append(1)
        return inner()

    opt.step(closure)
    assert len(calls) == info.forwards_per_step
    # 2 perturbation passes for the central (+ε, −2ε) and 1 for the forward estimator; the restore is fused.
    assert opt._inplace.passes == (2 if opt.estimator == "central" else 1)


@ALL
def test_same_seed_same_run_other_seed_other_run(info: OptimizerInfo):
    runs = []
    for seed in (7, 7, 8):
        model = tiny_model()
        opt = make(info, model, seed=seed)
        x, y = tiny_data()
        for _ in range(3):
            opt.step(loss_closure(model, x, y))
        runs.append(weights(model))
    assert_bitwise(runs[0], runs[1])
    assert not torch.equal(runs[0][0], runs[2][0])


# ---------------------------------------------------------------- state dict


@ALL
def test_state_dict_round_trip_and_bit_exact_resume(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, len(info.inputs) - 1)
    for _ in range(3):
        opt.step(loss_closure(model, x, y))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    model_b = copy.deepcopy(model)
    for _ in range(3):
        opt.step(loss_closure(model, x, y))

    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["zo"]["step"] == 3 and sd["zo"]["rng_version"] == rng.RNG_VERSION
    opt_b = make(info, model_b, len(info.inputs) - 1, seed=999)  # the seed comes from the state dict
    opt_b.load_state_dict(sd)
    assert opt_b.base_seed == opt.base_seed and opt_b.step_count == 3
    for _ in range(3):
        opt_b.step(loss_closure(model_b, x, y))
    assert_bitwise(weights(model), weights(model_b))
    assert_bitwise(state_tensors(opt), state_tensors(opt_b))


@ALL
def test_state_dict_of_other_optimizer_or_rng_version_is_refused(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model)
    other = next(o for o in OPTIMIZERS if o.cls is not info.cls)
    sd_other = make(other, tiny_model()).state_dict()
    with pytest.raises(ValueError, match="cannot load it into"):
        opt.load_state_dict(sd_other)
    sd = opt.state_dict()
    sd["zo"] = {**sd["zo"], "rng_version": "philox4x32-10/bm4/v0"}
    with pytest.raises(ValueError, match="RNG contract"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="not a zo-optim state dict"):
        opt.load_state_dict(torch.optim.SGD(tiny_model().parameters(), lr=0.1).state_dict())


def test_state_dict_keeps_fp32_buffers_for_bf16_params():
    model = tiny_model(dtype=torch.bfloat16)
    opt = zo_optim.ZOAdam(model.parameters(), lr=1e-3, **REF)
    x, y = tiny_data()
    opt.step(loss_closure(model, x, y))
    opt2 = zo_optim.ZOAdam(model.parameters(), lr=1e-3, **REF)
    opt2.load_state_dict(opt.state_dict())
    for st in opt2.state.values():
        assert st["exp_avg"].dtype == torch.float32
    assert_bitwise(state_tensors(opt), state_tensors(opt2))


# ---------------------------------------------------------------- frozen params and groups


@ALL
def test_frozen_params_skipped_bit_identical_and_not_numbered(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    model[0].bias.requires_grad_(False)
    frozen_before = model[0].bias.detach().clone()
    opt = make(info, model)
    # The same run with the frozen tensor left out of the optimizer entirely: tensor ids must agree.
    model_b = copy.deepcopy(model)
    opt_b = info.cls([p for p in model_b.parameters() if p.requires_grad], **{**info.inputs[0], **REF})
    for _ in range(3):
        opt.step(loss_closure(model, x, y))
        opt_b.step(loss_closure(model_b, x, y))
    assert torch.equal(model[0].bias, frozen_before)
    assert_bitwise(weights(model), weights(model_b))
    assert model[0].bias not in opt.state or not opt.state[model[0].bias]


@ALL
def test_tensor_ids_run_across_groups(info: OptimizerInfo):
    x, y = tiny_data()
    model, model_b = tiny_model(), tiny_model()
    opt = make(info, model)
    opt_b = info.cls([{"params": list(model_b[0].parameters())}, {"params": list(model_b[2].parameters())}],
                     **{**info.inputs[0], **REF})
    for _ in range(2):
        opt.step(loss_closure(model, x, y))
        opt_b.step(loss_closure(model_b, x, y))
    assert_bitwise(weights(model), weights(model_b))


@ALL
def test_per_group_lr(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    lr = info.inputs[0]["lr"]
    opt = info.cls([{"params": first, "lr": 0.0}, {"params": second}], **{**info.inputs[0], **REF},
                   perturbation="transient", module=model)
    before = weights(model)
    opt.step(loss_closure(model, x, y))
    after = weights(model)
    assert_bitwise(before[:2], after[:2])
    assert not torch.equal(before[2], after[2])
    assert opt.param_groups[1]["lr"] == lr


@ALL
def test_per_group_weight_decay(info: OptimizerInfo):
    """Group 2's weight_decay λ only adds −lr·λ·θ to group 2 (decoupled or L2 alike, for one step)."""
    x, y = tiny_data()
    wd, lr = 0.5, info.inputs[0]["lr"]
    runs = []
    for group2 in ({}, {"weight_decay": wd}):
        model = tiny_model()
        first, second = list(model[0].parameters()), list(model[2].parameters())
        opt = info.cls([{"params": first}, {"params": second, **group2}], **{**info.inputs[0], **REF},
                       perturbation="transient", module=model)
        before = weights(model)
        opt.step(loss_closure(model, x, y))
        runs.append(weights(model))
    plain, decayed = runs
    assert_bitwise(plain[:2], decayed[:2])
    for a, b, t0 in zip(plain[2:], decayed[2:], before[2:], strict=True):
        torch.testing.assert_close(b - a, -lr * wd * t0, rtol=1e-3, atol=1e-6)


def test_sparse_parameters_are_refused():
    p = torch.nn.Parameter(torch.randn(3, 3).to_sparse())
    for info in OPTIMIZERS:
        with pytest.raises(ValueError, match="sparse parameters are not supported"):
            info.cls([p], **{**info.inputs[0], **REF})


# ---------------------------------------------------------------- safety


@ALL
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("mode", ["inplace", "transient"])
def test_raising_closure_restores_weights(info: OptimizerInfo, exc: BaseException, mode: str):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, perturbation=mode, module=model if mode == "transient" else None)
    opt.step(loss_closure(model, x, y))
    before = weights(model)
    inner = loss_closure(model, x, y)
    n = 0

    def closure():
        nonlocal n
        n += 1
        if n == info.forwards_per_step:  # raise while the weights are perturbed
            raise exc
        return inner()

    with pytest.raises(type(exc)):
        opt.step(closure)
    after = weights(model)
    if mode == "transient":
        assert_bitwise(before, after)
    else:
        for a, b in zip(before, after, strict=True):  # ±ε round trip in float32: a few ulp
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.step_count == 1
    opt.step(loss_closure(model, x, y))  # still usable
    assert opt.step_count == 2


@ALL
@pytest.mark.parametrize("mode", ["inplace", "transient"])
def test_nonfinite_loss_skip(info: OptimizerInfo, mode: str):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, perturbation=mode, module=model if mode == "transient" else None)
    opt.state_bytes()  # creates the buffers
    before, state_before = weights(model), state_tensors(opt)
    seed0 = opt.current_seed
    loss = opt.step(lambda: torch.tensor(float("nan")))
    assert torch.isnan(loss)
    assert opt.skipped_steps == 1 and opt.step_count == 1 and opt.current_seed != seed0
    if mode == "transient":
        assert_bitwise(before, weights(model))
    else:  # the NaN closure does not read the weights; the ±ε round trip leaves a few ulp
        for a, b in zip(before, weights(model), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert_bitwise(state_before, state_tensors(opt))
    opt.step(loss_closure(model, x, y))
    assert not torch.equal(before[0], weights(model)[0])


@ALL
def test_nonfinite_loss_raise(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model, on_nonfinite="raise")
    before = weights(model)
    x, y = tiny_data()
    inner = loss_closure(model, x, y)
    n = 0

    def closure():
        nonlocal n
        n += 1
        return inner() * (float("inf") if n == 2 else 1.0)

    with pytest.raises(NonFiniteLossError, match="non-finite"):
        opt.step(closure)
    assert opt.step_count == 0 and opt.skipped_steps == 0
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- split form, replay, scheduler, maximize


@ALL
def test_replay_with_apply_update_equals_step(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, len(info.inputs) - 1, perturbation="transient", module=model)
    replica = copy.deepcopy(model)
    opt_r = make(info, replica, len(info.inputs) - 1)
    for _ in range(3):
        seed = opt.current_seed
        opt.step(loss_closure(model, x, y, per_example=True))
        opt_r.apply_update(seed, opt.last_projected_grads, **info.extra_kwargs_for_replay(opt.last_extra_scalars))
    assert opt_r.step_count == opt.step_count == 3
    assert_bitwise(weights(model), weights(replica))
    assert_bitwise(state_tensors(opt), state_tensors(opt_r))


@ALL
def test_apply_update_validates_scalars(info: OptimizerInfo):
    opt = make(info, tiny_model())
    with pytest.raises(ValueError, match="num_queries"):
        opt.apply_update(opt.current_seed, torch.zeros(opt.num_queries + 1), **{k: torch.zeros(opt.num_queries)
                                                                               for k in opt.extra_scalars})
    with pytest.raises(TypeError, match="unexpected"):
        opt.apply_update(opt.current_seed, torch.zeros(opt.num_queries), bogus=torch.zeros(1))


@ALL
def test_split_estimate_step_accumulates(info: OptimizerInfo):
    """Two weighted micro-batches: the applied scalars are Σ w·g / Σ w of each micro-batch's own estimate."""
    x, y = tiny_data(n=16)
    model = tiny_model()
    opt = make(info, model, perturbation="transient", module=model)
    replica = copy.deepcopy(model)
    opt_r = make(info, replica)
    seed = opt.current_seed
    halves = [(x[:8], y[:8], 3.0), (x[8:], y[8:], 1.0)]
    # the expected value: each micro-batch estimated alone, by an optimizer of its own at the same seed and state
    alone = []
    for xs, ys, _ in halves:
        m = copy.deepcopy(model)
        o = make(info, m, perturbation="transient", module=m)
        o.estimate(loss_closure(m, xs, ys), seed=seed)
        alone.append(o.take_estimate()[1].double())
    expected = (3.0 * alone[0] + 1.0 * alone[1]) / 4.0
    for xs, ys, w in halves:
        opt.estimate(loss_closure(model, xs, ys), weight=w)
        assert opt.last_projected_grads is None and opt.step_count == 0  # nothing applied yet
    opt.step()
    assert opt.step_count == 1
    # the same float32 g of each micro-batch (same seed, same weights, same closure); the accumulator's weighted
    # sum and division round 3 times in float32: at most 3 · 2^-24 of the largest term, plus the float64 reference
    scale = torch.stack(alone).abs().amax(dim=0)
    assert ((opt.last_projected_grads.double() - expected).abs() <= 4 * 2.0**-24 * scale).all(), (
        opt.last_projected_grads, expected)
    assert (alone[0] - alone[1]).abs().min() > 1e3 * 2.0**-24 * scale.max()  # the micro-batches tell apart
    opt_r.apply_update(seed, opt.last_projected_grads, **opt.last_extra_scalars)
    assert_bitwise(weights(model), weights(replica))


@ALL
def test_estimate_leaves_weights_restored(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model)
    before = weights(model)
    opt.estimate(loss_closure(model, x, y))
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@ALL
def test_take_estimate(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model)
    opt.estimate(loss_closure(model, x, y))
    seed, g, _ = opt.take_estimate()
    assert seed == opt.current_seed and g.shape == (opt.num_queries,) and opt.step_count == 0
    with pytest.raises(RuntimeError, match="no pending estimate"):
        opt.take_estimate()


@ALL
def test_lr_scheduler(info: OptimizerInfo):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, perturbation="transient", module=model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    opt.step(loss_closure(model, x, y))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = weights(model)
    opt.step(loss_closure(model, x, y))
    assert_bitwise(before, weights(model))


@ALL
def test_maximize_equals_minimizing_the_negation(info: OptimizerInfo):
    x, y = tiny_data()
    model, model_b = tiny_model(), tiny_model()
    opt = make(info, model)
    opt_b = make(info, model_b, maximize=True)
    for _ in range(3):
        opt.step(loss_closure(model, x, y))
        inner = loss_closure(model_b, x, y)
        opt_b.step(lambda inner=inner: -inner())
    assert_bitwise(weights(model), weights(model_b))


@ALL
def test_per_example_losses(info: OptimizerInfo):
    x, y = tiny_data()
    model, model_b = tiny_model(), tiny_model()
    opt = make(info, model)
    opt_b = make(info, model_b)
    loss_vec = opt.step(loss_closure(model, x, y, per_example=True))
    loss_mean = opt_b.step(loss_closure(model_b, x, y))
    assert loss_vec.dim() == 0
    torch.testing.assert_close(loss_vec, loss_mean)
    torch.testing.assert_close(opt.last_projected_grads, opt_b.last_projected_grads)
    if info.cls is zo_optim.HELENE:
        assert set(opt.last_extra_scalars) == {"sq_grad_sum"} and not opt_b.last_extra_scalars
    else:
        assert_bitwise(weights(model), weights(model_b))


@ALL
def test_returned_loss_is_l0_or_probe_mean(info: OptimizerInfo):
    """As documented: L(θ) when the optimizer measures it, else the mean of the probe losses (2q for central)."""
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, None)  # the richest input: q > 1 where the table has it
    l0 = loss_closure(model, x, y)()
    seen = []
    closure = loss_closure(model, x, y)

    def recording():
        loss = closure()
        seen.append(loss)
        return loss

    loss = opt.step(recording)
    probes = opt.num_queries * (1 if opt.estimator == "forward" else 2)
    if opt.needs_center_loss or opt.estimator == "forward":
        assert len(seen) == probes + 1
        assert torch.equal(loss, l0)  # the first forward is at θ: bit for bit the loss measured before
    else:
        assert len(seen) == probes
        # the mean of the 2q float32 probe losses: a float32 sum and a division, each within 2q ulp of the mean;
        # one probe's loss instead differs from the mean by ~ε·|g| ≈ 1e-3 · O(1), hundreds of ulps of O(1) losses
        mean = torch.stack(seen).double().mean()
        assert (loss.double() - mean).abs() <= 2 * len(seen) * 2.0**-24 * mean.abs(), (loss, mean, seen)
        assert min((s.double() - mean).abs() for s in seen) > 100 * 2.0**-24 * mean.abs()


# ---------------------------------------------------------------- convergence


@ALL
def test_converges_on_ill_conditioned_quadratic(info: OptimizerInfo):
    torch.manual_seed(0)
    d = 6
    scales = torch.logspace(0, 1, d)
    target = torch.randn(d)
    w = torch.zeros(d, requires_grad=True)

    def closure():
        return 0.5 * (scales * (w - target) ** 2).sum()

    start = closure().item()
    opt = info.cls([w], **{**info.inputs[0], **REF, "lr": info.quadratic_lr})
    for _ in range(300):
        opt.step(closure)
    assert closure().item() < 0.05 * start


@ALL
def test_makes_progress_on_rosenbrock(info: OptimizerInfo):
    w = torch.tensor([-1.0, 1.0], requires_grad=True)

    def closure():
        return (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2

    start = closure().item()
    opt = info.cls([w], **{**info.inputs[0], **REF, "lr": info.rosenbrock_lr})
    for _ in range(400):
        opt.step(closure)
    assert closure().item() < 0.85 * start  # 2-D Rosenbrock from (-1, 1) is slow for ZO: progress only


# ---------------------------------------------------------------- backends


# Not filtered by what imports here: a broken backend must fail these tests (tests/backend_checks.py).
FAST = ["cpu", "triton"]


@ALL
@pytest.mark.parametrize("backend", FAST)
def test_backends_agree_with_reference(info: OptimizerInfo, backend: str):
    backend_or_skip(backend)
    x, y = tiny_data()
    runs = {}
    for b in ("reference", backend):
        model = tiny_model()
        opt = make(info, model, len(info.inputs) - 1, backend=b)
        for _ in range(3):
            opt.step(loss_closure(model, x, y))
        runs[b] = (weights(model), state_tensors(opt))
    for a, c in zip(runs["reference"][0] + runs["reference"][1], runs[backend][0] + runs[backend][1], strict=True):
        # z agrees across backends to a few float32 ulp (libm); Adam-like rules amplify that where ĝ ≈ 0
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-4)


@ALL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_backend_is_the_reference_bit_for_bit(info: OptimizerInfo, dtype: torch.dtype):
    """The chunked backend runs the reference's code slice by slice: whole steps agree bit for bit, with
    Gaussian directions and slices that cut tensors (and Philox counters) in the middle."""
    from zo_optim.ops import chunked

    x, y = tiny_data()
    runs = {}
    for b in ("reference", "chunked"):
        model = tiny_model(dtype=dtype)
        opt = make(info, model, len(info.inputs) - 1, backend=b)
        with patch.object(chunked, "CHUNK_NUMEL", 7):
            for _ in range(3):
                opt.step(loss_closure(model, x, y, per_example=True))
        runs[b] = weights(model) + state_tensors(opt)
    assert_bitwise(runs["reference"], runs["chunked"])


# ZOAdam is left out: its sqrt/division order differs from the reference's in the last ulp
BITWISE = [i for i in OPTIMIZERS if i.cls is not zo_optim.ZOAdam]


@pytest.mark.parametrize("info", BITWISE, ids=ids(BITWISE))
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backends_agree_bitwise_with_rademacher_directions(info: OptimizerInfo, backend: str, dtype: torch.dtype):
    """With ±1 directions no libm call is involved, so the fused ops match the reference bit for bit
    (measured for MeZO, HiZOO with α = 0.3, HELENE and HiSo, fp32 and bf16, 3 steps)."""
    backend_or_skip(backend)
    x, y = tiny_data()
    runs = {}
    for b in ("reference", backend):
        model = tiny_model(dtype=dtype)
        opt = make(info, model, len(info.inputs) - 1, backend=b, distribution="rademacher")
        for _ in range(3):
            opt.step(loss_closure(model, x, y, per_example=True))
        runs[b] = weights(model) + state_tensors(opt)
    assert_bitwise(runs["reference"], runs[backend])


# ---------------------------------------------------------------- failures after the probes, partial passes


@ALL
@pytest.mark.parametrize("mode", ["inplace", "transient"])
def test_error_after_the_probes_restores_weights(info: OptimizerInfo, mode: str, monkeypatch):
    """An interrupt in the data-parallel all-reduce (the weights are still perturbed there) restores them."""
    from zo_optim.optim import _distributed

    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, perturbation=mode, module=model if mode == "transient" else None)
    before = weights(model)

    def interrupted(t):
        raise KeyboardInterrupt

    monkeypatch.setattr(_distributed, "world_size", lambda: 2)
    monkeypatch.setattr(_distributed, "broadcast_seed", lambda seed, device: seed)
    monkeypatch.setattr(_distributed, "sum_across_ranks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.step(loss_closure(model, x, y))
    monkeypatch.undo()
    if mode == "transient":
        assert_bitwise(before, weights(model))
        assert opt._transient.scale == 0.0
    else:
        for a, b in zip(before, weights(model), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.step_count == 0
    opt.step(loss_closure(model, x, y))  # still usable
    assert opt.step_count == 1


def test_mismatched_micro_batch_in_step_restores_weights():
    x, y = tiny_data()
    for mode in ("inplace", "transient"):
        model = tiny_model()
        opt = zo_optim.HELENE(model.parameters(), lr=1e-3, perturbation=mode,
                              module=model if mode == "transient" else None, **REF)
        opt.estimate(loss_closure(model, x, y, per_example=True))
        before = weights(model)
        with pytest.raises(ValueError, match="different scalars"):
            opt.step(loss_closure(model, x, y))  # scalar loss after a per-example micro-batch
        for a, b in zip(before, weights(model), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert opt._perturbation.scale == 0.0


def _two_group_model():
    model = tiny_model()
    return model, [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]


@ALL
def test_perturbation_pass_failing_on_a_later_chunk_undoes_the_earlier_ones(info: OptimizerInfo, monkeypatch):
    import zo_optim.optim.base as base

    x, y = tiny_data()
    model, groups = _two_group_model()
    opt = info.cls(groups, **{**info.inputs[0], **REF})
    before = weights(model)
    second = {id(p) for p in groups[1]["params"]}
    real = ops.perturb_

    def failing_on_group_2(params, *args, **kwargs):
        if any(id(p) in second for p in params):
            raise RuntimeError("chunk 2 failed")
        return real(params, *args, **kwargs)

    monkeypatch.setattr(base.ops, "perturb_", failing_on_group_2)
    with pytest.raises(RuntimeError, match="chunk 2 failed"):
        opt.step(loss_closure(model, x, y))
    monkeypatch.undo()
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    opt.step(loss_closure(model, x, y))  # still usable


@ALL
def test_fused_update_failing_on_a_later_chunk_restores_each_chunk_once(info: OptimizerInfo, monkeypatch):
    x, y = tiny_data()
    model, groups = _two_group_model()
    opt = info.cls(groups, **{**info.inputs[0], **REF, "lr": 0.0})
    before = weights(model)
    real = opt._fused_update
    calls = 0

    def failing_second_chunk(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("chunk 2 failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(opt, "_fused_update", failing_second_chunk)
    with pytest.raises(RuntimeError, match="chunk 2 failed"):
        opt.step(loss_closure(model, x, y))
    for a, b in zip(before, weights(model), strict=True):  # lr = 0: chunk 1 restored by the op, chunk 2 by a pass
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_unusable_backend_on_a_later_chunk_fails_before_any_pass():
    backend_or_skip("cpu")
    x, y = tiny_data()
    model, groups = _two_group_model()

    def closure():
        return ((model[2](torch.tanh(model[0](x)).double()).float() - y) ** 2).mean()

    opt = zo_optim.MeZO(groups, lr=0.0, backend="cpu", seed=0)
    model[2].double()  # after construction, which refuses float64 with backend="cpu" (tests/test_optim_edges.py)
    before = weights(model)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="use backend='reference'"):
            opt.step(closure)
        assert_bitwise(before, weights(model))


# ---------------------------------------------------------------- closure outputs


@ALL
def test_empty_loss_vector_is_refused_and_weights_restored(info: OptimizerInfo):
    model = tiny_model()
    opt = make(info, model)
    before = weights(model)
    with pytest.raises(ValueError, match="empty loss vector"):
        opt.step(lambda: torch.empty(0))
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.step_count == 0


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_overflowing_derived_scalar_is_treated_as_nonfinite(on_nonfinite: str):
    """HiZOO's curvature (L⁺ + L⁻ − 2L0)/2ε² overflows float32 although every loss is finite."""
    model = tiny_model()
    opt = zo_optim.HiZOO(model.parameters(), lr=1e-2, hessian_smooth=0.3, on_nonfinite=on_nonfinite, **REF)
    opt.state_bytes()
    before, state_before = weights(model), state_tensors(opt)
    losses = iter([0.0, 3e38, 3e38])  # L0, L+, L-

    def closure():
        return torch.tensor(next(losses))

    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteLossError):
            opt.step(closure)
        assert opt.step_count == 0
    else:
        opt.step(closure)
        assert opt.skipped_steps == 1
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert_bitwise(state_before, state_tensors(opt))


def test_one_dimensional_loss_of_length_one_is_per_example():
    """The short last micro-batch (B = 1) produces the same scalar kinds as the others."""
    x, y = tiny_data(n=9)
    model = tiny_model()
    opt = zo_optim.HELENE(model.parameters(), lr=1e-3, **REF)
    opt.estimate(loss_closure(model, x[:8], y[:8], per_example=True))
    opt.estimate(loss_closure(model, x[8:], y[8:], per_example=True))
    _, _, extras = opt.take_estimate()
    assert set(extras) == {"sq_grad_sum"}


def test_transient_perturbs_a_parameter_shared_by_a_module_and_its_child_once():
    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(4, 4, bias=False)
            self.w = self.inner.weight  # the same Parameter registered on the parent and the child

        def forward(self, x):
            return self.inner(x).sum() + (x @ self.w.T).sum()

    torch.manual_seed(0)
    model, x = Outer(), torch.randn(3, 4)
    seen = []
    model.inner.register_forward_hook(lambda mod, a, o: seen.append(mod.weight.detach().clone()))
    w0 = model.w.detach().clone()
    opt = zo_optim.MeZO(model.parameters(), lr=0.0, zo_eps=1e-2, seed=0, backend="reference", module=model)
    opt.step(lambda: model(x))
    z = rng.normal(rng.step_seed(0, 0), 0, 16, 0).reshape(4, 4)
    torch.testing.assert_close(seen[0] - w0, 1e-2 * z, rtol=1e-4, atol=1e-6)  # +εz, not +2εz
    assert torch.equal(model.w.detach(), w0)


def test_named_parameters_are_handled_without_torch_support(monkeypatch):
    """Names are extracted by ZOOptimizer itself (torch's Optimizer learned named_parameters() only in 2.6)."""
    seen = []
    real = torch.optim.Optimizer.add_param_group

    def old_torch_add_param_group(self, group):  # what torch < 2.6 accepts: tensors only
        assert all(isinstance(p, torch.Tensor) for p in group["params"])
        seen.append(list(group.get("param_names", [])))
        return real(self, group)

    monkeypatch.setattr(torch.optim.Optimizer, "add_param_group", old_torch_add_param_group)
    model = tiny_model()
    opt = zo_optim.HELENE(model.named_parameters(), clip_lambda=lambda name, p: 2.0 if name == "0.weight" else 1.0,
                          **REF)
    names = [n for n, _ in model.named_parameters()]
    assert seen == [names] and opt.param_groups[0]["param_names"] == names
    assert opt.clip_values(opt.param_groups[0], opt.param_groups[0]["params"]) == [2.0, 1.0, 1.0, 1.0]
    opt.add_param_group({"params": [("extra", torch.nn.Parameter(torch.zeros(2)))], "lr": 0.0})
    assert opt.param_groups[1]["param_names"] == ["extra"]
    with pytest.raises(ValueError, match="Some param names are missing"):
        zo_optim.MeZO([("a", torch.nn.Parameter(torch.zeros(2))), torch.nn.Parameter(torch.zeros(2))], **REF)
