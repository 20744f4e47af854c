"""Chunked backend: the reference ops evaluated on flat slices of at most :data:`CHUNK_NUMEL` elements.

The reference (:mod:`zo_optim.ops.reference`) materialises z, and the int64 Philox words behind
it, for a whole tensor at once. Its temporaries grow with the largest tensor: a MeZO fine-tune
of MiniLM-L6 (batch 16×32) on the reference peaked at 1487 MiB against 632 MiB for an inference
forward, from the 11.7M-element word embedding
(``benchmarks/results/2026-12-03-cpu-memory/breakdown-minilm-16x32/reference-backend``).
Every op is elementwise and the reference takes the element ``offset`` of a slice, so running
it slice by slice writes the same bits with temporaries bounded by one chunk, on any device
and dtype, with no dependency beyond torch. ``backend="auto"`` falls back to it where neither
numba nor Triton can run the tensors. It is as slow as the reference (one torch op per Philox
round and element block; a MeZO step of MiniLM on 2 CPU cores: 2884 ms against 126 ms with
numba). z is generated on the tensors' device by the contract's device-generic torch code, as in the
reference: on a GPU nothing runs on the CPU, which makes this the on-device fallback of a Triton
backend that failed its self-check (:mod:`zo_optim.ops.selfcheck`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch

from . import reference

__all__ = [
    "CHUNK_NUMEL",
    "PartialWriteError",
    "Window",
    "adamw_update_",
    "helene_update_",
    "perturb_",
    "precond_sgd_update_",
    "sgd_update_",
    "window",
]

# Elements per slice. The reference's temporaries, measured (VmHWM, fp32, q = 1): perturb_ 70 and
# sgd_update_ 42 bytes per element, 165 with stochastic rounding to bf16; so 2**16 elements bound them
# at 4.4 / 2.6 / 10.3 MiB. Measured on the 2-core CI machine (perturb_/sgd_update_, one tensor, CPU
# time per element): 2**16 → 69/81 ns, 2**18 → 47/52 ns, 2**20 → 38/30 ns. Memory first, as it is
# the backend's reason to exist: a MiniLM MeZO fine-tune (`zo-optim bench memory`, batch 8×64)
# peaked at 1.058× / 1.066× an inference forward with 2**18 and at 1.043× / 1.046× with 2**16 (two
# runs each; recorded: benchmarks/results/2026-12-04-cpu-memory-chunked/ and its probe-chunk-2pow18/).
CHUNK_NUMEL = 1 << 16


def _slices(first: int, numel: int) -> Iterator[tuple[int, int]]:
    for start in range(first, numel, CHUNK_NUMEL):
        yield start, min(numel, start + CHUNK_NUMEL)


class PartialWriteError(RuntimeError):
    """An op failed and could not put back what it had written: its tensor is part-written.

    Raised (chained to both errors) when a second error hits the op's own repair: the copy-back of a failed
    slice, or the take-back of a perturbation's slices. The values of the tensor are then unknown to the
    caller; the optimizers refuse to step until a checkpoint is loaded (:mod:`zo_optim.optim._passes`).
    """


class Window:
    """The elements ``[start, numel)`` of the one tensor that the chunked ops run on inside :func:`window`,
    and how far they got.

    ``done``: the op's result is in elements ``[0, done)`` when it returned or raised (``start`` until a slice
    is written; a failed perturbation takes its slices back, so ``done`` is ``start`` again). ``used``: a
    chunked op read the window (another backend ignores it).
    """

    def __init__(self, start: int) -> None:
        self.start = self.done = start
        self.used = False


_WINDOW: ContextVar[Window | None] = ContextVar("zo_optim_chunked_window", default=None)


@contextlib.contextmanager
def window(start: int = 0) -> Iterator[Window]:
    """Run the chunked ops called inside on flat elements ``[start, numel)`` of their one tensor, and record
    in the yielded :class:`Window` how far they got.

    The pass engine's slice-granular resume (:mod:`zo_optim.optim._passes`): an update that failed between
    two slices of a tensor keeps the slices it wrote, the rest of the tensor is restored from ``done`` on,
    and ``step()`` updates it from ``done`` on: every element updated exactly once, with the values of an
    error-free run (every op is elementwise and takes its element offset).
    """
    w = Window(start)
    token = _WINDOW.set(w)
    try:
        yield w
    finally:
        _WINDOW.reset(token)


def _chunked(
    op: Callable[..., None], state_names: Sequence[str], per_tensor: Sequence[str] = (), undo: bool = False
) -> Callable[..., None]:
    """``op`` of the reference run tensor by tensor, slice by slice (states sliced alongside).

    Each slice is written all or nothing: its values (and its states') are copied before the op (at most
    ``CHUNK_NUMEL`` elements each, 0.25 MiB in float32) and copied back if the op raises (an allocation
    failure after a state was written). So a failed op leaves a tensor's slices written up to the failed one
    and untouched from there: recorded in :func:`window`'s ``done`` for the pass engine.

    ``undo`` (``perturb_``: its own inverse with ``-scale``): a failed op also takes back the slices of its
    tensor already moved (up to the round trip's rounding, as any restore of a perturbation), so it leaves
    whole tensors moved or not (the pass engine calls it one tensor at a time and takes back the tensors
    before). A second error in a copy-back or a take-back raises :class:`PartialWriteError`.
    """

    def run(params: Sequence[torch.Tensor], tensor_ids: Sequence[int], *args: Any, **kwargs: Any) -> None:
        # args: the reference's other positional ones (seed, then scale or coeffs); its states are keyword-only
        states = {name: kwargs.pop(name) for name in state_names if name in kwargs}
        lists = {name: kwargs.pop(name) for name in per_tensor}
        # shards of sharded tensors: the contract index of each tensor's element 0 (ops._sharding)
        offsets = kwargs.pop("offsets", None) or [0] * len(params)
        win = _WINDOW.get()
        if win is not None:
            if len(params) != 1:
                raise ValueError(f"chunked.window() runs an op on one tensor, got {len(params)}; nothing was written")
            win.used = True
        for i, (param, tensor_id) in enumerate(zip(params, tensor_ids, strict=True)):
            # The dispatcher hands over contiguous tensors (copies of views are written back there).
            flat_states = {name: (None if v is None else v[i].view(-1)) for name, v in states.items()}
            one = {name: [v[i]] for name, v in lists.items()}
            _one_tensor(op, param.view(-1), flat_states, tensor_id, offsets[i], one, args, kwargs, undo, win)

    run.__name__ = run.__qualname__ = op.__name__
    run.__doc__ = f"The reference's ``{op.__name__}`` on slices of at most ``CHUNK_NUMEL`` elements."
    return run


def _one_tensor(
    op: Callable[..., None], flat: torch.Tensor, flat_states: dict[str, torch.Tensor | None], tensor_id: int,
    offset: int, one: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any], undo: bool, win: Window | None,
) -> None:
    """``op`` on the slices of one flat tensor from the window's start (see :func:`_chunked`)."""
    first = 0 if win is None else win.start

    def call(start: int, end: int, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
        sliced = {name: (None if s is None else [s[start:end]]) for name, s in flat_states.items()}
        op([flat[start:end]], [tensor_id], *a, **sliced, **one, **kw, offset=offset + start)

    done = first
    try:
        for start, end in _slices(first, flat.numel()):
            views = [flat[start:end], *(s[start:end] for s in flat_states.values() if s is not None)]
            saved = [v.clone() for v in views]  # before the op: nothing of this slice is written yet
            try:
                call(start, end, args, kwargs)
            except BaseException:
                try:
                    for v, b in zip(views, saved, strict=True):
                        v.copy_(b)
                except BaseException as again:
                    raise PartialWriteError(
                        f"{op.__name__}: elements [{start}, {end}) of tensor {tensor_id} could not be put back "
                        f"after the op failed there ({again!r}); the tensor is part-written"
                    ) from again
                raise
            done = end
            if win is not None:
                win.done = end
    except PartialWriteError:
        raise
    except BaseException:
        if undo and done > first:
            back_args, back = (args, {**kwargs, "scale": -kwargs["scale"]}) if "scale" in kwargs else (
                (args[0], -args[1], *args[2:]), kwargs)
            try:
                for start, end in _slices(first, done):
                    call(start, end, back_args, back)
            except BaseException as again:
                raise PartialWriteError(
                    f"{op.__name__}: the perturbation of elements [{first}, {done}) of tensor {tensor_id} could "
                    f"not be taken back after a later slice failed ({again!r}); the tensor is part-written"
                ) from again
            if win is not None:
                win.done = first
        raise


perturb_ = _chunked(reference.perturb_, ("precond",), undo=True)
sgd_update_ = _chunked(reference.sgd_update_, ("momentum_buffers",))
adamw_update_ = _chunked(reference.adamw_update_, ("exp_avgs", "exp_avg_sqs"))
precond_sgd_update_ = _chunked(reference.precond_sgd_update_, ("precond",))
helene_update_ = _chunked(reference.helene_update_, ("exp_avgs", "hessians"), per_tensor=("clip",))
