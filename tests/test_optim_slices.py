"""Errors inside one tensor of the ``chunked`` backend, and a second error while a pass is taken back (issue 22).

* The chunked backend writes a tensor slice by slice. An update that fails between two slices keeps the
  slices it wrote; the pass engine records the element it stopped at, restores the rest of the tensor from
  there, and ``step()`` updates it from there: every element is θ_new or θ after the error (per element,
  never one element both or updated twice), and the finished run is bit-identical to an error-free one.
* A perturbation pass that fails inside a tensor is taken back to exactly what a complete pass and its restore
  leave (θ + ε·z − ε·z in float32), and the untouched elements keep θ bit for bit.
* A second error while a pass is taken back: ``WeightsNotRestoredError``, and every later call but
  ``load_state_dict`` is refused until a checkpoint is loaded.

Faults are real torch errors: the reference op (which the chunked backend runs on a slice) makes a 4 TiB
allocation at the chosen tensor or slice (``RuntimeError: DefaultCPUAllocator: can't allocate memory``), placed
in ``reference._store``: after the op has computed the new optimizer states, before its first write.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

import zo_optim
from optim_infos import ALL, OptimizerInfo, assert_bitwise, make_optimizer, weights
from zo_optim import ops, rng
from zo_optim.ops import chunked, reference

SEED = 2207
C = 64  # elements per slice in these tests (chunked.CHUNK_NUMEL): the tensors below have 1 to 6 slices
OOM = "can't allocate memory"
make = partial(make_optimizer, seed=SEED, backend="chunked")


def oom() -> None:
    torch.empty((1 << 42,), dtype=torch.uint8)  # 4 TiB: the allocator refuses (a real torch RuntimeError)


def odd_model(layout: str = "contiguous") -> torch.nn.Module:
    """Tensors of 377, 29, 319 and 11 elements (trainable ids 0..3), random weights; ``transposed``: the two
    weights are non-contiguous views (the dispatcher runs the op on a copy and writes it back)."""
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(13, 29), torch.nn.Tanh(), torch.nn.Linear(29, 11))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if layout == "transposed":
        for m in (model[0], model[2]):
            m.weight = torch.nn.Parameter(m.weight.detach().t().contiguous().t())
            assert not m.weight.is_contiguous()
    return model


def closure_of(model: torch.nn.Module):
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(12, 13, generator=g), torch.randn(12, 11, generator=g)

    def closure() -> torch.Tensor:
        return ((model(x) - y) ** 2).mean()

    return closure


def states(opt) -> list[list[torch.Tensor]]:
    """Per trainable parameter, copies of its state tensors of the parameter's shape, in a fixed order."""
    return [[v.detach().clone() for _, v in sorted(opt.state[p].items()) if torch.is_tensor(v) and v.shape == p.shape]
            for p in opt._trainable()]


def flat(ts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [t for per in ts for t in per]


class StoreFault:
    """Make the reference op fail at element ``offset`` of tensor ``tid`` (the slice starting there): after the
    new states are computed, before the first write. ``slot`` 0: the update ops, 1: perturbation passes."""

    def __init__(self, m: pytest.MonkeyPatch, tid: int, offset: int, slot: int, nth: int = 1) -> None:
        self.hits = 0
        real = reference._store

        def store(param, value, seed, tensor_id, rounding, rounding_slot, off, *states):
            if (tensor_id, off, rounding_slot) == (tid, offset, slot):
                self.hits += 1
                if self.hits == nth:
                    oom()
            real(param, value, seed, tensor_id, rounding, rounding_slot, off, *states)

        m.setattr(reference, "_store", store)


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_NUMEL", C)


def clean(info: OptimizerInfo, mode: str, layout: str, steps: int):
    model = odd_model(layout)
    opt = make(info, model, None, module=model if mode == "transient" else None)
    for _ in range(steps):
        opt.step(closure_of(model))
    return weights(model), states(opt)


# ---------------------------------------------------------------- 1. an update that fails between two slices


@ALL
@pytest.mark.parametrize(("mode", "layout"), [("inplace", "contiguous"), ("transient", "contiguous"),
                                              ("inplace", "transposed")])
@pytest.mark.parametrize(("tid", "k"), [(0, 3), (2, 2)])
def test_update_failing_between_slices_is_finished_exactly(info: OptimizerInfo, mode: str, layout: str, tid: int,
                                                           k: int, monkeypatch):
    """The fused update of step 2 fails at slice k of tensor ``tid``.

    Before: the engine restored the whole failed tensor (its first k slices, already restored and updated,
    moved again by ε·z) and step() updated it whole a second time. Now, right after the error: the tensors
    before it and its first k slices hold the error-free step's weights and states bit for bit; every other
    element has the states of step 1 bit for bit and the weights of step 1 up to the restore's round trip
    (float32, |ε·z| <= 1e-3·6 on |θ| < 3: a few ulp, atol 1e-6; bit for bit in transient mode), while the
    update moves them by lr·|ĝ| >> 1e-5 (checked, so "not updated" is told apart). step() then finishes it:
    bit-identical to the error-free run (the explicit restore computes the same float32 θ + s·u that the fused
    op would), and so is the next step."""
    model = odd_model(layout)
    opt = make(info, model, None, module=model if mode == "transient" else None)
    closure = closure_of(model)
    opt.step(closure)
    w1, s1 = weights(model), states(opt)
    w2, s2 = clean(info, mode, layout, 2)
    with monkeypatch.context() as m:
        fault = StoreFault(m, tid, k * C, slot=0)
        with pytest.raises(RuntimeError, match=OOM):
            opt.step(closure)
        assert fault.hits == 1
    assert opt.step_count == 1 and opt.pending_seed is not None and not opt.weights_perturbed
    got_w, got_s = weights(model), states(opt)
    for j in range(len(w1)):
        cut = w1[j].numel() if j < tid else (k * C if j == tid else 0)  # flat elements updated
        new, old = w2[j].reshape(-1), w1[j].reshape(-1)
        now = got_w[j].reshape(-1)
        assert_bitwise([new[:cut]], [now[:cut]])
        for a, b, c in zip(s2[j], s1[j], got_s[j], strict=True):
            assert_bitwise([a.reshape(-1)[:cut], b.reshape(-1)[cut:]], [c.reshape(-1)[:cut], c.reshape(-1)[cut:]])
        if mode == "transient":
            assert_bitwise([old[cut:]], [now[cut:]])
        torch.testing.assert_close(now[cut:], old[cut:], rtol=0, atol=1e-6)
        moved = (new[cut:] - old[cut:]).abs()
        assert moved.numel() == 0 or (moved > 1e-5).float().mean() > 0.9, "the update must be told apart"
    with pytest.raises(RuntimeError, match=f"first {k * C} elements of the next"):
        opt.step(closure)  # the rest first
    opt.step()
    assert opt.step_count == 2 and opt.pending_seed is None
    assert_bitwise(w2 + flat(s2), weights(model) + flat(states(opt)))
    opt.step(closure)
    w3, s3 = clean(info, mode, layout, 3)
    assert_bitwise(w3 + flat(s3), weights(model) + flat(states(opt)))


@ALL
def test_reference_update_failing_after_its_states_are_computed_writes_nothing(info: OptimizerInfo, monkeypatch):
    """The reference backend (a unit is one whole tensor) fails in the last allocation of tensor 2's update, the
    rounding of the new weights. Before: the op had already copied the new optimizer states (momentum, moments,
    preconditioner) into their buffers, so the engine, which takes a failed unit as unwritten, had step() update
    them a second time. Now every temporary is made before the first write: the finished run equals the clean
    one bit for bit (float32: the restore pass computes the fused op's own θ + s·u)."""
    mk = partial(make_optimizer, seed=SEED)
    model = odd_model()
    opt = mk(info, model, None)
    closure = closure_of(model)
    opt.step(closure)
    with monkeypatch.context() as m:
        StoreFault(m, 2, 0, slot=0)
        with pytest.raises(RuntimeError, match=OOM):
            opt.step(closure)
    opt.step()
    ref = odd_model()
    ref_opt = mk(info, ref, None)
    for _ in range(2):
        ref_opt.step(closure_of(ref))
    assert_bitwise(weights(ref) + flat(states(ref_opt)), weights(model) + flat(states(opt)))


@pytest.mark.parametrize("name", ["ZOAdam", "HiZOO"])
def test_apply_update_failing_between_slices_then_again_is_finished(name: str, monkeypatch):
    """Replay (apply_update, no restore): the update fails at slice 2 of tensor 0, then the finishing step()
    fails again at slice 4 of the same tensor; the second step() finishes it. Each element updated exactly
    once: bit-identical to the clean replay (a twice-updated slice would differ by lr·|ĝ|)."""
    cls = getattr(zo_optim, name)
    probe = odd_model()
    probing = cls(probe.parameters(), lr=1e-2, seed=SEED, backend="chunked")
    probing.estimate(closure_of(probe))
    seed, grads, extras = probing.take_estimate()
    ref_model, model = odd_model(), odd_model()
    ref = cls(ref_model.parameters(), lr=1e-2, seed=SEED, backend="chunked")
    ref.apply_update(seed, grads, **extras)
    opt = cls(model.parameters(), lr=1e-2, seed=SEED, backend="chunked")
    with monkeypatch.context() as m:
        StoreFault(m, 0, 2 * C, slot=0)
        with pytest.raises(RuntimeError, match=OOM):
            opt.apply_update(seed, grads, **extras)
    assert opt.step_count == 0 and opt.pending_seed == seed
    with monkeypatch.context() as m:
        StoreFault(m, 0, 4 * C, slot=0)
        with pytest.raises(RuntimeError, match=OOM):
            opt.step()
    opt.step()
    assert opt.step_count == 1
    assert_bitwise(weights(ref_model) + flat(states(ref)), weights(model) + flat(states(opt)))


def test_resume_inside_a_tensor_refuses_another_backend(monkeypatch):
    """A step stopped inside a chunked tensor can only be finished by the chunked backend (another backend would
    update the whole tensor, its first slices twice): refused, nothing written, and it finishes once put back."""
    model = odd_model()
    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, seed=SEED, backend="chunked")
    with monkeypatch.context() as m:
        StoreFault(m, 0, 3 * C, slot=0)
        with pytest.raises(RuntimeError, match=OOM):
            opt.step(closure_of(model))
    before = weights(model)
    opt.backend = "reference"
    with pytest.raises(RuntimeError, match="backend of a tensor it stopped inside"):
        opt.step()
    assert_bitwise(before, weights(model))
    opt.backend = "chunked"
    opt.step()
    ref = odd_model()
    zo_optim.MeZO(ref.parameters(), lr=1e-2, seed=SEED, backend="chunked").step(closure_of(ref))
    assert_bitwise(weights(ref), weights(model))


# ---------------------------------------------------------------- 2. a perturbation pass that fails inside a tensor


@pytest.mark.parametrize(("tid", "k"), [(0, 2), (2, 4)])
def test_perturbation_failing_between_slices_is_the_exact_round_trip(tid: int, k: int, monkeypatch):
    """The first perturbation pass (+ε·z_0) fails at slice k of tensor ``tid``. The moved elements (the tensors
    before it, its first k slices) are taken back to fl(fl(θ + ε·z) − ε·z), computed here from the RNG contract
    in plain torch: exactly what a complete pass and its restore leave (the restore of every in-place step is
    this round trip; it is not θ itself: see docs/optimizers.md). The others keep θ bit for bit."""
    model = odd_model()
    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, seed=SEED, backend="chunked")
    before, seed, eps = weights(model), opt.current_seed, opt.zo_eps
    with monkeypatch.context() as m:
        StoreFault(m, tid, k * C, slot=1)
        with pytest.raises(RuntimeError, match=OOM):
            opt.step(closure_of(model))
    assert opt.step_count == 0 and opt.pending_seed is None and not opt.weights_perturbed
    for j, (theta, now) in enumerate(zip(before, weights(model), strict=True)):
        cut = theta.numel() if j < tid else (k * C if j == tid else 0)
        z = rng.normal(seed, j, theta.numel(), 0)
        t = theta.reshape(-1)
        want = torch.cat([((t + eps * z) + (-eps) * z)[:cut], t[cut:]])
        assert_bitwise([want], [now.reshape(-1)])
    opt.step(closure_of(model))  # usable
    assert opt.step_count == 1


# ---------------------------------------------------------------- 3. a second error while a pass is taken back


class OpsFault:
    """Wrap ``zo_optim.ops`` ops: run the real op, or raise a real OOM when ``when(name, ids, kwargs)`` is true."""

    def __init__(self, m: pytest.MonkeyPatch, when, names=("perturb_", "sgd_update_")) -> None:
        self.calls: list[tuple[str, list[int], float]] = []
        for name in names:
            real = getattr(ops, name)

            def run(params, ids, *args, _real=real, _name=name, **kwargs):
                self.calls.append((_name, list(ids), kwargs.get("scale", args[1] if len(args) > 1 else None)))
                if when(_name, list(ids), kwargs, args):
                    oom()
                _real(params, ids, *args, **kwargs)

            m.setattr(ops, name, run)


def _scale(kwargs, args) -> float:
    return kwargs["scale"] if "scale" in kwargs else args[1]


def _cases():
    # (what fails first, what fails while it is taken back), as predicates on (op name, tensor ids, kwargs, args)
    perturb_pass = (lambda n, ids, kw, a: n == "perturb_" and ids == [2] and _scale(kw, a) > 0,
                    lambda n, ids, kw, a: n == "perturb_" and ids == [0] and _scale(kw, a) < 0)
    update_restore = (lambda n, ids, kw, a: n == "sgd_update_" and ids == [1],
                      lambda n, ids, kw, a: n == "perturb_" and ids == [3])
    return {"perturbation pass": perturb_pass, "restore of an update": update_restore}


@pytest.mark.parametrize("case", ["perturbation pass", "restore of an update", "closure then restore",
                                  "chunked slice put back"])
def test_second_error_while_taking_back_refuses_until_a_checkpoint_is_loaded(case: str, monkeypatch):
    """A pass fails, and taking it back fails too: the weights are unknown (some may be off by ε·z, some part-
    updated). Before: the second error propagated and the optimizer stepped on from those weights, silently.
    Now: WeightsNotRestoredError naming the way back;
    every later call but load_state_dict is refused; loading the checkpoint's model and optimizer state lifts
    it, and the run then equals an error-free one bit for bit (reference backend: same ops either way)."""
    backend = "chunked" if case == "chunked slice put back" else "reference"
    model = odd_model()
    opt = zo_optim.MeZO(model.parameters(), lr=1e-2, momentum=0.9, seed=SEED, backend=backend)
    closure = closure_of(model)
    opt.step(closure)
    ckpt_model, ckpt_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with monkeypatch.context() as m:
        if case == "closure then restore":
            calls = []

            def failing_closure():
                calls.append(1)
                if len(calls) == 2:  # the second probe (−ε): its restore pass then fails too
                    oom()
                return closure()

            OpsFault(m, lambda n, ids, kw, a: n == "perturb_" and ids == [1] and _scale(kw, a) > 0
                     and len(calls) == 2)
            run = partial(opt.step, failing_closure)
        elif case == "chunked slice put back":
            armed: list[int] = []
            real_store, real_copy = reference._store, torch.Tensor.copy_

            def store(param, value, seed, tensor_id, rounding, slot, off, *states):
                if (tensor_id, off, slot) == (2, 2 * C, 0):  # the update fails on slice 2 of tensor 2 ...
                    armed.append(1)
                    oom()
                real_store(param, value, seed, tensor_id, rounding, slot, off, *states)

            def copy_(self, src, *args, **kwargs):
                if armed:  # ... and so does the copy-back of that slice (the op cannot tell what it wrote)
                    oom()
                return real_copy(self, src, *args, **kwargs)

            m.setattr(reference, "_store", store)
            m.setattr(torch.Tensor, "copy_", copy_)
            run = partial(opt.step, closure)
        else:
            first, again = _cases()[case]
            seen = []

            def when(n, ids, kw, a):
                if not seen and first(n, ids, kw, a):
                    seen.append(1)
                    return True
                return bool(seen) and again(n, ids, kw, a)

            OpsFault(m, when)
            run = partial(opt.step, closure)
        with pytest.raises(zo_optim.WeightsNotRestoredError, match="may still be perturbed") as err:
            run()
    msg = str(err.value)
    assert "opt.load_state_dict" in msg and "model.load_state_dict" in msg
    assert OOM in repr(err.value.__cause__) or isinstance(err.value.__cause__, chunked.PartialWriteError)
    refused = {
        "step": partial(opt.step, closure), "estimate": partial(opt.estimate, closure),
        "state_dict": opt.state_dict, "take_estimate": opt.take_estimate, "restore_weights": opt.restore_weights,
        "apply_update": partial(opt.apply_update, 0, [0.0]), "attach": partial(opt.attach, model),
        "add_param_group": partial(opt.add_param_group, {"params": [torch.nn.Parameter(torch.zeros(2))]}),
    }
    for what, call in refused.items():
        with pytest.raises(RuntimeError, match="refuses to estimate, step or save"):
            call()
        assert what  # (named for the failure report)
    with pytest.raises(ValueError):
        opt.load_state_dict({**ckpt_opt, "zo": {**ckpt_opt["zo"], "step": -1}})  # a refused load keeps it
    with pytest.raises(RuntimeError, match="refuses"):
        opt.step(closure)
    model.load_state_dict(ckpt_model)
    opt.load_state_dict(ckpt_opt)
    opt.step(closure)
    opt.step(closure)
    ref = odd_model()
    ref_opt = zo_optim.MeZO(ref.parameters(), lr=1e-2, momentum=0.9, seed=SEED, backend=backend)
    for _ in range(3):
        ref_opt.step(closure_of(ref))
    assert opt.step_count == 3
    assert_bitwise(weights(ref) + flat(states(ref_opt)), weights(model) + flat(states(opt)))

