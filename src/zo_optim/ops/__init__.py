"""Elementwise zeroth-order ops on lists of tensors, one function per op.

Every op has the same signature on every backend (``reference``, ``chunked``,
``cpu``, ``triton``); this module validates the input (nothing is modified when an op
refuses it), resolves ``backend="auto"`` and dispatches. See
:mod:`zo_optim.ops.reference` for the exact math of each op, and
:mod:`zo_optim.rng` for the random streams.

Backends:

* ``reference`` — plain torch, z materialised, float64-capable: the spec.
* ``chunked`` — the reference run on slices of at most 2**16 elements: the same
  bits with bounded temporaries, any device and dtype, no extra dependency.
* ``cpu`` — numba-compiled loops that generate z in registers (extra ``cpu``).
* ``triton`` — fused Triton kernels, one launch per (device, dtype) group
  (extra ``triton``); runs CPU tensors only under ``TRITON_INTERPRET=1``. Checked against the
  reference before its first write per (device, dtype): :mod:`zo_optim.ops.selfcheck`.
* ``auto`` — ``triton`` for CUDA tensors when Triton imports, ``cpu`` for CPU
  tensors when numba imports, else ``chunked`` (also for float64 and other dtypes
  the fast backends do not compute).

Sharded parameters (FSDP2's ``DTensor``, ``Shard(0)``/``Replicate()``) are written through their local
shards at their global element offsets, exactly the unsharded op's values (:mod:`._sharding`);
every backend takes shards.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from . import _checks, _sharding

__all__ = [
    "BACKENDS",
    "adamw_update_",
    "available_backends",
    "helene_update_",
    "load_backend",
    "perturb_",
    "precond_sgd_update_",
    "resolve_backend",
    "sgd_update_",
    "slow_fallback_notice",
]

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Backend:
    """One concrete backend: where it runs, where its code lives and how to install it."""

    name: str
    module: str
    #: device types ``"auto"`` picks it for, in table order; () for the plain-torch backends (any device)
    devices: tuple[str, ...] = ()
    #: ``pip install`` line for a backend with an optional dependency (None: always importable)
    install_hint: str | None = None
    #: what the hint installs, as the slow-fallback notice names it
    kernels: str = ""
    #: why tensors on a device cannot run here (None: they can), checked after the import succeeded
    refuses: Callable[[torch.device], str | None] = lambda device: None
    #: checked against the reference on first use per (device, dtype) before it writes (zo_optim.ops.selfcheck)
    self_checked: bool = False
    #: whether it takes shards of sharded tensors (``offsets``: the contract index of each tensor's element 0)
    shards: bool = True

    @property
    def plain_torch(self) -> bool:
        """Built from the reference's code: any dtype (float64 math for float64 tensors), any device."""
        return self.install_hint is None


def _triton_refuses(device: torch.device) -> str | None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("backend 'triton' runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='cpu'/'auto'")
    return None


def _cpu_refuses(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"backend 'cpu' runs CPU tensors, got tensors on {device}; use backend='triton' or 'auto'"
    return None


# The one table of backends, in the order of BACKENDS (after "auto") and of auto's preference.
_TABLE: dict[str, Backend] = {b.name: b for b in (
    Backend("triton", "zo_optim.ops.triton", ("cuda",), 'pip install "zo-optim[triton]" (Linux; CPU tensors need '
            'TRITON_INTERPRET=1 set before importing triton)', "the Triton kernels", _triton_refuses,
            self_checked=True),
    Backend("cpu", "zo_optim.ops.cpu", ("cpu",), 'pip install "zo-optim[cpu]" (installs numba)', "numba's kernels",
            _cpu_refuses),
    Backend("chunked", "zo_optim.ops.chunked"),
    Backend("reference", "zo_optim.ops.reference"),
)}
BACKENDS = ("auto", *_TABLE)
# The backends built from the reference's code: any dtype (float64 math for float64 tensors), any device.
_PLAIN_TORCH = tuple(name for name, b in _TABLE.items() if b.plain_torch)
# name -> the imported module, or the ImportError its import raised. A failure is remembered: a failed
# import is not cached by Python, so every later try re-ran the module's import (4 ms per try without numba,
# measured on a 2-core dev machine like CI's) on every op dispatch of backend="auto" before it fell back to chunked.
_loaded: dict[str, ModuleType | ImportError] = {}


def load_backend(name: str) -> ModuleType:
    """Import a backend module by name, with an install hint when it cannot load."""
    _checks.check_choice("backend", name, BACKENDS[1:])
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_TABLE[name].module)
        except ImportError as exc:
            _loaded[name] = exc
    got = _loaded[name]
    if isinstance(got, ImportError):
        # a new error each time (re-raising the stored one would grow its traceback on every call)
        hint = _TABLE[name].install_hint
        raise ImportError(f"backend {name!r} is unavailable ({got}); install it with: {hint}") from got
    return got


def _importable(name: str) -> bool:
    try:
        load_backend(name)
    except ImportError:
        return False
    return True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run tensors on ``device`` in this process."""
    out = []
    for name in BACKENDS[1:]:
        try:
            resolve_backend(name, torch.device(device))
        except (ImportError, RuntimeError):
            continue
        out.append(name)
    return out


def resolve_backend(
    name: str, device: torch.device, dtypes: Sequence[torch.dtype] = (), sharded: bool = False
) -> str:
    """Turn ``name`` (possibly ``"auto"``) into a concrete backend for ``device``.

    ``sharded``: the tensors are shards of sharded tensors (DTensor), run at their global offsets.
    Raises ImportError (with the install hint) or RuntimeError when an explicitly
    requested backend cannot run these tensors.
    """
    _checks.check_choice("backend", name, BACKENDS)
    exotic = any(d not in FAST_DTYPES for d in dtypes)
    if name == "auto":
        if exotic:
            return "chunked"
        for b in _TABLE.values():
            if device.type in b.devices and (b.shards or not sharded) and _importable(b.name):
                return b.name
        return "chunked"
    if sharded and not _TABLE[name].shards:
        raise RuntimeError(
            f"backend {name!r} does not take shards of sharded (DTensor) parameters; use backend='chunked' "
            "(or 'auto', which picks it for them) or backend='reference'"
        )
    if name in _PLAIN_TORCH:
        return name
    if exotic:
        other = sorted(map(str, set(dtypes) - set(FAST_DTYPES)))
        raise RuntimeError(
            f"backend {name!r} computes in float32 for float32/bfloat16/float16 tensors; "
            f"use backend='reference' for {other}"
        )
    load_backend(name)
    refusal = _TABLE[name].refuses(device)
    if refusal is not None:
        raise RuntimeError(refusal)
    return name


def slow_fallback_notice(name: str, device: torch.device, dtypes: Sequence[torch.dtype] = ()) -> str | None:
    """Why ``backend=name`` runs these tensors on the plain-torch ``chunked`` backend, and the fix.

    ``None`` unless ``name`` is ``"auto"`` and it resolved to ``chunked`` only because no fast
    backend is installed for ``device`` (float64 and other dtypes the fast backends do not compute
    run there by design).
    """
    if name != "auto" or any(d not in FAST_DTYPES for d in dtypes):
        return None
    if resolve_backend(name, device, dtypes) != "chunked":
        return None
    fast = [b for b in _TABLE.values() if device.type in b.devices]
    if fast:
        fix = f"for {fast[0].kernels}: {fast[0].install_hint}"
    else:
        fix = f"zo-optim has no fast backend for {device.type} tensors yet"
    # A MeZO step of MiniLM-L6 on 2 CPU cores, `zo-optim bench step`: 2884 ms (chunked) vs 126 ms (cpu), 23x
    # (benchmarks/results/2026-12-04-cpu-memory-chunked/; 3546 vs 134 ms in an earlier run)
    return (f"backend='auto' found no fast backend for {device.type} tensors and runs the plain-torch 'chunked' "
            f"backend (bounded memory, the same results, but over 20x slower than numba's on CPU); {fix}. "
            "Pass backend='chunked' to choose it explicitly and silence this warning.")


# Like torch.optim's step(): the ops write leaf tensors that may require grad (model
# parameters), which autograd forbids outside no_grad; without it the copy-back of a
# non-contiguous param would raise after the contiguous ones had been written.
@torch.no_grad()
def _dispatch(op: str, params, tensor_ids, backend: str, states: dict[str, Any], kwargs: dict[str, Any]) -> None:
    # DTensors (FSDP2): the ops write each local shard at its global element offset (see _sharding)
    for i, p in enumerate(params):
        if isinstance(p, torch.Tensor):
            _sharding.check_tensor(f"params[{i}]", p)
    # every rank resolves the same backend: "sharded" is whether the tensors are DTensors, not whether this rank's
    # offsets happen to be 0 (rank 0's are), or rank 0 would run Triton and the others chunked on CUDA
    sharded = any(_sharding.is_dtensor(p) for p in params)
    params, offsets = _sharding.unwrap(params)
    states = {k: (None if v is None else [_sharding.local(s) for s in v]) for k, v in states.items()}
    device = _checks.check_params(params, tensor_ids)
    kwargs["seed"] = _checks.check_seed(kwargs["seed"])
    _checks.check_choice("distribution", kwargs.get("distribution", "gaussian"), _checks.DISTRIBUTIONS)
    _checks.check_choice("rounding", kwargs.get("rounding", "nearest"), _checks.ROUNDINGS)
    # Counter words are checked here, not where the backends first use them: a bad one
    # found midway would leave the earlier tensors written.
    for word in ("query", "restore_query", "rounding_slot"):
        if word in kwargs:
            _checks.check_u32(word, kwargs[word])
    q = None
    if "coeffs" in kwargs:
        q = _checks.check_scalars("coeffs", kwargs["coeffs"], device)
    for extra in ("precond_coeffs", "hessian_coeffs"):
        if kwargs.get(extra) is not None:
            _checks.check_scalars(extra, kwargs[extra], device, q)
    for sname, svalue in states.items():
        if svalue is not None:
            _checks.check_state(sname, svalue, params)
    # The backends read the per-query scalars as flat memory: a strided view (e.g. a
    # column of a [q, 2] tensor) must become contiguous (a device copy, no host sync).
    for sname in ("coeffs", "precond_coeffs", "hessian_coeffs"):
        if kwargs.get(sname) is not None:
            kwargs[sname] = kwargs[sname].contiguous()
    name = resolve_backend(backend, device, [p.dtype for p in params], sharded=sharded)
    if _TABLE[name].self_checked:
        # Kernels compiled for this machine are checked before their first write on it (cached per process):
        # a failure raises for an explicit backend and falls back to "chunked" with a warning for "auto".
        name = importlib.import_module("zo_optim.ops.selfcheck").gate(backend, name, device, [p.dtype for p in params],
                                                                      sharded=sharded)
    module = load_backend(name)
    if sharded:
        kwargs["offsets"] = offsets
    if name in _PLAIN_TORCH:
        # float64 params are the reason to use these: compute in float64 too, or a
        # float32 pass would round them (1 + 1e-12 would not survive scale=0).
        wide = any(p.dtype == torch.float64 for p in params)
        kwargs["compute_dtype"] = torch.float64 if wide else torch.float32
    if name == "reference":
        _reference(getattr(module, op), params, list(tensor_ids), states, kwargs)
        return
    # The other backends address flat contiguous memory; element i of a view is its
    # row-major logical index, so run on contiguous copies and write them back.
    work_params = [p if p.is_contiguous() else p.contiguous() for p in params]
    work_states = {
        k: (None if v is None else [s if s.is_contiguous() else s.contiguous() for s in v]) for k, v in states.items()
    }
    try:
        getattr(module, op)(work_params, list(tensor_ids), **work_states, **kwargs)
    except BaseException:
        # a chunked update that failed keeps the slices it wrote (the pass engine finishes the rest from the
        # recorded element: chunked.window); written to copies of views, they go back too, or the originals
        # would disagree with that record. (A perturbation takes its slices back itself: nothing to copy.)
        if name == "chunked" and op != "perturb_":
            _write_all_back(op, kwargs, params, work_params, states, work_states)
        raise
    _write_all_back(op, kwargs, params, work_params, states, work_states)


def _write_all_back(op: str, kwargs: dict[str, Any], params, work_params, states, work_states) -> None:
    written = _written_states(op, kwargs)
    for orig, work in zip(params, work_params, strict=True):
        _write_back(orig, work)
    for k, v in states.items():
        if k in written:
            for orig, work in zip(v or (), work_states[k] or (), strict=True):
                _write_back(orig, work)


def _reference(fn: Callable[..., None], params, tensor_ids, states: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """The reference op; with per-tensor ``offsets`` (shards), one call per tensor at its offset."""
    offsets = kwargs.pop("offsets", None)
    if offsets is None:
        fn(params, tensor_ids, **states, **kwargs)
        return
    for i, off in enumerate(offsets):
        one = {k: (v if v is None else [v[i]]) for k, v in states.items()}
        per = {k: [kwargs[k][i]] for k in ("clip",) if k in kwargs}
        fn([params[i]], [tensor_ids[i]], **one, **{**kwargs, **per}, offset=off)


def _written_states(op: str, kwargs: dict[str, Any]) -> set[str]:
    """The state lists an op writes (perturb_ only reads its preconditioner)."""
    if op == "perturb_":
        return set()
    if op == "precond_sgd_update_":
        return {"precond"} if kwargs["update_precond"] else set()
    if op == "helene_update_":
        return {"exp_avgs", "hessians"} if kwargs["update_hessian"] else {"exp_avgs"}
    return {"momentum_buffers", "exp_avgs", "exp_avg_sqs"}


def _write_back(orig: torch.Tensor, work: torch.Tensor) -> None:
    if work is not orig:
        orig.copy_(work)  # an in-place torch op: bumps orig's version counter itself
    else:
        # The fast backends write through raw pointers, which autograd cannot see: bump the
        # version counter so that a tensor saved for backward before this op is detected as
        # modified (as after any in-place torch op). Metadata only, no pass over the data.
        torch.autograd.graph.increment_version(orig)


def perturb_(
    params: Sequence[torch.Tensor],
    tensor_ids: Sequence[int],
    seed: int,
    scale: float,
    *,
    query: int = 0,
    distribution: str = "gaussian",
    precond: Sequence[torch.Tensor] | None = None,
    rounding: str = "nearest",
    rounding_slot: int = 1,
    backend: str = "auto",
) -> None:
    r"""In place :math:`\theta \leftarrow \theta + \text{scale}\cdot z_{\text{query}} \odot \text{precond}^{-1/2}`."""
    _dispatch(
        "perturb_", params, tensor_ids, backend, {"precond": precond},
        dict(seed=seed, scale=float(scale), query=query, distribution=distribution, rounding=rounding,
             rounding_slot=rounding_slot),
    )


def sgd_update_(params, tensor_ids, seed, coeffs, *, lr, weight_decay=0.0, momentum=0.0, momentum_buffers=None,
                restore_scale=0.0, restore_query=0, distribution="gaussian", rounding="nearest", rounding_slot=0,
                backend="auto") -> None:
    """Fused restore + ZO-SGD update (see :func:`zo_optim.ops.reference.sgd_update_`)."""
    _dispatch(
        "sgd_update_", params, tensor_ids, backend, {"momentum_buffers": momentum_buffers},
        dict(seed=seed, coeffs=coeffs, lr=float(lr), weight_decay=float(weight_decay), momentum=float(momentum),
             restore_scale=float(restore_scale), restore_query=restore_query, distribution=distribution,
             rounding=rounding, rounding_slot=rounding_slot),
    )


def adamw_update_(params, tensor_ids, seed, coeffs, *, lr, beta1, beta2, eps, weight_decay, step, exp_avgs,
                  exp_avg_sqs, restore_scale=0.0, restore_query=0, distribution="gaussian", rounding="nearest",
                  rounding_slot=0, backend="auto") -> None:
    """Fused restore + AdamW update (see :func:`zo_optim.ops.reference.adamw_update_`)."""
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"Invalid step: {step!r} (1-based)")
    _dispatch(
        "adamw_update_", params, tensor_ids, backend, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
        dict(seed=seed, coeffs=coeffs, lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
             weight_decay=float(weight_decay), step=step, restore_scale=float(restore_scale),
             restore_query=restore_query, distribution=distribution, rounding=rounding, rounding_slot=rounding_slot),
    )


def precond_sgd_update_(params, tensor_ids, seed, coeffs, *, lr, precond, rule, update_precond, precond_decay,
                        precond_rate, precond_coeffs=None, hessian_eps=0.0, precond_min=0.0, weight_decay=0.0,
                        restore_scale=0.0, restore_query=0, distribution="gaussian", rounding="nearest",
                        rounding_slot=0, backend="auto") -> None:
    """Fused restore + preconditioned SGD + preconditioner update (HiZOO Σ, HiSo K).

    The updated preconditioner is clamped to ``[precond_min, float32 max]`` (NaN stays NaN): the
    floor bounds the directions u = z/√P, the ceiling keeps an overflow finite (inf·0 would be NaN).
    """
    _checks.check_precond_rule(rule, update_precond, precond_coeffs)
    precond_min = float(precond_min)
    if not 0.0 <= precond_min <= _checks.F32_MAX:
        raise ValueError(f"Invalid precond_min: {precond_min!r} (a finite floor in [0, {_checks.F32_MAX:.4g}])")
    _dispatch(
        "precond_sgd_update_", params, tensor_ids, backend, {"precond": precond},
        dict(seed=seed, coeffs=coeffs, lr=float(lr), rule=rule, update_precond=bool(update_precond),
             precond_decay=float(precond_decay), precond_rate=float(precond_rate), precond_coeffs=precond_coeffs,
             hessian_eps=float(hessian_eps), precond_min=precond_min, weight_decay=float(weight_decay),
             restore_scale=float(restore_scale),
             restore_query=restore_query, distribution=distribution, rounding=rounding, rounding_slot=rounding_slot),
    )


def helene_update_(params, tensor_ids, seed, coeffs, *, lr, alpha, beta1, beta2, gamma, eps, clip, exp_avgs,
                   hessians, update_hessian, hessian_coeffs=None, weight_decay=0.0, restore_scale=0.0,
                   restore_query=0, distribution="gaussian", rounding="nearest", rounding_slot=0,
                   backend="auto") -> None:
    """Fused restore + HELENE update (see :func:`zo_optim.ops.reference.helene_update_`)."""
    if len(clip) != len(params):
        raise ValueError(f"clip has {len(clip)} values for {len(params)} params; pass one λ per tensor")
    clip = [float(c) for c in clip]
    for i, c in enumerate(clip):
        # The backends clamp in float32: a λ beyond its range (or inf/nan) means no clamp on
        # one backend and an error midway on another, so refuse it before anything is written.
        if not 0.0 <= c <= _checks.F32_MAX:
            raise ValueError(f"Invalid clip[{i}]: {c!r} (a finite λ in [0, {_checks.F32_MAX:.4g}], the float32 range)")
    _dispatch(
        "helene_update_", params, tensor_ids, backend, {"exp_avgs": exp_avgs, "hessians": hessians},
        dict(seed=seed, coeffs=coeffs, lr=float(lr), alpha=float(alpha), beta1=float(beta1), beta2=float(beta2),
             gamma=float(gamma), eps=float(eps), clip=clip, update_hessian=bool(update_hessian),
             hessian_coeffs=hessian_coeffs, weight_decay=float(weight_decay), restore_scale=float(restore_scale),
             restore_query=restore_query, distribution=distribution, rounding=rounding, rounding_slot=rounding_slot),
    )
