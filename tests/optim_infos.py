"""The optimizer table that drives the common optimizer tests (torch's OptimizerInfo style).

Each entry lists the class, constructor inputs that must work, inputs that must
fail (with the exception and a regex of its message), the extra scalars of
``apply_update``, the state bytes per trainable parameter, and settings for the
small convergence problems. Adding an optimizer = adding a row here.

Also the helpers the optimizer test files share: the ``ALL`` / ``ALL_CONFIGS``
parametrizations over the table, ``reference`` kwargs and ``make_optimizer``.
Each test file pins its own seed (``make = partial(make_optimizer, seed=...)``):
the values a test checks were recorded with that seed, so there is no default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import zo_optim
from zo_optim.optim.base import ZOOptimizer


@dataclass(frozen=True)
class ErrorInput:
    kwargs: dict[str, Any]
    error: type[BaseException]
    match: str


@dataclass(frozen=True)
class OptimizerInfo:
    cls: type[ZOOptimizer]
    # constructor kwargs that must work (the first is the "default" configuration used by common tests)
    inputs: list[dict[str, Any]]
    errors: list[ErrorInput]
    # state bytes per trainable parameter for inputs[i] (same order)
    bytes_per_param: list[int]
    # lr that makes the quadratic and the Rosenbrock test converge in their step budgets
    quadratic_lr: float
    rosenbrock_lr: float
    # forwards (closure calls) per step with the default configuration
    forwards_per_step: int
    extra_kwargs_for_replay: Callable[[dict[str, torch.Tensor]], dict[str, Any]] = field(
        default=lambda extras: dict(extras)
    )

    @property
    def name(self) -> str:
        return self.cls.__name__


def _common_errors() -> list[ErrorInput]:
    return [
        ErrorInput(dict(lr=-1.0), ValueError, "Invalid learning rate"),
        ErrorInput(dict(zo_eps=0.0), ValueError, "Invalid zo_eps"),
        ErrorInput(dict(zo_eps=float("nan")), ValueError, "Invalid zo_eps"),
        ErrorInput(dict(zo_eps=1e30), ValueError, "Invalid zo_eps"),
        ErrorInput(dict(zo_eps=1e-50), ValueError, "Invalid zo_eps"),
        ErrorInput(dict(num_queries=0), ValueError, "Invalid num_queries"),
        ErrorInput(dict(distribution="uniform"), ValueError, "Invalid distribution"),
        ErrorInput(dict(backend="cuda"), ValueError, "Invalid backend"),
        ErrorInput(dict(on_nonfinite="ignore"), ValueError, "Invalid on_nonfinite"),
        ErrorInput(dict(perturbation="copy"), ValueError, "Invalid perturbation"),
        ErrorInput(dict(rounding="up"), ValueError, "Invalid rounding"),
        ErrorInput(dict(seed=-1), ValueError, "Invalid seed"),
        ErrorInput(dict(weight_decay=-0.1), ValueError, "Invalid weight_decay"),
    ]


OPTIMIZERS: list[OptimizerInfo] = [
    OptimizerInfo(
        zo_optim.MeZO,
        inputs=[dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, weight_decay=0.1, num_queries=2),
                dict(lr=1e-2, estimator="forward", distribution="rademacher")],
        errors=[*_common_errors(), ErrorInput(dict(momentum=1.5), ValueError, "Invalid momentum"),
                ErrorInput(dict(estimator="backward"), ValueError, "Invalid estimator")],
        bytes_per_param=[0, 4, 0],
        quadratic_lr=2e-2,
        rosenbrock_lr=1e-3,
        forwards_per_step=2,
    ),
    OptimizerInfo(
        zo_optim.ZOAdam,
        inputs=[dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, num_queries=3, estimator="forward")],
        errors=[*_common_errors(), ErrorInput(dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0"),
                ErrorInput(dict(eps=-1.0), ValueError, "Invalid epsilon value")],
        bytes_per_param=[8, 8],
        quadratic_lr=5e-2,
        rosenbrock_lr=2e-2,
        forwards_per_step=2,
    ),
    OptimizerInfo(
        zo_optim.HiZOO,
        inputs=[dict(lr=1e-2, hessian_smooth=1e-3), dict(lr=1e-2, hessian_smooth=0.3, num_queries=2, weight_decay=0.1)],
        errors=[*_common_errors(), ErrorInput(dict(hessian_smooth=2.0), ValueError, "Invalid hessian_smooth"),
                ErrorInput(dict(estimator="forward"), ValueError, "Invalid estimator"),
                ErrorInput(dict(hessian_min=0.0), ValueError, "Invalid hessian_min")],
        bytes_per_param=[4, 4],
        quadratic_lr=2e-2,
        rosenbrock_lr=1e-2,
        forwards_per_step=3,
    ),
    OptimizerInfo(
        zo_optim.HELENE,
        inputs=[dict(lr=1e-3), dict(lr=1e-3, hessian_interval=1, lambda_mode="dim", weight_decay=0.1, num_queries=2)],
        errors=[*_common_errors(), ErrorInput(dict(anneal_T=0.0), ValueError, "Invalid anneal_T"),
                ErrorInput(dict(hessian_interval=0), ValueError, "Invalid hessian_interval"),
                ErrorInput(dict(lambda_mode="layer"), ValueError, "Invalid lambda_mode"),
                ErrorInput(dict(gamma=0.0), ValueError, "Invalid gamma"),
                ErrorInput(dict(clip_lambda=-1.0), ValueError, "Invalid clip_lambda"),
                ErrorInput(dict(clip_lambda=lambda name, p: 1.0), ValueError, "needs parameter names")],
        bytes_per_param=[8, 8],
        quadratic_lr=2e-3,
        rosenbrock_lr=1e-3,
        forwards_per_step=2,
    ),
    OptimizerInfo(
        zo_optim.HiSo,
        inputs=[dict(lr=1e-2), dict(lr=1e-2, num_queries=3, k_interval=2, estimator="central")],
        errors=[*_common_errors(), ErrorInput(dict(beta=1.0), ValueError, "Invalid beta"),
                ErrorInput(dict(k_interval=0), ValueError, "Invalid k_interval"),
                ErrorInput(dict(hessian_eps=-1.0), ValueError, "Invalid hessian_eps"),
                ErrorInput(dict(hessian_min=0.0), ValueError, "Invalid hessian_min")],
        bytes_per_param=[4, 4],
        quadratic_lr=2e-2,
        rosenbrock_lr=1e-2,
        forwards_per_step=2,
    ),
]


def ids(infos: list[OptimizerInfo]) -> list[str]:
    return [i.name for i in infos]


# every optimizer with its default configuration (inputs[0]); ids are the class names
ALL = pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
# every optimizer with every constructor input that must work; ids "MeZO-0", "MeZO-1", ...
CONFIGS = [(info, i) for info in OPTIMIZERS for i in range(len(info.inputs))]
ALL_CONFIGS = pytest.mark.parametrize(("info", "i"), CONFIGS, ids=[f"{info.name}-{i}" for info, i in CONFIGS])


def richest(info: OptimizerInfo) -> int:
    """The constructor input with the most state (MeZO: the one with momentum)."""
    return max(range(len(info.inputs)), key=lambda i: (info.bytes_per_param[i], i))


def reference(seed: int) -> dict[str, Any]:
    """Constructor kwargs for the plain-torch backend (no numba JIT warm-up) with a fixed seed."""
    return {"backend": "reference", "seed": seed}


def make_optimizer(info: OptimizerInfo, params: torch.nn.Module | Iterable[Any], i: int | None = 0, *, seed: int,
                   **extra: Any) -> ZOOptimizer:
    """``info``'s optimizer with ``inputs[i]`` on the reference backend (``i=None``: the richest input).

    ``params`` is a module (its ``parameters()``) or anything the optimizer takes; ``extra``
    overrides the input's kwargs, the backend and the seed.
    """
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    i = richest(info) if i is None else i
    return info.cls(params, **{**info.inputs[i], **reference(seed), **extra})


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer MLP with 3 parameter tensors of odd shapes (and one frozen-able bias)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def tiny_data(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def loss_closure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, per_example: bool = False):
    def closure() -> torch.Tensor:
        out = model(x.to(next(model.parameters()).dtype)).float()
        losses = ((out - y) ** 2).mean(dim=1)
        return losses if per_example else losses.mean()

    return closure


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of the model's parameters, in order."""
    return [p.detach().clone() for p in model.parameters()]


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of every tensor of the optimizer's per-parameter state, parameter by parameter, keys sorted."""
    return [v.clone() for st in opt.state.values() for k, v in sorted(st.items()) if torch.is_tensor(v)]


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Two lists of tensors are equal bit for bit (the message shows the largest difference)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


def replay_probed_steps(prober, probe_ts: list[torch.Tensor], replicas: list, leader_ts: list[torch.Tensor],
                        loss: Callable[[], torch.Tensor], steps: int) -> None:
    """``steps`` rounds of scalar-only replay: ``prober`` measures (seed, g) on its own copy of the weights
    (``loss`` reads ``probe_ts``), every replica only applies ``apply_update(seed, g)``, and the prober then takes the
    first replica's weights (``leader_ts``). An in-place estimate moves fp32 weights by ulps, so the prober is not
    itself a replica (test_federated_core's reason for the wrapper's transient mode)."""
    for _ in range(steps):
        with torch.no_grad():
            prober.estimate(loss, seed=replicas[0].current_seed)
        seed, g, _ = prober.take_estimate()
        for r in replicas:
            r.apply_update(seed, g)
        with torch.no_grad():
            for p, q in zip(probe_ts, leader_ts, strict=True):
                p.copy_(q)


def run_resumed(fresh, weights: list[torch.Tensor], state: dict, steps: int,
                loss_of: Callable[[list[torch.Tensor]], torch.Tensor]) -> list[torch.Tensor]:
    """A resume from a checkpoint: ``fresh()`` builds (tensors, optimizer), the tensors take ``weights``, the optimizer
    loads ``state``, then ``steps`` steps of ``loss_of(tensors)``; returns the tensors."""
    ts, opt = fresh()
    with torch.no_grad():
        for t, w in zip(ts, weights, strict=True):
            t.copy_(w)
    opt.load_state_dict(state)
    for _ in range(steps):
        with torch.no_grad():
            opt.step(lambda: loss_of(ts))
    return ts


def second_step_with_a_failed_direction(monkeypatch, make, loss_of, direction_of: tuple[type, str], tensor_id: int,
                                        nth: int, forwards: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two steps from ``make()`` (→ tensors, optimizer), once clean and once with the ``nth`` direction that
    ``direction_of`` (a class and its method ``(self, p, tensor_id, ...)``) builds for tensor ``tensor_id`` in the
    second step's update pass (after its ``forwards`` probe forwards) raising an out-of-memory RuntimeError; that
    step must raise it and leave the rest pending, which ``step()`` then finishes. Returns (failed then finished,
    clean) weights."""
    cls, name = direction_of
    real = getattr(cls, name)

    def run(fail: bool) -> list[torch.Tensor]:
        ts, opt = make()
        state = {"forwards": 0, "armed": False, "calls": 0}

        def direction(self, p, tid, *a, **k):
            if state["armed"] and state["forwards"] == forwards and tid == tensor_id:
                state["calls"] += 1
                if state["calls"] == nth:
                    raise RuntimeError("out of memory (injected)")
            return real(self, p, tid, *a, **k)

        def closure():
            state["forwards"] += 1
            return loss_of(ts)

        with monkeypatch.context() as m:
            m.setattr(cls, name, direction)
            with torch.no_grad():
                opt.step(closure)  # step 1 runs clean
                state["forwards"], state["armed"] = 0, fail
                if fail:
                    with pytest.raises(RuntimeError, match="injected"):
                        opt.step(closure)
                    assert opt.step_count == 1 and opt.pending_seed is not None  # the rest is pending
                    opt.step()
                else:
                    opt.step(closure)
        assert opt.step_count == 2
        return [t.detach().clone() for t in ts]

    return run(True), run(False)
