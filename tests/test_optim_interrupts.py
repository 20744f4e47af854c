"""Interrupts anywhere in a step (issue 7, item 4).

A ``KeyboardInterrupt`` (Ctrl-C, or any signal handler that raises) may land at
any bytecode of a step: between two tensors of a pass, between a pass and the
bookkeeping that records the offset, between the per-dtype launches of one op,
between the fused update and the step counter. After ANY interrupted step the
weights must equal the pre-step weights (fp32 within a few ulp in place, exactly
in transient mode) with ``step_count`` unchanged, or the step completed and they
equal those of an uninterrupted replica with ``step_count`` advanced by one.

The signals come from a real interval timer (``setitimer``) or a real SIGINT
(``pthread_kill``) at random delays drawn over one step's duration; the trial
counts are bounded and each group of trials has a wall-clock budget, so the
tests are fast and cannot hang. A correct optimizer passes whatever the timing.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest
import torch

from backend_checks import backend_or_skip
from optim_infos import ALL, OPTIMIZERS, OptimizerInfo, loss_closure, tiny_data, tiny_model, weights

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")


class Boom(Exception):
    """What a user's signal handler might raise instead of KeyboardInterrupt."""


def _two_group_model(seed: int = 0) -> tuple[torch.nn.Module, list[dict]]:
    """The tiny MLP with weights and biases in two groups: a step then runs several chunks per pass."""
    model = tiny_model(seed)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return model, [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _build(info: OptimizerInfo, backend: str, mode: str, seed: int = 0):
    model, groups = _two_group_model(seed)
    kwargs = {**info.inputs[0], "backend": backend, "seed": 77}
    if mode == "transient":
        kwargs["module"] = model
    return model, info.cls(groups, **kwargs)


def _states(opt) -> list[torch.Tensor]:
    return [v.clone() for p in opt._all_params() for v in opt.state[p].values() if torch.is_tensor(v)]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool) -> bool:
    for x, y in zip(a, b, strict=True):
        if exact and not torch.equal(x, y):
            return False
        # a few fp32 ulp of the perturbation round trip (|θ + εu| < 8 here)
        if not exact and not torch.allclose(x, y, rtol=0.0, atol=4e-6):
            return False
    return True


def _arm(kind: str, delay: float) -> threading.Timer | None:
    if kind == "sigint":
        main = threading.main_thread().ident
        timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
        timer.start()
        return timer
    signal.setitimer(signal.ITIMER_REAL, max(delay, 1e-6))
    return None


def _disarm(timer: threading.Timer | None) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0.0)
    if timer is not None:
        timer.cancel()
        timer.join()


def _run_trials(
    info: OptimizerInfo, backend: str, mode: str, trials: int, budget_s: float, warm: int = 3
) -> dict[str, int]:
    """Random interrupts over ``trials`` steps; returns how many were interrupted / completed."""
    x, y = tiny_data()
    model, opt = _build(info, backend, mode)
    twin, ref = _build(info, backend, mode)  # the uninterrupted replica, kept in lockstep
    closure, twin_closure = loss_closure(model, x, y), loss_closure(twin, x, y)
    # one step's duration, to spread the signal over the whole step
    times = []
    for _ in range(warm):  # the first step may compile (numba): time the later ones
        t0 = time.perf_counter()
        opt.step(closure)
        times.append(time.perf_counter() - t0)
        ref.step(twin_closure)
    duration = min(times[1:] or times)
    rnd = random.Random(f"{info.name}-{backend}-{mode}")
    raised = {"alarm": KeyboardInterrupt, "boom": Boom}

    def on_alarm(signum, frame):
        raise raised[current]

    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    counts = {"interrupted": 0, "completed": 0}
    start = time.perf_counter()
    try:
        for trial in range(trials):
            if trial >= 3 and time.perf_counter() - start > budget_s:
                break
            current = ("alarm", "boom", "sigint")[trial % 3]
            before, before_state, t = weights(model), _states(opt), opt.step_count
            delay = rnd.uniform(0.0, 0.6 * duration)
            timer = None
            try:
                try:
                    timer = _arm(current, delay)
                    opt.step(closure)
                finally:
                    _disarm(timer)
            except (KeyboardInterrupt, Boom):
                pass
            if opt.step_count == t:
                counts["interrupted"] += 1
                assert opt.pending_seed is None
                assert _close(weights(model), before, exact=mode == "transient"), (trial, delay)
                assert _close(_states(opt), before_state, exact=True), trial
                # re-synchronise bit for bit (the in-place round trip may have left a few ulp)
                with torch.no_grad():
                    for p, b in zip(model.parameters(), twin.parameters(), strict=True):
                        p.copy_(b)
            else:
                assert opt.step_count == t + 1, (trial, opt.step_count, t)
                counts["completed"] += 1
                ref.step(twin_closure)
                assert _close(weights(model), weights(twin), exact=True), trial
                assert _close(_states(opt), _states(ref), exact=True), trial
                assert opt.skipped_steps == ref.skipped_steps
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, old_alarm)
    # the handlers the step found are the ones it leaves
    assert signal.getsignal(signal.SIGALRM) is old_alarm
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    return counts


@ALL
@pytest.mark.parametrize("mode", ["inplace", "transient"])
def test_random_interrupts_cpu_backend(info: OptimizerInfo, mode: str):
    backend_or_skip("cpu")
    counts = _run_trials(info, "cpu", mode, trials=60, budget_s=1.5)
    assert counts["interrupted"] > 0


@ALL
def test_random_interrupts_reference_backend(info: OptimizerInfo):
    counts = _run_trials(info, "reference", "inplace", trials=12, budget_s=1.0)
    assert counts["interrupted"] > 0


def test_random_interrupts_triton_backend():
    backend_or_skip("triton")
    # the interpreter takes ~1 s per step: one optimizer, the one whose passes read a preconditioner
    info = next(i for i in OPTIMIZERS if i.name == "HiZOO")
    counts = _run_trials(info, "triton", "inplace", trials=3, budget_s=2.0, warm=1)
    assert counts["interrupted"] > 0


# ---------------------------------------------------------------- deterministic windows


def _interrupting(info: OptimizerInfo):
    """The optimizer class with a SIGINT sent from inside its passes (what a Ctrl-C mid-pass does)."""

    class Interrupting(info.cls):  # type: ignore[misc, valid-type]
        fire_in = ""  # "perturb" (after the first chunk of a perturbation pass) or "update" (after a chunk's update)

        def _perturb_chunk(self, *args, **kwargs):
            super()._perturb_chunk(*args, **kwargs)
            if self.fire_in == "perturb":
                self.fire_in = ""
                signal.raise_signal(signal.SIGINT)

        def _fused_update(self, *args, **kwargs):
            super()._fused_update(*args, **kwargs)
            if self.fire_in == "update":
                self.fire_in = ""
                signal.raise_signal(signal.SIGINT)

    return Interrupting


@ALL
def test_sigint_inside_a_pass_surfaces_at_a_consistent_point(info: OptimizerInfo):
    x, y = tiny_data()
    model, groups = _two_group_model()
    opt = _interrupting(info)(groups, **info.inputs[0], backend="reference", seed=5)
    twin, twin_groups = _two_group_model()
    ref = info.cls(twin_groups, **info.inputs[0], backend="reference", seed=5)
    before = weights(model)
    opt.fire_in = "perturb"
    with pytest.raises(KeyboardInterrupt):
        opt.step(loss_closure(model, x, y))
    # the interrupt waited for the pass and its bookkeeping, then the step restored the weights
    assert opt.step_count == 0 and opt.pending_seed is None
    assert _close(weights(model), before, exact=False)
    with torch.no_grad():
        for p, b in zip(model.parameters(), before, strict=True):
            p.copy_(b)
    opt.fire_in = "update"
    with pytest.raises(KeyboardInterrupt):
        opt.step(loss_closure(model, x, y))
    # the update ran to the end, so the step counts, and it is the uninterrupted step
    ref.step(loss_closure(twin, x, y))
    assert opt.step_count == 1
    assert _close(weights(model), weights(twin), exact=True)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@ALL
@pytest.mark.parametrize("mode", ["inplace", "transient"])
@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_exception_from_the_closure_at_each_probe(info: OptimizerInfo, mode: str, error: type[BaseException]):
    x, y = tiny_data()
    model, opt = _build(info, "reference", mode)
    good = loss_closure(model, x, y)
    opt.step(good)  # the state buffers exist from the first step on
    for k in range(info.forwards_per_step):

        def closure(calls=[0], k=k):  # noqa: B006 (a per-loop counter)
            calls[0] += 1
            if calls[0] == k + 1:
                raise error("probe")
            return good()

        before, state = weights(model), _states(opt)
        with pytest.raises(error):
            opt.step(closure)
        assert opt.step_count == 1 and opt.pending_seed is None, k
        assert _close(weights(model), before, exact=mode == "transient"), k
        assert _close(_states(opt), state, exact=True), k
    # a failing second micro-batch leaves the first one pending
    opt.estimate(good)
    calls = [0]

    def fail_second():
        calls[0] += 1
        if calls[0] == 2:
            raise error("probe")
        return good()

    with pytest.raises(error):
        opt.estimate(fail_second)
    assert opt.pending_seed == opt.current_seed
    opt.step()
    assert opt.step_count == 2


def test_the_closure_stays_interruptible():
    model = tiny_model()
    opt = OPTIMIZERS[0].cls(model.parameters(), lr=1e-2, backend="reference", seed=0)
    before = weights(model)

    def slow_closure():
        deadline = time.perf_counter() + 5.0
        while time.perf_counter() < deadline:  # a long forward, in Python bytecode
            pass
        return model(torch.ones(1, 5)).sum()

    def on_alarm(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            opt.step(slow_closure)
        assert time.perf_counter() - t0 < 2.0  # not deferred to the end of the closure
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, old)
    assert _close(weights(model), before, exact=False) and opt.step_count == 0


def test_gate_defers_replays_once_and_puts_handlers_back():
    from zo_optim.optim._interrupts import SignalGate

    seen: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with SignalGate():
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
            assert seen == []  # deferred
        assert seen == [signal.SIGUSR1]  # replayed once, after the critical section
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt), SignalGate():
            signal.raise_signal(signal.SIGINT)
            seen.append(-1)  # still runs: the interrupt waits for the end of the section
        assert seen[-1] == -1
        # outside the main thread the gate installs nothing (it could not; and no handler runs there)
        out: list[object] = []
        worker = threading.Thread(target=lambda: out.append(SignalGate().__enter__()._saved))
        worker.start()
        worker.join()
        assert out == [{}]
    finally:
        signal.signal(signal.SIGUSR1, old)
