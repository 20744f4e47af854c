r"""The ``@triton.jit`` kernels of the Triton backend (launchers in :mod:`.launch`).

One program handles one block of ``BLOCK`` consecutive elements of one tensor.
All tensors of a (device, dtype) group go through one launch: the program reads
its entry of the *block table* (``blk_tab[pid] = slot << 32 | block index``) and
then its tensor's row of the *slot table* (int64 ``[n_slots, NCOL]``):

======  =============================================================
column  content
======  =============================================================
0       address of the parameter (``DTYPE``)
1       numel
2       tensor_id (the RNG contract's counter word 1)
3 …     addresses of the float32 state buffers of this op (0 if absent);
        then HELENE's clip λ_i as float32 bits
last    with ``SHARDED``: the tensor's offset, the contract index of its
        element 0 (a shard of a sharded tensor; see :func:`_block_row`)
======  =============================================================

Every kernel follows the same shape: read the row, then run the op's body either
unmasked (the block lies inside the tensor: the fast path, vectorised loads
when ``ALIGNED``) or masked (the tensor's tail block). The body generates z in
registers, does all arithmetic in float32 in the order of
:mod:`zo_optim.ops.reference`, and rounds once per store (nearest-even, or
stochastic from the contract's rounding stream when ``STOCHASTIC``).

Per-query device scalars (``coeffs`` and the curvature scalars) are read through
pointers inside the query loop, so no launch needs a host sync. The query loop is
unrolled (``NUM_Q`` is a compile-time constant, fixed per optimizer): a runtime
loop made the compiler carry its tensors in a layout that differs from z's and
convert them through shared memory every query (seen in the TTGIR).
``restore_query`` is a runtime value.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rng import direction_block, round_nearest, rounding_block, stochastic_round, to_f32

# Runtime ints that vary from step to step must not be specialised (Triton would
# otherwise compile a variant for values equal to 1 or divisible by 16).
_RUNTIME_INTS = ["seed_lo", "seed_hi", "query", "rounding_slot", "restore_query"]


# ----------------------------------------------------------------------------- table access


@triton.jit
def _block_row(slot_tab, blk_tab, NCOL: tl.constexpr, SHARDED: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK: tl.constexpr):
    """(row pointer, i0, l0, elements of the tensor from l0 on, tensor_id) of this program.

    i0 is the contract index of the block's first element (a multiple of BLOCK: the RNG streams are
    generated for whole aligned blocks) and l0 its index in the tensor's memory. They differ for a
    shard (SHARDED): its block table counts the blocks of the *unsharded* tensor that overlap it, and
    the last column holds the shard's offset (the contract index of its element 0), so l0 = i0 - offset
    may be negative (the first block starts before the shard) and the masked path masks both ends.
    """
    blk = tl.load(blk_tab + tl.program_id(0))
    row = slot_tab + (blk >> 32) * NCOL
    i0 = (blk & 0xFFFFFFFF) * BLOCK
    numel = tl.load(row + 1)
    tensor_id = tl.load(row + 2).to(tl.uint32)
    if SHARDED:
        offset = tl.load(row + NCOL - 1)
        if ALIGNED:
            # The launcher checked offset % 16 == 0; written as (offset // 16) * 16 (the same value) so the
            # compiler knows l0's divisibility and keeps the 128-bit accesses of the alignment hint.
            offset = (offset // 16) * 16
        l0 = i0 - offset
    else:
        l0 = i0
    return row, i0, l0, numel - l0, tensor_id


@triton.jit
def _column_ptr(row, COL: tl.constexpr, DTYPE: tl.constexpr, l0, ALIGNED: tl.constexpr):
    """Pointer to element l0 of the tensor whose address is in column COL (l0 < 0: before it, masked)."""
    ptr = tl.load(row + COL).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # The launcher checked that every address is 16-byte aligned; the hint lets
        # unmasked blocks use 128-bit loads/stores (l0 is a multiple of BLOCK, or of 16 for a shard).
        ptr = tl.multiple_of(ptr, 16)
    return ptr + l0


@triton.jit
def _offsets(BLOCK: tl.constexpr):
    # Four contiguous elements per thread: exactly one Philox counter's outputs, so
    # the z computed per counter and the loaded values share one register layout.
    # (Left alone, the compiler picks 8 bf16/fp16 elements per thread for 16-byte
    # accesses and then converts every z block through shared memory; 8-byte
    # accesses stay fully coalesced.)
    return tl.max_contiguous(tl.arange(0, BLOCK), 4)


@triton.jit
def _in_tensor(offs, l0, rem):
    # offs < rem: the tail block; offs >= -l0: a shard's first block may start before the shard (l0 < 0)
    return (offs >= -l0) & (offs < rem)


@triton.jit
def _load(ptr, l0, rem, MASKED: tl.constexpr, BLOCK: tl.constexpr, other: tl.constexpr = 0.0):
    """Float32 values of the block (masked: ``other`` outside the tensor)."""
    offs = _offsets(BLOCK)
    if MASKED:
        x = tl.load(ptr + offs, mask=_in_tensor(offs, l0, rem), other=other)
    else:
        x = tl.load(ptr + offs)
    return to_f32(x, ptr.dtype.element_ty)


@triton.jit
def _store(ptr, value, l0, rem, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = _offsets(BLOCK)
    if MASKED:
        tl.store(ptr + offs, value, mask=_in_tensor(offs, l0, rem))
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _store_param(ptr, x, l0, rem, i0, k0, k1, tensor_id, rounding_slot,
                 DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """The one rounding of the new parameter value (float32 ``x``) to ``DTYPE``."""
    if STOCHASTIC:
        w = rounding_block(i0, k0, k1, tensor_id, rounding_slot.to(tl.uint32), BLOCK)
        y = stochastic_round(x, w, DTYPE)
    else:
        y = round_nearest(x, DTYPE)
    _store(ptr, y, l0, rem, MASKED, BLOCK)


# ----------------------------------------------------------------------------- shared prologue


@triton.jit
def _restore_and_estimate(p_ptr, s, l0, rem, i0, k0, k1, tensor_id, coeffs, curv_coeffs, NUM_Q: tl.constexpr,
                          restore_scale, restore_query, HAS_PRECOND: tl.constexpr, HAS_RESTORE: tl.constexpr,
                          RESTORE_IN_Q: tl.constexpr, CURV: tl.constexpr, RADEMACHER: tl.constexpr,
                          MASKED: tl.constexpr, BLOCK: tl.constexpr):
    r"""θ_r (θ restored from the last perturbation), ĝ = s ⊙ Σ_k c_k z_k and curv = Σ_k a_k z_k².

    ``s`` is precond^{-1/2} (ignored unless HAS_PRECOND). The restore direction is
    taken from the query loop when ``restore_query < q`` (RESTORE_IN_Q), so the
    fused pass generates each z once.
    """
    theta = _load(p_ptr, l0, rem, MASKED, BLOCK)
    # Query 0 is peeled off the loop: the loop-carried tensors then start in the
    # layout of z (a zeros() init would get a default layout and cost a shared-memory
    # conversion per query, seen in the TTGIR). "+ 0.0" keeps the reference's
    # zeros-initialised sum exact, signed zeros included.
    z = direction_block(i0, k0, k1, tensor_id, tl.full((), 0, tl.uint32), RADEMACHER, BLOCK)
    g = tl.load(coeffs) * z + 0.0
    curv = g
    if CURV:
        curv = tl.load(curv_coeffs) * (z * z) + 0.0
    z_restore = z  # right when restore_query == 0; replaced below otherwise
    for k in tl.static_range(1, NUM_Q):
        z = direction_block(i0, k0, k1, tensor_id, tl.full((), k, tl.uint32), RADEMACHER, BLOCK)
        g = g + tl.load(coeffs + k) * z
        if CURV:
            curv = curv + tl.load(curv_coeffs + k) * (z * z)
        if HAS_RESTORE and RESTORE_IN_Q:
            # A select, not an if: a branch yielding tensors defeats the layout propagation.
            z_restore = tl.where(k == restore_query, z, z_restore)
    if HAS_RESTORE:
        if not RESTORE_IN_Q:
            z_restore = direction_block(i0, k0, k1, tensor_id, restore_query.to(tl.uint32), RADEMACHER, BLOCK)
        if HAS_PRECOND:
            z_restore = z_restore * s
        theta = theta + restore_scale * z_restore
    if HAS_PRECOND:
        g = g * s
    return theta, g, curv


@triton.jit
def _seed_words(seed_lo, seed_hi):
    # The launcher passes the key words as int32 bit patterns (one signature for every seed).
    return seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True)


@triton.jit
def _inv_sqrt(p):
    # Correctly rounded 1/sqrt(p) like torch.rsqrt on CPU (tl.rsqrt is rsqrt.approx on GPU).
    return tl.div_rn(tl.full(p.shape, 1.0, tl.float32), tl.sqrt_rn(p))


# ----------------------------------------------------------------------------- perturb_


@triton.jit
def _perturb_body(row, i0, l0, rem, k0, k1, tensor_id, scale, query, rounding_slot,
                  NCOL: tl.constexpr, DTYPE: tl.constexpr, HAS_PRECOND: tl.constexpr, RADEMACHER: tl.constexpr,
                  STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    p_ptr = _column_ptr(row, 0, DTYPE, l0, ALIGNED)
    theta = _load(p_ptr, l0, rem, MASKED, BLOCK)
    z = direction_block(i0, k0, k1, tensor_id, query, RADEMACHER, BLOCK)
    if HAS_PRECOND:
        s_ptr = _column_ptr(row, 3, tl.float32, l0, ALIGNED)
        z = z * _inv_sqrt(_load(s_ptr, l0, rem, MASKED, BLOCK, 1.0))
    _store_param(p_ptr, theta + scale * z, l0, rem, i0, k0, k1, tensor_id, rounding_slot,
                 DTYPE, STOCHASTIC, MASKED, BLOCK)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def perturb_kernel(slot_tab, blk_tab, seed_lo, seed_hi, scale, query, rounding_slot,
                   NCOL: tl.constexpr, DTYPE: tl.constexpr, HAS_PRECOND: tl.constexpr, RADEMACHER: tl.constexpr,
                   STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, SHARDED: tl.constexpr, BLOCK: tl.constexpr):
    r"""θ ← θ + scale · z_query ⊙ precond^{-1/2}."""
    row, i0, l0, rem, tensor_id = _block_row(slot_tab, blk_tab, NCOL, SHARDED, ALIGNED, BLOCK)
    k0, k1 = _seed_words(seed_lo, seed_hi)
    q = query.to(tl.uint32)
    if (rem >= BLOCK) & (l0 >= 0):
        _perturb_body(row, i0, l0, rem, k0, k1, tensor_id, scale, q, rounding_slot, NCOL, DTYPE, HAS_PRECOND,
                      RADEMACHER, STOCHASTIC, ALIGNED, False, BLOCK)
    else:
        _perturb_body(row, i0, l0, rem, k0, k1, tensor_id, scale, q, rounding_slot, NCOL, DTYPE, HAS_PRECOND,
                      RADEMACHER, STOCHASTIC, ALIGNED, True, BLOCK)


# ----------------------------------------------------------------------------- sgd_update_


@triton.jit
def _sgd_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, NUM_Q: tl.constexpr, lr, weight_decay, momentum,
              restore_scale, restore_query, rounding_slot, NCOL: tl.constexpr, DTYPE: tl.constexpr,
              HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_RESTORE: tl.constexpr, RESTORE_IN_Q: tl.constexpr,
              RADEMACHER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
              BLOCK: tl.constexpr):
    p_ptr = _column_ptr(row, 0, DTYPE, l0, ALIGNED)
    theta, g, _ = _restore_and_estimate(p_ptr, 1.0, l0, rem, i0, k0, k1, tensor_id, coeffs, coeffs, NUM_Q,
                                        restore_scale, restore_query, False, HAS_RESTORE, RESTORE_IN_Q, False,
                                        RADEMACHER, MASKED, BLOCK)
    d = g
    if HAS_WD:
        d = g + weight_decay * theta
    if HAS_MOMENTUM:
        b_ptr = _column_ptr(row, 3, tl.float32, l0, ALIGNED)
        d = momentum * _load(b_ptr, l0, rem, MASKED, BLOCK) + d
        _store(b_ptr, d, l0, rem, MASKED, BLOCK)
    _store_param(p_ptr, theta - lr * d, l0, rem, i0, k0, k1, tensor_id, rounding_slot, DTYPE, STOCHASTIC, MASKED, BLOCK)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def sgd_kernel(slot_tab, blk_tab, seed_lo, seed_hi, coeffs, lr, weight_decay, momentum, restore_scale,
               restore_query, rounding_slot, NCOL: tl.constexpr, DTYPE: tl.constexpr, HAS_WD: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, HAS_RESTORE: tl.constexpr, RESTORE_IN_Q: tl.constexpr,
               RADEMACHER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
               SHARDED: tl.constexpr, NUM_Q: tl.constexpr, BLOCK: tl.constexpr):
    r"""θ ← θ_r − lr·d, d = ĝ + wd·θ_r, with heavy-ball d ← μb + d (b stored) when HAS_MOMENTUM."""
    row, i0, l0, rem, tensor_id = _block_row(slot_tab, blk_tab, NCOL, SHARDED, ALIGNED, BLOCK)
    k0, k1 = _seed_words(seed_lo, seed_hi)
    if (rem >= BLOCK) & (l0 >= 0):
        _sgd_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, NUM_Q, lr, weight_decay, momentum, restore_scale,
                  restore_query, rounding_slot, NCOL, DTYPE, HAS_WD, HAS_MOMENTUM, HAS_RESTORE, RESTORE_IN_Q,
                  RADEMACHER, STOCHASTIC, ALIGNED, False, BLOCK)
    else:
        _sgd_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, NUM_Q, lr, weight_decay, momentum, restore_scale,
                  restore_query, rounding_slot, NCOL, DTYPE, HAS_WD, HAS_MOMENTUM, HAS_RESTORE, RESTORE_IN_Q,
                  RADEMACHER, STOCHASTIC, ALIGNED, True, BLOCK)


# ----------------------------------------------------------------------------- adamw_update_


@triton.jit
def _adamw_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, NUM_Q: tl.constexpr, decay, beta1, one_minus_beta1, beta2,
                one_minus_beta2, step_size, bias2_sqrt, eps, restore_scale, restore_query, rounding_slot,
                NCOL: tl.constexpr, DTYPE: tl.constexpr, HAS_RESTORE: tl.constexpr, RESTORE_IN_Q: tl.constexpr,
                RADEMACHER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                BLOCK: tl.constexpr):
    p_ptr = _column_ptr(row, 0, DTYPE, l0, ALIGNED)
    theta, g, _ = _restore_and_estimate(p_ptr, 1.0, l0, rem, i0, k0, k1, tensor_id, coeffs, coeffs, NUM_Q,
                                        restore_scale, restore_query, False, HAS_RESTORE, RESTORE_IN_Q, False,
                                        RADEMACHER, MASKED, BLOCK)
    theta = theta * decay
    m_ptr = _column_ptr(row, 3, tl.float32, l0, ALIGNED)
    v_ptr = _column_ptr(row, 4, tl.float32, l0, ALIGNED)
    m = beta1 * _load(m_ptr, l0, rem, MASKED, BLOCK) + one_minus_beta1 * g
    v = beta2 * _load(v_ptr, l0, rem, MASKED, BLOCK) + one_minus_beta2 * (g * g)
    _store(m_ptr, m, l0, rem, MASKED, BLOCK)
    _store(v_ptr, v, l0, rem, MASKED, BLOCK)
    new = theta - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps)
    _store_param(p_ptr, new, l0, rem, i0, k0, k1, tensor_id, rounding_slot, DTYPE, STOCHASTIC, MASKED, BLOCK)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def adamw_kernel(slot_tab, blk_tab, seed_lo, seed_hi, coeffs, decay, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, step_size, bias2_sqrt, eps, restore_scale, restore_query, rounding_slot,
                 NCOL: tl.constexpr, DTYPE: tl.constexpr, HAS_RESTORE: tl.constexpr, RESTORE_IN_Q: tl.constexpr,
                 RADEMACHER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
               SHARDED: tl.constexpr, NUM_Q: tl.constexpr, BLOCK: tl.constexpr):
    r"""AdamW (torch.optim.AdamW's arithmetic) on ĝ; ``decay`` = 1 − lr·wd, ``step_size`` = lr/(1−β1^t)."""
    row, i0, l0, rem, tensor_id = _block_row(slot_tab, blk_tab, NCOL, SHARDED, ALIGNED, BLOCK)
    k0, k1 = _seed_words(seed_lo, seed_hi)
    if (rem >= BLOCK) & (l0 >= 0):
        _adamw_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, NUM_Q, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, step_size, bias2_sqrt, eps, restore_scale, restore_query, rounding_slot,
                    NCOL, DTYPE, HAS_RESTORE, RESTORE_IN_Q, RADEMACHER, STOCHASTIC, ALIGNED, False, BLOCK)
    else:
        _adamw_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, NUM_Q, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, step_size, bias2_sqrt, eps, restore_scale, restore_query, rounding_slot,
                    NCOL, DTYPE, HAS_RESTORE, RESTORE_IN_Q, RADEMACHER, STOCHASTIC, ALIGNED, True, BLOCK)


# ----------------------------------------------------------------------------- precond_sgd_update_


@triton.jit
def _precond_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, precond_coeffs, NUM_Q: tl.constexpr, lr, weight_decay,
                  precond_decay, precond_rate, hessian_eps, precond_min, restore_scale, restore_query, rounding_slot,
                  NCOL: tl.constexpr, DTYPE: tl.constexpr, HAS_WD: tl.constexpr, UPDATE: tl.constexpr,
                  HIZOO: tl.constexpr, HAS_RESTORE: tl.constexpr, RESTORE_IN_Q: tl.constexpr,
                  RADEMACHER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                  BLOCK: tl.constexpr):
    p_ptr = _column_ptr(row, 0, DTYPE, l0, ALIGNED)
    s_ptr = _column_ptr(row, 3, tl.float32, l0, ALIGNED)
    old = _load(s_ptr, l0, rem, MASKED, BLOCK, 1.0)
    theta, g, curv = _restore_and_estimate(p_ptr, _inv_sqrt(old), l0, rem, i0, k0, k1, tensor_id, coeffs,
                                           precond_coeffs, NUM_Q, restore_scale, restore_query, True, HAS_RESTORE,
                                           RESTORE_IN_Q, UPDATE and HIZOO, RADEMACHER, MASKED, BLOCK)
    d = g
    if HAS_WD:
        d = g + weight_decay * theta
    if UPDATE:
        if HIZOO:
            new = old * curv
        else:
            new = g * g + hessian_eps
        p_new = precond_decay * old + precond_rate * new
        # clamp to [precond_min, float32 max] with compares, so NaN stays NaN (as torch.clamp; fmaxf would drop it)
        p_new = tl.where(p_new < precond_min, precond_min, p_new)
        p_new = tl.where(p_new > 3.4028234663852886e38, 3.4028234663852886e38, p_new)
        _store(s_ptr, p_new, l0, rem, MASKED, BLOCK)
    _store_param(p_ptr, theta - lr * d, l0, rem, i0, k0, k1, tensor_id, rounding_slot, DTYPE, STOCHASTIC, MASKED, BLOCK)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def precond_kernel(slot_tab, blk_tab, seed_lo, seed_hi, coeffs, precond_coeffs, lr, weight_decay,
                   precond_decay, precond_rate, hessian_eps, precond_min, restore_scale, restore_query, rounding_slot,
                   NCOL: tl.constexpr, DTYPE: tl.constexpr, HAS_WD: tl.constexpr, UPDATE: tl.constexpr,
                   HIZOO: tl.constexpr, HAS_RESTORE: tl.constexpr, RESTORE_IN_Q: tl.constexpr,
                   RADEMACHER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
               SHARDED: tl.constexpr, NUM_Q: tl.constexpr, BLOCK: tl.constexpr):
    r"""Preconditioned SGD with u = z/√P and the P update (HiZOO Σ or HiSo K) in the same pass."""
    row, i0, l0, rem, tensor_id = _block_row(slot_tab, blk_tab, NCOL, SHARDED, ALIGNED, BLOCK)
    k0, k1 = _seed_words(seed_lo, seed_hi)
    if (rem >= BLOCK) & (l0 >= 0):
        _precond_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, precond_coeffs, NUM_Q, lr, weight_decay,
                      precond_decay, precond_rate, hessian_eps, precond_min, restore_scale, restore_query,
                      rounding_slot, NCOL,
                      DTYPE, HAS_WD, UPDATE, HIZOO, HAS_RESTORE, RESTORE_IN_Q, RADEMACHER, STOCHASTIC, ALIGNED,
                      False, BLOCK)
    else:
        _precond_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, precond_coeffs, NUM_Q, lr, weight_decay,
                      precond_decay, precond_rate, hessian_eps, precond_min, restore_scale, restore_query,
                      rounding_slot, NCOL,
                      DTYPE, HAS_WD, UPDATE, HIZOO, HAS_RESTORE, RESTORE_IN_Q, RADEMACHER, STOCHASTIC, ALIGNED,
                      True, BLOCK)


# ----------------------------------------------------------------------------- helene_update_


@triton.jit
def _helene_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, hessian_coeffs, NUM_Q: tl.constexpr, lr, decay, alpha,
                 beta1, beta2, one_minus_beta2, gamma, eps, restore_scale, restore_query, rounding_slot,
                 NCOL: tl.constexpr, DTYPE: tl.constexpr, UPDATE: tl.constexpr, GNB: tl.constexpr,
                 HAS_RESTORE: tl.constexpr, RESTORE_IN_Q: tl.constexpr, RADEMACHER: tl.constexpr,
                 STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    p_ptr = _column_ptr(row, 0, DTYPE, l0, ALIGNED)
    theta, g, curv = _restore_and_estimate(p_ptr, 1.0, l0, rem, i0, k0, k1, tensor_id, coeffs, hessian_coeffs, NUM_Q,
                                           restore_scale, restore_query, False, HAS_RESTORE, RESTORE_IN_Q,
                                           UPDATE and GNB, RADEMACHER, MASKED, BLOCK)
    theta = theta * decay
    m_ptr = _column_ptr(row, 3, tl.float32, l0, ALIGNED)
    h_ptr = _column_ptr(row, 4, tl.float32, l0, ALIGNED)
    clip = tl.load(row + 5).to(tl.uint32).to(tl.float32, bitcast=True)
    m = beta1 * _load(m_ptr, l0, rem, MASKED, BLOCK) + alpha * g
    h = _load(h_ptr, l0, rem, MASKED, BLOCK)
    if UPDATE:
        if GNB:
            h_hat = curv
        else:
            h_hat = g * g
        h = beta2 * h + one_minus_beta2 * h_hat
        _store(h_ptr, h, l0, rem, MASKED, BLOCK)
    _store(m_ptr, m, l0, rem, MASKED, BLOCK)
    # torch.clamp propagates NaN; so does this maximum.
    denom = gamma * tl.maximum(h, clip, propagate_nan=tl.PropagateNan.ALL) + eps
    new = theta - lr * tl.div_rn(m, denom)
    _store_param(p_ptr, new, l0, rem, i0, k0, k1, tensor_id, rounding_slot, DTYPE, STOCHASTIC, MASKED, BLOCK)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def helene_kernel(slot_tab, blk_tab, seed_lo, seed_hi, coeffs, hessian_coeffs, lr, decay, alpha, beta1,
                  beta2, one_minus_beta2, gamma, eps, restore_scale, restore_query, rounding_slot,
                  NCOL: tl.constexpr, DTYPE: tl.constexpr, UPDATE: tl.constexpr, GNB: tl.constexpr,
                  HAS_RESTORE: tl.constexpr, RESTORE_IN_Q: tl.constexpr, RADEMACHER: tl.constexpr,
                  STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
               SHARDED: tl.constexpr, NUM_Q: tl.constexpr, BLOCK: tl.constexpr):
    r"""HELENE: m ← β1 m + α ĝ; h ← β2 h + (1−β2) ĥ; θ ← θ_r(1 − lr·wd) − lr·m/(γ max(h, λ_i) + δ)."""
    row, i0, l0, rem, tensor_id = _block_row(slot_tab, blk_tab, NCOL, SHARDED, ALIGNED, BLOCK)
    k0, k1 = _seed_words(seed_lo, seed_hi)
    if (rem >= BLOCK) & (l0 >= 0):
        _helene_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, hessian_coeffs, NUM_Q, lr, decay, alpha, beta1,
                     beta2, one_minus_beta2, gamma, eps, restore_scale, restore_query, rounding_slot, NCOL, DTYPE,
                     UPDATE, GNB, HAS_RESTORE, RESTORE_IN_Q, RADEMACHER, STOCHASTIC, ALIGNED, False, BLOCK)
    else:
        _helene_body(row, i0, l0, rem, k0, k1, tensor_id, coeffs, hessian_coeffs, NUM_Q, lr, decay, alpha, beta1,
                     beta2, one_minus_beta2, gamma, eps, restore_scale, restore_query, rounding_slot, NCOL, DTYPE,
                     UPDATE, GNB, HAS_RESTORE, RESTORE_IN_Q, RADEMACHER, STOCHASTIC, ALIGNED, True, BLOCK)
