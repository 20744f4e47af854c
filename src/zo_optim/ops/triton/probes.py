"""Triton probe of the Philox known answers, for the backend's self-check (:mod:`zo_optim.ops.selfcheck`).

The ops' own kernels never expose Philox words (they feed z and the rounding decisions), so the
known answers of Random123 go through this one small kernel, built from the same ``@triton.jit``
:func:`._rng.philox4x32_10` the op kernels inline: a wrong multiply-high or a key schedule broken by a
compiler on some GPU shows here as wrong words, before any weight is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _rng
from .launch import _on_device


@triton.jit
def _philox_kernel(out_ptr, c_ptr, k_ptr, N: tl.constexpr):
    t = tl.arange(0, N)
    c0 = tl.load(c_ptr + 4 * t).to(tl.uint32)
    c1 = tl.load(c_ptr + 4 * t + 1).to(tl.uint32)
    c2 = tl.load(c_ptr + 4 * t + 2).to(tl.uint32)
    c3 = tl.load(c_ptr + 4 * t + 3).to(tl.uint32)
    k0 = tl.load(k_ptr + 2 * t).to(tl.uint32)
    k1 = tl.load(k_ptr + 2 * t + 1).to(tl.uint32)
    x0, x1, x2, x3 = _rng.philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * t, x0.to(tl.int64))
    tl.store(out_ptr + 4 * t + 1, x1.to(tl.int64))
    tl.store(out_ptr + 4 * t + 2, x2.to(tl.int64))
    tl.store(out_ptr + 4 * t + 3, x3.to(tl.int64))


def philox_words(counters: torch.Tensor, keys: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Philox4x32-10 of int64 ``counters [n, 4]`` under ``keys [n, 2]`` (uint32 words), run on ``device``;
    returns the int64 words ``[n, 4]`` on the CPU."""
    n = counters.shape[0]
    width = max(2, 1 << (n - 1).bit_length())  # tl.arange needs a power of two: pad with zero counters
    c = torch.zeros(width, 4, dtype=torch.int64)
    k = torch.zeros(width, 2, dtype=torch.int64)
    c[:n], k[:n] = counters, keys
    out = torch.empty(width, 4, dtype=torch.int64, device=device)
    with _on_device(device):
        _philox_kernel[(1,)](out, c.to(device), k.to(device), N=width)
    return out[:n].cpu()
