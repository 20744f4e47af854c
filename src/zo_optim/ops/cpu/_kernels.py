"""The five parallel CPU kernels: one call per op over every tensor of the call.

A call describes its tensors in an int64 table (one row per tensor: data
address, element count, storage format, tensor id, up to two state-buffer
addresses; 0 where absent), like the Triton backend's address table. The work is
split into blocks of ``BLOCK_GROUPS`` Philox counters (4 elements each) over all
tensors at once, so one ``prange`` balances hundreds of mixed-size tensors (and
skips empty ones) with a single parallel launch.

Within a block, each counter ``j`` yields z of elements 4j … 4j+3 for every query
in registers (:func:`directions`); each op then does its elementwise update in
exactly the order of :mod:`zo_optim.ops.reference` and stores once.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._numerics import F32, JIT, f32_array, load, philox, store, u16_array, z4

BLOCK_GROUPS = 1024
"""Philox counters (4 elements each) per work item: 16 KiB of fp32 params."""

ADDR, NUMEL, FMT, TID, STATE0, STATE1 = range(6)
TABLE_COLUMNS = 6

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_U0 = np.uint64(0)
_U1 = np.uint64(1)


@njit(**JIT)
def _block(table, blocks, b):
    """Tensor row, first counter and end counter of work item ``b``."""
    t = np.searchsorted(blocks, b, side="right") - 1
    start = (b - blocks[t]) * BLOCK_GROUPS
    end = min(start + BLOCK_GROUPS, (table[t, NUMEL] + 3) // 4)
    return t, start, end


@njit(**JIT)
def _param_views(table, t):
    """(float32 view, uint16 view) of tensor row ``t``; the view not matching its format is empty."""
    n = table[t, NUMEL]
    fmt = table[t, FMT]
    pf = f32_array(table[t, ADDR] if fmt == F32 else 0, n)
    ph = u16_array(table[t, ADDR] if fmt != F32 else 0, n)
    return pf, ph


@njit(**JIT)
def _rounding_words(stochastic, fmt, j, tid, slot, k0, k1):
    """Stochastic-rounding words of counter ``j`` (zeros when not needed)."""
    if stochastic and fmt != F32:
        return philox(j, tid, slot, _U1, k0, k1)
    return _U0, _U0, _U0, _U0


@njit(**JIT)
def directions(rademacher, k0, k1, j, tid, coeffs, curv_coeffs, restore, restore_query):
    """For counter ``j``: ĝ = Σ_k c_k z_k, Σ_k a_k z_k², and z of the restore query (4-tuples).

    ``curv_coeffs`` of length 0 skips the curvature sum; sums start from 0 and run
    over k in order, like the reference.
    """
    g0 = g1 = g2 = g3 = _F0
    c0 = c1 = c2 = c3 = _F0
    r0 = r1 = r2 = r3 = _F0
    q = coeffs.shape[0]
    use_curv = curv_coeffs.shape[0] > 0
    for k in range(q):
        z0, z1, z2, z3 = z4(rademacher, k0, k1, j, tid, np.uint64(k))
        ck = coeffs[k]
        g0 = g0 + ck * z0
        g1 = g1 + ck * z1
        g2 = g2 + ck * z2
        g3 = g3 + ck * z3
        if use_curv:
            a = curv_coeffs[k]
            c0 = c0 + a * (z0 * z0)
            c1 = c1 + a * (z1 * z1)
            c2 = c2 + a * (z2 * z2)
            c3 = c3 + a * (z3 * z3)
        if restore and k == restore_query:
            r0, r1, r2, r3 = z0, z1, z2, z3
    if restore and restore_query >= q:
        r0, r1, r2, r3 = z4(rademacher, k0, k1, j, tid, np.uint64(restore_query))
    return (g0, g1, g2, g3), (c0, c1, c2, c3), (r0, r1, r2, r3)


@njit(parallel=True, **JIT)
def perturb_kernel(table, blocks, key0, key1, query, rademacher, scale, stochastic, slot):
    k0, k1, q, sl = np.uint64(key0), np.uint64(key1), np.uint64(query), np.uint64(slot)
    for b in prange(blocks[-1]):
        t, start, end = _block(table, blocks, b)
        n, fmt, tid = table[t, NUMEL], table[t, FMT], np.uint64(table[t, TID])
        pf, ph = _param_views(table, t)
        pre = f32_array(table[t, STATE0], n)
        has_pre = table[t, STATE0] != 0
        for j in range(start, end):
            uj = np.uint64(j)
            z = z4(rademacher, k0, k1, uj, tid, q)
            w = _rounding_words(stochastic, fmt, uj, tid, sl, k0, k1)
            for e in range(4):
                i = 4 * j + e
                if i >= n:
                    break
                u = z[e]
                if has_pre:
                    u = u * (_F1 / math.sqrt(pre[i]))
                store(pf, ph, fmt, i, load(pf, ph, fmt, i) + scale * u, stochastic, w[e])


@njit(parallel=True, **JIT)
def sgd_kernel(table, blocks, key0, key1, rademacher, coeffs, lr, use_wd, wd, momentum,
               restore, restore_scale, restore_query, stochastic, slot):
    k0, k1, sl = np.uint64(key0), np.uint64(key1), np.uint64(slot)
    no_curv = coeffs[:0]
    for b in prange(blocks[-1]):
        t, start, end = _block(table, blocks, b)
        n, fmt, tid = table[t, NUMEL], table[t, FMT], np.uint64(table[t, TID])
        pf, ph = _param_views(table, t)
        buf = f32_array(table[t, STATE0], n)
        has_buf = table[t, STATE0] != 0
        for j in range(start, end):
            uj = np.uint64(j)
            g, _, zr = directions(rademacher, k0, k1, uj, tid, coeffs, no_curv, restore, restore_query)
            w = _rounding_words(stochastic, fmt, uj, tid, sl, k0, k1)
            for e in range(4):
                i = 4 * j + e
                if i >= n:
                    break
                theta = load(pf, ph, fmt, i)
                if restore:
                    theta = theta + restore_scale * zr[e]
                d = g[e]
                if use_wd:
                    d = d + wd * theta
                if has_buf:
                    d = momentum * buf[i] + d
                    buf[i] = d
                store(pf, ph, fmt, i, theta - lr * d, stochastic, w[e])


@njit(parallel=True, **JIT)
def adamw_kernel(table, blocks, key0, key1, rademacher, coeffs, decay, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, eps, step_size, bias2_sqrt, restore, restore_scale, restore_query,
                 stochastic, slot):
    k0, k1, sl = np.uint64(key0), np.uint64(key1), np.uint64(slot)
    no_curv = coeffs[:0]
    for b in prange(blocks[-1]):
        t, start, end = _block(table, blocks, b)
        n, fmt, tid = table[t, NUMEL], table[t, FMT], np.uint64(table[t, TID])
        pf, ph = _param_views(table, t)
        exp_avg = f32_array(table[t, STATE0], n)
        exp_avg_sq = f32_array(table[t, STATE1], n)
        for j in range(start, end):
            uj = np.uint64(j)
            g, _, zr = directions(rademacher, k0, k1, uj, tid, coeffs, no_curv, restore, restore_query)
            w = _rounding_words(stochastic, fmt, uj, tid, sl, k0, k1)
            for e in range(4):
                i = 4 * j + e
                if i >= n:
                    break
                theta = load(pf, ph, fmt, i)
                if restore:
                    theta = theta + restore_scale * zr[e]
                theta = theta * decay
                ge = g[e]
                m = beta1 * exp_avg[i] + one_minus_beta1 * ge
                v = beta2 * exp_avg_sq[i] + one_minus_beta2 * (ge * ge)
                exp_avg[i] = m
                exp_avg_sq[i] = v
                store(pf, ph, fmt, i, theta - step_size * (m / (math.sqrt(v) / bias2_sqrt + eps)), stochastic, w[e])


@njit(parallel=True, **JIT)
def precond_sgd_kernel(table, blocks, key0, key1, rademacher, coeffs, lr, use_wd, wd, hiso, update,
                       decay, rate, curv_coeffs, hessian_eps, restore, restore_scale, restore_query,
                       stochastic, slot):
    k0, k1, sl = np.uint64(key0), np.uint64(key1), np.uint64(slot)
    for b in prange(blocks[-1]):
        t, start, end = _block(table, blocks, b)
        n, fmt, tid = table[t, NUMEL], table[t, FMT], np.uint64(table[t, TID])
        pf, ph = _param_views(table, t)
        precond = f32_array(table[t, STATE0], n)
        for j in range(start, end):
            uj = np.uint64(j)
            g, curv, zr = directions(rademacher, k0, k1, uj, tid, coeffs, curv_coeffs, restore, restore_query)
            w = _rounding_words(stochastic, fmt, uj, tid, sl, k0, k1)
            for e in range(4):
                i = 4 * j + e
                if i >= n:
                    break
                old = precond[i]
                s = _F1 / math.sqrt(old)
                theta = load(pf, ph, fmt, i)
                if restore:
                    theta = theta + restore_scale * (zr[e] * s)
                ge = g[e] * s
                d = ge
                if use_wd:
                    d = d + wd * theta
                if update:
                    new = ge * ge + hessian_eps if hiso else old * curv[e]
                    precond[i] = decay * old + rate * new
                store(pf, ph, fmt, i, theta - lr * d, stochastic, w[e])


@njit(parallel=True, **JIT)
def helene_kernel(table, blocks, key0, key1, rademacher, coeffs, clip, lr, decay, alpha, beta1, beta2,
                  one_minus_beta2, gamma, eps, update, hessian_coeffs, restore, restore_scale, restore_query,
                  stochastic, slot):
    k0, k1, sl = np.uint64(key0), np.uint64(key1), np.uint64(slot)
    gnb = hessian_coeffs.shape[0] > 0
    for b in prange(blocks[-1]):
        t, start, end = _block(table, blocks, b)
        n, fmt, tid = table[t, NUMEL], table[t, FMT], np.uint64(table[t, TID])
        pf, ph = _param_views(table, t)
        exp_avg = f32_array(table[t, STATE0], n)
        hessian = f32_array(table[t, STATE1], n)
        lam = clip[t]
        for j in range(start, end):
            uj = np.uint64(j)
            g, curv, zr = directions(rademacher, k0, k1, uj, tid, coeffs, hessian_coeffs, restore, restore_query)
            w = _rounding_words(stochastic, fmt, uj, tid, sl, k0, k1)
            for e in range(4):
                i = 4 * j + e
                if i >= n:
                    break
                theta = load(pf, ph, fmt, i)
                if restore:
                    theta = theta + restore_scale * zr[e]
                theta = theta * decay
                ge = g[e]
                m = beta1 * exp_avg[i] + alpha * ge
                h = hessian[i]
                if update:
                    h_hat = curv[e] if gnb else ge * ge
                    h = beta2 * h + one_minus_beta2 * h_hat
                    hessian[i] = h
                exp_avg[i] = m
                clipped = lam if h < lam else h  # torch.clamp(h, min=λ): NaN stays NaN
                store(pf, ph, fmt, i, theta - lr * (m / (gamma * clipped + eps)), stochastic, w[e])
