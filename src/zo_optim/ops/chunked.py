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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import reference

__all__ = [
    "CHUNK_NUMEL",
    "adamw_update_",
    "helene_update_",
    "perturb_",
    "precond_sgd_update_",
    "sgd_update_",
]

# Elements per slice. The reference's temporaries, measured (VmHWM, fp32, q = 1): perturb_ 70 and
# sgd_update_ 42 bytes per element, 165 with stochastic rounding to bf16; so 2**16 elements bound them
# at 4.4 / 2.6 / 10.3 MiB. Measured on the 2-core CI machine (perturb_/sgd_update_, one tensor, CPU
# time per element): 2**16 → 69/81 ns, 2**18 → 47/52 ns, 2**20 → 38/30 ns. Memory first, as it is
# the backend's reason to exist: a MiniLM MeZO fine-tune (`zo-optim bench memory`, batch 8×64)
# peaked at 1.058× / 1.066× an inference forward with 2**18 and at 1.043× / 1.046× with 2**16 (two
# runs each; recorded: benchmarks/results/2026-12-04-cpu-memory-chunked/ and its probe-chunk-2pow18/).
CHUNK_NUMEL = 1 << 16


def _slices(numel: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, CHUNK_NUMEL):
        yield start, min(numel, start + CHUNK_NUMEL)


def _chunked(
    op: Callable[..., None], state_names: Sequence[str], per_tensor: Sequence[str] = (), undo: bool = False
) -> Callable[..., None]:
    """``op`` of the reference run tensor by tensor, slice by slice (states sliced alongside).

    ``undo`` (``perturb_``: its own inverse with ``-scale``): a slice that fails (an allocation of its
    temporaries) takes back the slices of its tensor already moved, so the op leaves whole tensors moved
    or not (the optimizers' pass engine calls it one tensor at a time and takes back the tensors before).
    """

    def run(params: Sequence[torch.Tensor], tensor_ids: Sequence[int], *args: Any, **kwargs: Any) -> None:
        # args: the reference's other positional ones (seed, then scale or coeffs); its states are keyword-only
        states = {name: kwargs.pop(name) for name in state_names if name in kwargs}
        lists = {name: kwargs.pop(name) for name in per_tensor}
        # shards of sharded tensors: the contract index of each tensor's element 0 (ops._sharding)
        offsets = kwargs.pop("offsets", None) or [0] * len(params)
        for i, (param, tensor_id) in enumerate(zip(params, tensor_ids, strict=True)):
            # The dispatcher hands over contiguous tensors (copies of views are written back there).
            flat = param.view(-1)
            flat_states = {name: (None if v is None else v[i].view(-1)) for name, v in states.items()}
            one = {name: [v[i]] for name, v in lists.items()}
            done = 0
            try:
                for start, end in _slices(flat.numel()):
                    sliced = {name: (None if s is None else [s[start:end]]) for name, s in flat_states.items()}
                    op([flat[start:end]], [tensor_id], *args, **sliced, **one, **kwargs, offset=offsets[i] + start)
                    done = end
            except BaseException:
                if undo and done:
                    back_args, back = (args, {**kwargs, "scale": -kwargs["scale"]}) if "scale" in kwargs else (
                        (args[0], -args[1], *args[2:]), kwargs)
                    for start, end in _slices(done):
                        sliced = {name: (None if s is None else [s[start:end]]) for name, s in flat_states.items()}
                        op([flat[start:end]], [tensor_id], *back_args, **sliced, **one, **back,
                           offset=offsets[i] + start)
                raise

    run.__name__ = run.__qualname__ = op.__name__
    run.__doc__ = f"The reference's ``{op.__name__}`` on slices of at most ``CHUNK_NUMEL`` elements."
    return run


perturb_ = _chunked(reference.perturb_, ("precond",), undo=True)
sgd_update_ = _chunked(reference.sgd_update_, ("momentum_buffers",))
adamw_update_ = _chunked(reference.adamw_update_, ("exp_avgs", "exp_avg_sqs"))
precond_sgd_update_ = _chunked(reference.precond_sgd_update_, ("precond",))
helene_update_ = _chunked(reference.helene_update_, ("exp_avgs", "hessians"), per_tensor=("clip",))
