"""The five parallel CPU kernels: one call per op over every tensor of the call.

A call describes its tensors in an int64 table (one row per tensor: data
address, element count, storage format, tensor id, up to two state-buffer
addresses; 0 where absent), like the Triton backend's address table. The work is
split into blocks of ``BLOCK`` elements over all tensors at once, so one
``prange`` balances hundreds of mixed-size tensors (and skips empty ones) in a
single parallel launch.

A block is processed in stages over small per-thread buffers (L2-resident), each
a simple loop that LLVM vectorises: Philox words of the block's counters, z by
Box-Muller (or Rademacher bits), ĝ = Σ_k c_k z_k (and Σ_k a_k z_k² where needed),
the parameter converted to float32, the op's elementwise update in exactly the
order of :mod:`zo_optim.ops.reference`, and one rounding per store.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._numerics import F32, JIT, f32_array, load_block, philox_block, store_block, u16_array, z_block

BLOCK = 2048
"""Elements per work item: a multiple of 128, so a block starts on a Rademacher counter."""
CHUNKS_PER_THREAD = 4
"""Work items are dealt round-robin to this many chunks per thread (load balance)."""

ADDR, NUMEL, FMT, TID, STATE0, STATE1, OFFSET = range(7)
TABLE_COLUMNS = 7
SKIP_MAX = 128
"""Scratch beyond ``BLOCK``: a block whose first element's contract index (``OFFSET`` + local index, a shard
of a sharded tensor) is not a multiple of 128 generates z from the aligned-down index and drops the
first ``index % 128`` (Rademacher) or ``index % 4`` (Gaussian, rounding words) values."""

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F32_MAX = np.float32(np.finfo(np.float32).max)
_U0 = np.uint64(0)
_U1 = np.uint64(1)


@njit(**JIT)
def _block(table, blocks, b):
    """Tensor row, first element and element count of work item ``b``."""
    t = np.searchsorted(blocks, b, side="right") - 1
    base = (b - blocks[t]) * BLOCK
    return t, base, min(BLOCK, table[t, NUMEL] - base)


@njit(**JIT)
def _param_views(table, t, base, count):
    """(float32 view, uint16 view) of elements base … base+count-1 of tensor row ``t``; the view
    not matching its format is empty. Block views index from 0, so LLVM sees non-negative indices
    (numba's negative-index wraparound on ``base + l`` would keep the loops scalar)."""
    fmt = table[t, FMT]
    addr = table[t, ADDR]
    if fmt == F32:
        return f32_array(addr + 4 * base, count), u16_array(0, 0)
    return f32_array(0, 0), u16_array(addr + 2 * base, count)


@njit(**JIT)
def _state_view(table, t, column, base, count):
    """float32 view of elements base … base+count-1 of a state buffer (empty when absent)."""
    addr = table[t, column]
    return f32_array(addr + 4 * base if addr != 0 else 0, count)


@njit(**JIT)
def _z_at(rademacher, k0, k1, tid, query, start, count, words, z):
    """z of elements start … start+count-1 of tensor ``tid`` (any start) into z[0:count]."""
    skip = start % (128 if rademacher else 4)
    z_block(rademacher, k0, k1, tid, query, (start - skip) // 4, count + skip, words, z)
    if skip != 0:
        for lo in range(count):
            z[lo] = z[lo + skip]


@njit(**JIT)
def _rounding_words(stochastic, fmt, k0, k1, tid, slot, start, count, words):
    """The stochastic-rounding word of each element of the block (counter word 3 = 1)."""
    if stochastic and fmt != F32:
        skip = start % 4
        philox_block((start - skip) // 4, (count + skip + 3) // 4, tid, slot, _U1, k0, k1, words)
        if skip != 0:
            for lo in range(count):
                words[lo] = words[lo + skip]


@njit(**JIT)
def _directions(rademacher, k0, k1, tid, start, count, coeffs, curv_coeffs, restore, restore_query,
                words, z, g, curv, zr):
    """g = Σ_k c_k z_k, curv = Σ_k a_k z_k² (if ``curv_coeffs`` is non-empty) and zr = z_restore_query.

    Sums start from 0 and run over k in order, like the reference.
    """
    q = coeffs.shape[0]
    use_curv = curv_coeffs.shape[0] > 0
    for lo in range(count):
        g[lo] = _F0
        curv[lo] = _F0
    for k in range(q):
        _z_at(rademacher, k0, k1, tid, np.uint64(k), start, count, words, z)
        ck = coeffs[k]
        for lo in range(count):
            g[lo] = g[lo] + ck * z[lo]
        if use_curv:
            a = curv_coeffs[k]
            for lo in range(count):
                curv[lo] = curv[lo] + a * (z[lo] * z[lo])
        if restore and k == restore_query:
            for lo in range(count):
                zr[lo] = z[lo]
    if restore and restore_query >= q:
        _z_at(rademacher, k0, k1, tid, np.uint64(restore_query), start, count, words, zr)


# Each kernel is a prange over chunks of work items (per-chunk scratch allocated once); the work
# of one item is a plain jitted function (``_*_block``) made of simple loops.


@njit(**JIT)
def _scratch():
    """Per-chunk buffers: Philox words and five float32 rows (z, ĝ, curvature, z_restore, θ)."""
    return np.empty(BLOCK + SKIP_MAX, np.uint32), np.empty((5, BLOCK + SKIP_MAX), np.float32)


@njit(**JIT)
def _perturb_block(table, blocks, b, k0, k1, query, rademacher, scale, stochastic, slot, words, buf):
    t, base, count = _block(table, blocks, b)
    start = base + table[t, OFFSET]  # the contract's index of element base (a shard's global offset added)
    fmt, tid = table[t, FMT], np.uint64(table[t, TID])
    pf, ph = _param_views(table, t, base, count)
    z, theta = buf[0], buf[4]
    _z_at(rademacher, k0, k1, tid, query, start, count, words, z)
    if table[t, STATE0] != 0:
        pre = _state_view(table, t, STATE0, base, count)
        for lo in range(count):
            z[lo] = z[lo] * (_F1 / math.sqrt(pre[lo]))
    load_block(pf, ph, fmt, count, theta)
    for lo in range(count):
        theta[lo] = theta[lo] + scale * z[lo]
    _rounding_words(stochastic, fmt, k0, k1, tid, slot, start, count, words)
    store_block(pf, ph, fmt, count, theta, stochastic, words)


@njit(parallel=True, **JIT)
def perturb_kernel(n_chunks, table, blocks, key0, key1, query, rademacher, scale, stochastic, slot):
    k0, k1, q, sl = np.uint64(key0), np.uint64(key1), np.uint64(query), np.uint64(slot)
    n_blocks = blocks[-1]
    for chunk in prange(n_chunks):
        words, buf = _scratch()
        for b in range(chunk, n_blocks, n_chunks):
            _perturb_block(table, blocks, b, k0, k1, q, rademacher, scale, stochastic, sl, words, buf)


@njit(**JIT)
def _sgd_block(table, blocks, b, k0, k1, rademacher, coeffs, lr, use_wd, wd, momentum,
               restore, restore_scale, restore_query, stochastic, slot, words, buf):
    t, base, count = _block(table, blocks, b)
    start = base + table[t, OFFSET]  # the contract's index of element base (a shard's global offset added)
    fmt, tid = table[t, FMT], np.uint64(table[t, TID])
    pf, ph = _param_views(table, t, base, count)
    z, g, curv, zr, theta = buf[0], buf[1], buf[2], buf[3], buf[4]
    _directions(rademacher, k0, k1, tid, start, count, coeffs, coeffs[:0], restore, restore_query,
                words, z, g, curv, zr)
    load_block(pf, ph, fmt, count, theta)
    has_buf = table[t, STATE0] != 0
    mom = _state_view(table, t, STATE0, base, count)
    for lo in range(count):
        th = theta[lo]
        if restore:
            th = th + restore_scale * zr[lo]
        d = g[lo]
        if use_wd:
            d = d + wd * th
        if has_buf:
            d = momentum * mom[lo] + d
            mom[lo] = d
        theta[lo] = th - lr * d
    _rounding_words(stochastic, fmt, k0, k1, tid, slot, start, count, words)
    store_block(pf, ph, fmt, count, theta, stochastic, words)


@njit(parallel=True, **JIT)
def sgd_kernel(n_chunks, table, blocks, key0, key1, rademacher, coeffs, lr, use_wd, wd, momentum,
               restore, restore_scale, restore_query, stochastic, slot):
    k0, k1, sl = np.uint64(key0), np.uint64(key1), np.uint64(slot)
    n_blocks = blocks[-1]
    for chunk in prange(n_chunks):
        words, buf = _scratch()
        for b in range(chunk, n_blocks, n_chunks):
            _sgd_block(table, blocks, b, k0, k1, rademacher, coeffs, lr, use_wd, wd, momentum,
                       restore, restore_scale, restore_query, stochastic, sl, words, buf)


@njit(**JIT)
def _adamw_block(table, blocks, b, k0, k1, rademacher, coeffs, decay, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, eps, step_size, bias2_sqrt, restore, restore_scale, restore_query,
                 stochastic, slot, words, buf):
    t, base, count = _block(table, blocks, b)
    start = base + table[t, OFFSET]  # the contract's index of element base (a shard's global offset added)
    fmt, tid = table[t, FMT], np.uint64(table[t, TID])
    pf, ph = _param_views(table, t, base, count)
    z, g, curv, zr, theta = buf[0], buf[1], buf[2], buf[3], buf[4]
    _directions(rademacher, k0, k1, tid, start, count, coeffs, coeffs[:0], restore, restore_query,
                words, z, g, curv, zr)
    load_block(pf, ph, fmt, count, theta)
    exp_avg = _state_view(table, t, STATE0, base, count)
    exp_avg_sq = _state_view(table, t, STATE1, base, count)
    for lo in range(count):
        th = theta[lo]
        if restore:
            th = th + restore_scale * zr[lo]
        th = th * decay
        ge = g[lo]
        m = beta1 * exp_avg[lo] + one_minus_beta1 * ge
        v = beta2 * exp_avg_sq[lo] + one_minus_beta2 * (ge * ge)
        exp_avg[lo] = m
        exp_avg_sq[lo] = v
        theta[lo] = th - step_size * (m / (math.sqrt(v) / bias2_sqrt + eps))
    _rounding_words(stochastic, fmt, k0, k1, tid, slot, start, count, words)
    store_block(pf, ph, fmt, count, theta, stochastic, words)


@njit(parallel=True, **JIT)
def adamw_kernel(n_chunks, table, blocks, key0, key1, rademacher, coeffs, decay, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, eps, step_size, bias2_sqrt, restore, restore_scale, restore_query,
                 stochastic, slot):
    k0, k1, sl = np.uint64(key0), np.uint64(key1), np.uint64(slot)
    n_blocks = blocks[-1]
    for chunk in prange(n_chunks):
        words, buf = _scratch()
        for b in range(chunk, n_blocks, n_chunks):
            _adamw_block(table, blocks, b, k0, k1, rademacher, coeffs, decay, beta1, one_minus_beta1, beta2,
                         one_minus_beta2, eps, step_size, bias2_sqrt, restore, restore_scale, restore_query,
                         stochastic, sl, words, buf)


@njit(**JIT)
def _precond_sgd_block(table, blocks, b, k0, k1, rademacher, coeffs, lr, use_wd, wd, hiso, update,
                       decay, rate, curv_coeffs, hessian_eps, floor, restore, restore_scale, restore_query,
                       stochastic, slot, words, buf):
    t, base, count = _block(table, blocks, b)
    start = base + table[t, OFFSET]  # the contract's index of element base (a shard's global offset added)
    fmt, tid = table[t, FMT], np.uint64(table[t, TID])
    pf, ph = _param_views(table, t, base, count)
    z, g, curv, zr, theta = buf[0], buf[1], buf[2], buf[3], buf[4]
    _directions(rademacher, k0, k1, tid, start, count, coeffs, curv_coeffs, restore, restore_query,
                words, z, g, curv, zr)
    load_block(pf, ph, fmt, count, theta)
    precond = _state_view(table, t, STATE0, base, count)
    for lo in range(count):
        old = precond[lo]
        s = _F1 / math.sqrt(old)
        th = theta[lo]
        if restore:
            th = th + restore_scale * (zr[lo] * s)
        ge = g[lo] * s
        d = ge
        if use_wd:
            d = d + wd * th
        if update:
            new = ge * ge + hessian_eps if hiso else old * curv[lo]
            p_new = decay * old + rate * new
            # clamp to [floor, float32 max]; NaN stays NaN (as torch.clamp)
            p_new = floor if p_new < floor else p_new
            precond[lo] = _F32_MAX if p_new > _F32_MAX else p_new
        theta[lo] = th - lr * d
    _rounding_words(stochastic, fmt, k0, k1, tid, slot, start, count, words)
    store_block(pf, ph, fmt, count, theta, stochastic, words)


@njit(parallel=True, **JIT)
def precond_sgd_kernel(n_chunks, table, blocks, key0, key1, rademacher, coeffs, lr, use_wd, wd, hiso, update,
                       decay, rate, curv_coeffs, hessian_eps, floor, restore, restore_scale, restore_query,
                       stochastic, slot):
    k0, k1, sl = np.uint64(key0), np.uint64(key1), np.uint64(slot)
    n_blocks = blocks[-1]
    for chunk in prange(n_chunks):
        words, buf = _scratch()
        for b in range(chunk, n_blocks, n_chunks):
            _precond_sgd_block(table, blocks, b, k0, k1, rademacher, coeffs, lr, use_wd, wd, hiso, update,
                               decay, rate, curv_coeffs, hessian_eps, floor, restore, restore_scale, restore_query,
                               stochastic, sl, words, buf)


@njit(**JIT)
def _helene_block(table, blocks, b, k0, k1, rademacher, coeffs, clip, lr, decay, alpha, beta1, beta2,
                  one_minus_beta2, gamma, eps, update, hessian_coeffs, restore, restore_scale, restore_query,
                  stochastic, slot, words, buf):
    t, base, count = _block(table, blocks, b)
    start = base + table[t, OFFSET]  # the contract's index of element base (a shard's global offset added)
    fmt, tid = table[t, FMT], np.uint64(table[t, TID])
    pf, ph = _param_views(table, t, base, count)
    z, g, curv, zr, theta = buf[0], buf[1], buf[2], buf[3], buf[4]
    _directions(rademacher, k0, k1, tid, start, count, coeffs, hessian_coeffs, restore, restore_query,
                words, z, g, curv, zr)
    load_block(pf, ph, fmt, count, theta)
    exp_avg = _state_view(table, t, STATE0, base, count)
    hessian = _state_view(table, t, STATE1, base, count)
    gnb = hessian_coeffs.shape[0] > 0
    lam = clip[t]
    for lo in range(count):
        th = theta[lo]
        if restore:
            th = th + restore_scale * zr[lo]
        th = th * decay
        ge = g[lo]
        m = beta1 * exp_avg[lo] + alpha * ge
        h = hessian[lo]
        if update:
            h_hat = curv[lo] if gnb else ge * ge
            h = beta2 * h + one_minus_beta2 * h_hat
            hessian[lo] = h
        exp_avg[lo] = m
        clipped = lam if h < lam else h  # torch.clamp(h, min=λ): NaN stays NaN
        theta[lo] = th - lr * (m / (gamma * clipped + eps))
    _rounding_words(stochastic, fmt, k0, k1, tid, slot, start, count, words)
    store_block(pf, ph, fmt, count, theta, stochastic, words)


@njit(parallel=True, **JIT)
def helene_kernel(n_chunks, table, blocks, key0, key1, rademacher, coeffs, clip, lr, decay, alpha, beta1, beta2,
                  one_minus_beta2, gamma, eps, update, hessian_coeffs, restore, restore_scale, restore_query,
                  stochastic, slot):
    k0, k1, sl = np.uint64(key0), np.uint64(key1), np.uint64(slot)
    n_blocks = blocks[-1]
    for chunk in prange(n_chunks):
        words, buf = _scratch()
        for b in range(chunk, n_blocks, n_chunks):
            _helene_block(table, blocks, b, k0, k1, rademacher, coeffs, clip, lr, decay, alpha, beta1, beta2,
                          one_minus_beta2, gamma, eps, update, hessian_coeffs, restore, restore_scale,
                          restore_query, stochastic, sl, words, buf)
