"""Edges of the step protocol that real errors reach (issue 22, optimizer core).

* an op that fails part-way through a pass (an allocation failure on the third tensor, a failed kernel
  launch on the second dtype group): the pass is all or nothing, and an update that failed part-way is
  finished by ``step()`` instead of being lost (or applied twice);
* a parameter reassigned between steps (``p.data = ...``): refused before any write;
* transient mode + ``add_param_group``; transient mode + ``torch.compile``;
* what the constructor refuses; per-example losses of different lengths inside one estimate.

Faults are injected by wrapping the public ops (``zo_optim.ops.perturb_`` and the fused update ops) with a
function that runs the real op tensor by tensor, in order, and raises on a chosen tensor: a backend that
fails part-way through its list, whatever list the pass engine hands it.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import zo_optim
from optim_infos import (
    ALL,
    OPTIMIZERS,
    OptimizerInfo,
    assert_bitwise,
    loss_closure,
    make_optimizer,
    tiny_data,
    tiny_model,
    weights,
)
from zo_optim import ops

SEED = 22
make = partial(make_optimizer, seed=SEED)
UPDATE_OPS = ("sgd_update_", "adamw_update_", "precond_sgd_update_", "helene_update_")


def state_tensors(opt) -> list[torch.Tensor]:
    return [v.clone() for p in opt._trainable() for v in opt.state[p].values() if torch.is_tensor(v)]


class Fault:
    """Wrap ops so that they run tensor by tensor and raise on the ``n``-th time they reach ``target``."""

    def __init__(self, monkeypatch, target: torch.Tensor, n: int, names=("perturb_",)) -> None:
        self.target, self.n, self.seen = target, n, 0
        for name in names:
            monkeypatch.setattr(ops, name, self._wrap(getattr(ops, name)))

    def _wrap(self, real):
        def run(params, ids, *args, **kwargs):
            per_tensor = [k for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(params)]
            for j, (p, i) in enumerate(zip(params, ids, strict=True)):
                if p is self.target:
                    self.seen += 1
                    if self.seen == self.n:
                        raise RuntimeError("CUDA out of memory (injected)")
                one = {k: (v[j:j + 1] if k in per_tensor else v) for k, v in kwargs.items()}
                real([p], [i], *args, **one)

        return run


# ---------------------------------------------------------------- 1. a pass that fails part-way


@ALL
@pytest.mark.parametrize("call", ["step", "estimate"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mode", ["inplace", "transient"])
def test_perturbation_pass_failing_inside_an_op_is_taken_back(
    info: OptimizerInfo, mode: str, call: str, n: int, monkeypatch
):
    """The op fails on the third of four tensors after writing the first two, in the n-th perturbation pass.

    Before the fix the pass engine took back whole op calls only: the two tensors the failed call had
    written stayed off by s·z (|s| = ε or 2ε: ~1e-3..5e-3 here). Bound: each tensor is moved and moved back
    in float32 by |s·z| <= 2e-3·6 from |θ| < 3, so the round trip is off by a few ulp of 3 (< 1e-6).
    Transient: the failing hook's module is restored from its backup, so bit for bit."""
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, module=model if mode == "transient" else None)
    # perturbation passes (q = 1): +ε (and −2ε for central); the restore is fused into step's update, a pass of
    # its own after an in-place estimate, a copy in transient mode
    passes = (2 if opt.estimator == "central" else 1) + (call == "estimate" and mode == "inplace")
    if n > passes:
        pytest.skip(f"{call} makes {passes} perturbation passes")
    before = weights(model)
    Fault(monkeypatch, model[2].weight, n)
    with pytest.raises(RuntimeError, match="injected"):
        getattr(opt, call)(loss_closure(model, x, y))
    monkeypatch.undo()
    if mode == "transient":
        assert_bitwise(before, weights(model))
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert opt.step_count == 0 and opt.pending_seed is None
    opt.step(loss_closure(model, x, y))  # still usable
    assert opt.step_count == 1


@pytest.mark.skipif("cpu" not in ops.available_backends("cpu"), reason="needs the cpu (numba) backend")
def test_failed_launch_on_the_second_dtype_group_is_taken_back(monkeypatch):
    """A fused backend writes one dtype group per launch (Triton); the second group's launch fails.

    Emulated on the numba backend by an op that writes the float32 tensors and raises on the bfloat16 one.
    The float32 tensors must come back to θ (round trip in float32: < 1e-6 as above)."""
    x, y = tiny_data()
    model = tiny_model()
    model[2].bias.data = model[2].bias.data.bfloat16()

    def closure():
        return ((model(x) - y) ** 2).mean()

    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, backend="cpu", seed=SEED)
    before = weights(model)
    real, calls = ops.perturb_, []

    def launch_per_dtype(params, ids, *args, **kwargs):
        calls.append([p.dtype for p in params])
        for dtype in dict.fromkeys(p.dtype for p in params):
            if dtype == torch.bfloat16 and len(calls) > 1:
                raise RuntimeError("triton launch failed (injected)")
            sel = [j for j, p in enumerate(params) if p.dtype == dtype]
            real([params[j] for j in sel], [ids[j] for j in sel], *args, **kwargs)

    monkeypatch.setattr(ops, "perturb_", launch_per_dtype)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step(closure)
    monkeypatch.undo()
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # one call per dtype: the pass engine knows which group was written
    assert all(len(set(c)) == 1 for c in calls)


@pytest.mark.parametrize("positional", [False, True])
def test_chunked_perturbation_failing_inside_a_tensor_is_taken_back(positional: bool, monkeypatch):
    """The chunked backend perturbs a tensor slice by slice: an allocation failure on the second slice of
    model[2].weight (21 elements, slices of 8) used to leave its first slice moved by ε·z (~1e-3). The op now
    takes back the slices it moved (the pass engine the tensors before): round trip, < 1e-6 as above."""
    from zo_optim.ops import chunked, reference

    monkeypatch.setattr(chunked, "CHUNK_NUMEL", 8)
    x, y = tiny_data()
    model = tiny_model()
    target_id = 2  # model[2].weight: trainable position 2
    real_z = reference._z

    def failing_z(seed, tensor_id, like, query, distribution, dtype, offset):
        if tensor_id == target_id and offset == 8:
            raise RuntimeError("out of memory (injected)")
        return real_z(seed, tensor_id, like, query, distribution, dtype, offset)

    monkeypatch.setattr(reference, "_z", failing_z)
    before = weights(model)
    if positional:  # the op called directly, scale positional
        params = list(model.parameters())
        with pytest.raises(RuntimeError, match="injected"), torch.no_grad():
            chunked.perturb_([params[2]], [2], SEED, 1e-3)
    else:
        opt = zo_optim.MeZO(model.parameters(), lr=1e-2, backend="chunked", seed=SEED)
        with pytest.raises(RuntimeError, match="injected"):
            opt.step(loss_closure(model, x, y))
    monkeypatch.undo()
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def _clean_run(info: OptimizerInfo, mode: str, steps: int):
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, module=model if mode == "transient" else None)
    for _ in range(steps):
        opt.step(loss_closure(model, x, y))
    return weights(model), state_tensors(opt)


@ALL
@pytest.mark.parametrize("mode", ["inplace", "transient"])
def test_update_failing_part_way_is_finished_by_step_exactly_once(info: OptimizerInfo, mode: str, monkeypatch):
    """The fused update fails on the third of four tensors (after writing the first two) at step 2.

    Before the fix the estimate was dropped: the first tensors kept their update, the counter stayed at 1,
    and the retry (a new step(closure) with the same seed) updated them a second time. Now the failed step
    stays pending with its progress; step() applies the remaining tensors; the run then equals a clean run.
    Transient: bitwise (nothing is perturbed in place). In place: the tensors after the failure are restored
    by a pass and updated by another instead of one fused pass, so they may differ by the round trip's
    rounding: a few float32 ulp of |θ| < 3 (atol 1e-6), while a second update differs by lr·|ĝ| >> 1e-4."""
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model, module=model if mode == "transient" else None)
    opt.step(loss_closure(model, x, y))
    Fault(monkeypatch, model[2].weight, 1, UPDATE_OPS)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step(loss_closure(model, x, y))
    monkeypatch.undo()
    assert opt.step_count == 1
    assert not opt.weights_perturbed
    with pytest.raises(RuntimeError, match="failed part-way"):
        opt.estimate(loss_closure(model, x, y))  # the rest first: an estimate would be folded into this step
    with pytest.raises(RuntimeError, match="failed part-way"):
        opt.take_estimate()
    with pytest.raises(RuntimeError, match="failed part-way"):
        opt.apply_update(0, [0.0] * opt.num_queries)
    with pytest.raises(RuntimeError, match="failed part-way"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="failed part-way"):
        opt.step(loss_closure(model, x, y))
    opt.step()  # the rest of step 2
    assert opt.step_count == 2 and opt.pending_seed is None
    opt.step(loss_closure(model, x, y))
    want_w, want_s = _clean_run(info, mode, 3)
    got_w, got_s = weights(model), state_tensors(opt)
    if mode == "transient":
        assert_bitwise(want_w + want_s, got_w + got_s)
    else:
        for a, b in zip(want_w + want_s, got_w + got_s, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@ALL
def test_apply_update_failing_part_way_is_finished_by_step(info: OptimizerInfo, monkeypatch):
    """apply_update (replay, federated) fails part-way: the rest is applied by step(), never twice (bitwise:
    apply_update has no perturbation to restore)."""
    x, y = tiny_data()
    probe = tiny_model()
    probing = make(info, probe)
    probing.estimate(loss_closure(probe, x, y, per_example=True))
    seed, grads, extras = probing.take_estimate()
    kwargs = info.extra_kwargs_for_replay(extras)
    model = tiny_model()
    opt = make(info, model)
    clean = tiny_model()
    ref = make(info, clean)
    ref.apply_update(seed, grads, **kwargs)
    Fault(monkeypatch, model[2].weight, 1, UPDATE_OPS)
    with pytest.raises(RuntimeError, match="injected"):
        opt.apply_update(seed, grads, **kwargs)
    monkeypatch.undo()
    assert opt.step_count == 0
    opt.step()
    assert opt.step_count == 1
    assert_bitwise(weights(clean) + state_tensors(ref), weights(model) + state_tensors(opt))


# ---------------------------------------------------------------- 2. a parameter reassigned between steps


def _quadratic():
    """Two param groups of plain tensors and a loss that works for any shape of b (so that only the
    optimizer can notice that b was reassigned)."""
    a = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5))
    b = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def closure():
        return ((a - 0.3) ** 2).sum() + ((b - 1.0) ** 2).sum()

    return a, b, closure


@ALL
@pytest.mark.parametrize("where", ["before_step", "between_estimate_and_step"])
def test_parameter_reassigned_between_steps_is_refused_before_any_write(info: OptimizerInfo, where: str):
    """b.data is replaced by a tensor of another shape after step 1. Its state no longer matches: the update
    of group 2 used to fail after group 1 was updated, on every retry, with the counter at 1. Now it is refused
    before the first write, and a retry after putting b back is bitwise the clean run."""
    a, b, closure = _quadratic()
    opt = make(info, [{"params": [a]}, {"params": [b]}], None)  # the richest input: every one has state
    opt.step(closure)
    kept = b.data
    if where == "between_estimate_and_step":
        opt.estimate(closure)
    a_before = a.detach().clone()
    for _ in range(2):
        b.data = torch.zeros(4)
        with pytest.raises(ValueError, match=r"reassigned \(p.data = ...\)"):
            if where == "before_step":
                opt.step(closure)
            else:
                opt.step()
        assert torch.equal(a, a_before), "group 1 was written"
        assert opt.step_count == 1
    b.data = kept
    if where == "before_step":
        opt.step(closure)
    else:
        opt.step()
    ra, rb, rclosure = _quadratic()
    ref = make(info, [{"params": [ra]}, {"params": [rb]}], None)
    ref.step(rclosure)
    if where == "before_step":
        ref.step(rclosure)
    else:
        ref.estimate(rclosure)
        ref.step()
    assert_bitwise([ra, rb, *state_tensors(ref)], [a, b, *state_tensors(opt)])


@ALL
def test_inference_tensor_swapped_in_is_refused_before_any_pass(info: OptimizerInfo):
    a, b, closure = _quadratic()
    opt = make(info, [{"params": [a]}, {"params": [b]}])
    opt.step(closure)
    before = [a.detach().clone(), b.detach().clone()]
    with torch.inference_mode():
        swapped = b.detach().clone()
    b.data = swapped
    with pytest.raises(RuntimeError, match=r"param group 1 cannot be stepped.*inference tensor"):
        opt.step(closure)
    assert_bitwise(before, [a.detach(), b.detach()])


# ---------------------------------------------------------------- 3. transient mode + add_param_group


def _grown_run(info: OptimizerInfo, mode: str):
    """Steps on model[0] only, then a new module appended to the model and added as a param group."""
    x, y = tiny_data()
    model = tiny_model()
    torch.manual_seed(5)
    head = torch.nn.Linear(3, 3)
    opt = make(info, model[0].parameters(), module=model if mode == "transient" else None)
    opt.step(loss_closure(model, x, y))
    model.append(head)
    opt.add_param_group({"params": list(head.parameters())})
    for _ in range(3):
        opt.step(loss_closure(model, x, y))
    return weights(model)


@ALL
def test_transient_parameters_added_after_the_first_step_are_perturbed(info: OptimizerInfo):
    """Before the fix, a module appended after attach() had no hooks: its parameters were never perturbed
    (their share of every g was 0) but were updated along z. Transient must match in-place: both measure the
    same probes up to the in-place round trip's float32 rounding (θ+εz−2εz vs θ−εz: an ulp of the weights,
    ~1e-7, in the losses, so Δg ~ 1e-7/ε = 1e-4 and Δθ ~ lr·Δg·|z| < 1e-5 per step; ZOAdam's 1/√v amplifies
    it: measured <= 3e-5 over the 4 steps). Without the head's perturbation the runs differ by >= 2e-3
    (measured on all five optimizers), so atol 1e-4 tells the two apart."""
    inplace, transient = _grown_run(info, "inplace"), _grown_run(info, "transient")
    for a, b in zip(inplace, transient, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_transient_add_param_group_outside_the_attached_model_is_refused():
    x, y = tiny_data()
    model = tiny_model()
    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, seed=SEED, backend="reference", module=model)
    opt.step(loss_closure(model, x, y))
    stray = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not registered on any sub-module of the attached module"):
        opt.add_param_group({"params": list(stray.parameters())})
    assert len(opt.param_groups) == 1  # not kept
    opt.step(loss_closure(model, x, y))


def test_transient_use_check_runs_again_after_add_param_group():
    """A parameter added after the first estimate and read outside its module (a regulariser in the closure)
    is named in the refusal; before the fix the check had run and was never repeated."""
    x, y = tiny_data()
    model = tiny_model()
    opt = zo_optim.MeZO(model[0].parameters(), lr=1e-2, seed=SEED, backend="reference", module=model)
    base = loss_closure(model, x, y)
    opt.step(lambda: base() + 1e-3 * model[2].weight.square().sum())  # model[2] is not optimised yet: fine
    opt.add_param_group({"params": [model[2].weight]})
    before = weights(model)
    with pytest.raises(ValueError, match=r"2\.weight \(read by"):
        opt.step(lambda: base() + 1e-3 * model[2].weight.square().sum())
    assert_bitwise(before, weights(model))


def test_parameters_are_named_in_errors_without_a_question_mark():
    """The transient refusal used "?" for a parameter its attached model did not name; the fallback is the
    name of a named param group, else the trainable position and shape."""
    w, v = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    named = zo_optim.MeZO([("enc.w", w)], lr=1e-2, seed=SEED)
    assert named._param_label(id(w)) == "enc.w"
    plain = zo_optim.MeZO([w, v], lr=1e-2, seed=SEED)
    plain._refresh_layout()
    assert plain._param_label(id(v)) == "trainable parameter 1 (shape (4,))"


# ---------------------------------------------------------------- 4. torch.compile with transient hooks


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_transient_mode_under_torch_compile_matches_eager(backend: str):
    """Before the fix Dynamo traced the hooks and the use watch (into ops' checks) and crashed at the first
    estimate. Now they run eagerly between compiled graphs: the run is bitwise the uncompiled one."""
    torch._dynamo.reset()
    x, y = tiny_data()
    runs = []
    for compiled in (False, True):
        model = tiny_model()
        opt = zo_optim.ZOAdam(model.parameters(), lr=1e-2, seed=SEED, backend="reference", module=model)
        fwd = torch.compile(model, backend=backend) if compiled else model  # compiled after attach()
        for _ in range(3):
            opt.step(lambda fwd=fwd: ((fwd(x) - y) ** 2).mean())
        runs.append(weights(model))
    assert_bitwise(*runs)


def test_transient_use_check_still_works_under_torch_compile():
    torch._dynamo.reset()
    x, y = tiny_data()
    model = tiny_model()
    fwd = torch.compile(model, backend="eager")
    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, seed=SEED, backend="reference", module=model)
    before = weights(model)
    with pytest.raises(ValueError, match=r"2\.weight \(read by"):
        opt.step(lambda: ((fwd(x) - y) ** 2).mean() + 1e-3 * model[2].weight.square().sum())
    assert_bitwise(before, weights(model))


# ---------------------------------------------------------------- 5. refused at construction; batch lengths


@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
def test_complex_parameters_are_refused_when_given(how: str):
    w = torch.nn.Parameter(torch.ones(3))
    z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex64: only float32, bfloat16, float16"):
        if how == "constructor":
            zo_optim.MeZO([w, z], lr=1e-2, seed=SEED)
        else:
            opt = zo_optim.MeZO([w], lr=1e-2, seed=SEED)
            try:
                opt.add_param_group({"params": [z]})
            finally:
                assert len(opt.param_groups) == 1
    # frozen, it is no trainable parameter
    z.requires_grad_(False)
    zo_optim.MeZO([w, z], lr=1e-2, seed=SEED)


@pytest.mark.skipif("cpu" not in ops.available_backends("cpu"), reason="needs the cpu backend")
def test_float64_with_the_cpu_backend_is_refused_when_given():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="use backend='reference'"):
        zo_optim.MeZO([w], lr=1e-2, seed=SEED, backend="cpu")
    zo_optim.MeZO([w], lr=1e-2, seed=SEED, backend="auto")  # auto runs float64 on the plain-torch backend


@ALL
@pytest.mark.parametrize("second", ["shorter", "scalar"])
def test_per_example_losses_of_different_lengths_in_one_estimate_are_refused(info: OptimizerInfo, second: str):
    """MeZO averaged the two lengths silently (a difference of two different losses); HELENE failed in
    torch.stack. Every optimizer now refuses it with one ValueError, weights restored."""
    x, y = tiny_data()
    model = tiny_model()
    opt = make(info, model)
    full = loss_closure(model, x, y, per_example=True)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        losses = full()
        if calls == 1:
            return losses
        return losses[:-1] if second == "shorter" else losses.mean()

    before = weights(model)
    with pytest.raises(ValueError, match="every call of one estimate must evaluate the same batch"):
        opt.step(closure)
    for a, b in zip(before, weights(model), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert opt.pending_seed is None and opt.step_count == 0


def test_optimizer_table_is_covered():
    assert {i.name for i in OPTIMIZERS} == {"MeZO", "ZOAdam", "HiZOO", "HELENE", "HiSo"}
