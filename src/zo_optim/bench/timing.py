"""Timing of device work: CUDA events on GPU, ``time.perf_counter`` on CPU; medians of repeats.

On CUDA (see the measuring method in docs/benchmarks.md): warm-up calls first (module
load, JIT compilation, allocator growth stay out of the numbers), then each repeat is
bracketed by two events with a 256 MiB buffer zeroed *before* the start event, so a
list that fits in L2 (50 MiB on H100) is not timed from cache; one synchronize at
the end, and the median of the repeats is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "set_cpu_threads", "synchronize", "time_fn"]

_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over ``len(samples)`` repeats."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[int], object], device: torch.device, *, warmup: int, repeat: int,
            flush_cache: bool = True) -> Timing:
    """Time ``fn(i)`` (``i`` counts every call, warm-up included) ``repeat`` times after ``warmup`` calls."""
    if repeat < 1:
        raise ValueError(f"Invalid repeat: {repeat}")
    calls = 0
    for _ in range(warmup):
        fn(calls)
        calls += 1
    synchronize(device)
    if device.type == "cuda":
        flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_cache else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        for k in range(repeat):
            if flush is not None:
                flush.zero_()
            starts[k].record()
            fn(calls)
            ends[k].record()
            calls += 1
        torch.cuda.synchronize(device)
        return Timing(tuple(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(calls)
        samples.append((time.perf_counter() - t0) * 1e3)
        calls += 1
    return Timing(tuple(samples))


def set_cpu_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and numba (None: leave the defaults).

    On a machine shared with other jobs, OpenMP's spinning threads can make small
    ops 100x slower than one thread (seen on a loaded 2-core runner: a tiny OPT
    forward took 350 ms with 2 threads, 2 ms with 1); compare providers at the same count.
    """
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"Invalid threads: {threads}")
    torch.set_num_threads(threads)
    # numba's runtime mask, never the NUMBA_NUM_THREADS variable: numba re-reads that
    # at each compilation and refuses a new value once its pool is up.
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
