"""Scalar building blocks of the CPU kernels, compiled with numba.

Everything here reproduces :mod:`zo_optim.rng` and the float conversions torch
performs, one element (or one Philox counter) at a time:

* Philox4x32-10 on uint64 registers holding uint32 words (bit-identical to
  :func:`zo_optim.rng.philox4x32_10`);
* the contract's Box-Muller (``bm4``) and Rademacher bits;
* float32 <-> bfloat16/float16 by bit manipulation: numpy has no bfloat16, so
  low-precision tensors are addressed as uint16 and converted here, with
  round-to-nearest-even (torch's conversion) or the contract's stochastic
  rounding (:func:`zo_optim.rng.stochastic_round`), which for these formats is
  an integer comparison of the rounding word with the dropped mantissa bits.

All float arithmetic is float32 with ``fastmath=False`` (no FMA contraction, no
reassociation), in the order the reference backend performs it, so results agree
with :mod:`zo_optim.ops.reference` except where torch's log/sin/cos (Sleef, within
1 ulp) differ from the correctly rounded ones computed here by an ulp.

Functions work on blocks of elements (``*_block``) so that each stage is a simple
loop LLVM vectorises; the scalar helpers they call are inlined.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from ... import rng

JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")

F32, BF16, F16 = 0, 1, 2
"""Storage format codes of a parameter tensor."""

_MASK32 = np.uint64(0xFFFFFFFF)
_M0 = np.uint64(rng.PHILOX_M0)
_M1 = np.uint64(rng.PHILOX_M1)
_W0 = np.uint64(rng.PHILOX_W0)
_W1 = np.uint64(rng.PHILOX_W1)
_U8 = np.uint64(8)
_U32 = np.uint64(32)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)

_HALF_F32 = np.float32(0.5)
_TWO_M24 = np.float32(2.0**-24)
_MINUS_TWO = np.float32(-2.0)
_TWO_PI = np.float32(rng.TWO_PI_F32)
_PLUS1 = np.float32(1.0)
_MINUS1 = np.float32(-1.0)


# ---------------------------------------------------------------- raw memory


@intrinsic
def _f32_ptr(typingctx, addr):
    """int64 address -> float32*."""
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _u16_ptr(typingctx, addr):
    """int64 address -> uint16*."""
    sig = types.CPointer(types.uint16)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def f32_from_bits(typingctx, bits):
    """Reinterpret the low 32 bits of a uint64 as a float32."""
    sig = types.float32(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return sig, codegen


@intrinsic
def bits_from_f32(typingctx, x):
    """The bits of a float32 as a uint64 (zero-extended)."""
    sig = types.uint64(types.float32)

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return sig, codegen


@njit(**JIT)
def f32_array(addr, n):
    """The float32 array of ``n`` elements at ``addr``; empty when ``addr`` is 0 (no tensor)."""
    return carray(_f32_ptr(addr), (n if addr != 0 else 0,))


@njit(**JIT)
def u16_array(addr, n):
    """The uint16 array of ``n`` elements at ``addr``; empty when ``addr`` is 0 (no tensor)."""
    return carray(_u16_ptr(addr), (n if addr != 0 else 0,))


# ---------------------------------------------------------------- Philox / z


# Leaf helpers are inlined at numba level (inline="always"): when LLVM declined to inline
# ``philox`` into the counter loop, that loop stayed scalar (Philox + Box-Muller measured
# 5.1 instead of 1.9 ns/element on one Zen 4 core).
@njit(inline="always", **JIT)
def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10: uint64 registers holding uint32 words in, four words out."""
    # Masked inputs make the 32-bit range of every operand explicit (32x32->64-bit products).
    c0, c1, c2, c3 = c0 & _MASK32, c1 & _MASK32, c2 & _MASK32, c3 & _MASK32
    k0, k1 = k0 & _MASK32, k1 & _MASK32
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> _U32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _U32) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


@njit(**JIT)
def philox_block(first, count, tid, c2, c3, k0, k1, out):
    """Words of counters (first … first+count-1, tid, c2, c3), interleaved: out[4c + w] (uint32)."""
    for c in range(count):
        x0, x1, x2, x3 = philox(np.uint64(first + c), tid, c2, c3, k0, k1)
        out[4 * c] = np.uint32(x0)
        out[4 * c + 1] = np.uint32(x1)
        out[4 * c + 2] = np.uint32(x2)
        out[4 * c + 3] = np.uint32(x3)


# log and sin/cos without libm calls, so that LLVM vectorises the Box-Muller loop
# (libm calls keep it scalar: 9.3 ns/element against 1.9 ns/element measured for
# Philox + Box-Muller on one Zen 4 core). Evaluated in float64 and rounded once to
# float32, they equal the correctly rounded float32 log/sin/cos for every one of
# the 2**24 possible uniforms u (checked exhaustively against numpy's float64), so
# z agrees with the reference (torch/Sleef, <= 1 ulp) within a few ulp, max 7e-7.
_LN2 = np.float64(math.log(2.0))
_SQRT2 = np.float64(math.sqrt(2.0))
_TWO_OVER_PI = np.float64(2.0 / math.pi)
_PIO2_HI = np.float64(1.5707963267341256e00)  # fdlibm's pio2_1: 33 bits of pi/2
_PIO2_LO = np.float64(6.0771005065061922e-11)  # pio2_1t = pi/2 - pio2_1


@njit(inline="always", **JIT)
def log_f32(u):
    """log(u) for a positive normal float32, as the correctly rounded float32 (see above)."""
    bits = bits_from_f32(u)
    e = np.float64(np.int64((bits >> np.uint64(23)) & np.uint64(0xFF)) - 127)
    m = np.float64(f32_from_bits((bits & np.uint64(0x7FFFFF)) | np.uint64(0x3F800000)))  # [1, 2)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1.0 if big else e
    f = m - 1.0  # [sqrt(1/2) - 1, sqrt(2) - 1]
    s = f / (2.0 + f)  # log(1 + f) = 2 atanh(s), |s| < 0.172
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return np.float32(e * _LN2 + 2.0 * s * p)


@njit(inline="always", **JIT)
def sincos_f32(phi):
    """(sin, cos) of a float32 angle in [0, 2 pi], each the correctly rounded float32 (see above)."""
    x = np.float64(phi)
    k = np.int64(x * _TWO_OVER_PI + 0.5)
    kf = np.float64(k)
    r = (x - kf * _PIO2_HI) - kf * _PIO2_LO  # |r| <= pi/4 (Cody-Waite; exact enough for k <= 4)
    r2 = r * r
    sp = -1.0 / 1307674368000.0  # Taylor to r**15 / r**14: truncation < 3e-14 on |r| <= pi/4
    sp = sp * r2 + 1.0 / 6227020800.0
    sp = sp * r2 - 1.0 / 39916800.0
    sp = sp * r2 + 1.0 / 362880.0
    sp = sp * r2 - 1.0 / 5040.0
    sp = sp * r2 + 1.0 / 120.0
    sp = sp * r2 - 1.0 / 6.0
    sin_r = r + r * r2 * sp
    cp = 1.0 / 87178291200.0
    cp = cp * r2 - 1.0 / 479001600.0
    cp = cp * r2 + 1.0 / 3628800.0
    cp = cp * r2 - 1.0 / 40320.0
    cp = cp * r2 + 1.0 / 720.0
    cp = cp * r2 - 1.0 / 24.0
    cp = cp * r2 + 0.5
    cos_r = 1.0 - r2 * cp
    odd = (k & 1) != 0
    sn = cos_r if odd else sin_r
    cs = sin_r if odd else cos_r
    sn = -sn if (k & 2) != 0 else sn
    cs = -cs if ((k + 1) & 2) != 0 else cs
    return np.float32(sn), np.float32(cs)


@njit(inline="always", **JIT)
def _uniform24(x):
    return (np.float32(x >> np.uint32(8)) + _HALF_F32) * _TWO_M24


@njit(**JIT)
def gaussian_block(count, words, z):
    """The contract's bm4: z[4c … 4c+3] from words[4c … 4c+3] for c < count (float32 throughout)."""
    for c in range(count):
        r0 = math.sqrt(_MINUS_TWO * log_f32(_uniform24(words[4 * c])))
        r1 = math.sqrt(_MINUS_TWO * log_f32(_uniform24(words[4 * c + 2])))
        s0, c0 = sincos_f32(_TWO_PI * _uniform24(words[4 * c + 1]))
        s1, c1 = sincos_f32(_TWO_PI * _uniform24(words[4 * c + 3]))
        z[4 * c] = r0 * c0
        z[4 * c + 1] = r0 * s0
        z[4 * c + 2] = r1 * c1
        z[4 * c + 3] = r1 * s1


@njit(**JIT)
def z_block(rademacher, k0, k1, tid, query, first_group, count, words, z):
    """z of elements 4·first_group … + count of tensor ``tid`` into z[0:count].

    ``first_group`` must be a multiple of 32 (a Rademacher counter covers 32 groups).
    ``words`` is scratch of at least 4·ceil(count/4) uint32.
    """
    groups = (count + 3) // 4
    if rademacher:
        # Element i uses bit i % 32 of word (i // 32) % 4 of counter i // 128: with the words of
        # counters first_group/32 … interleaved, that is bit (l % 32) of words[l // 32] for l = i - 4·first.
        philox_block(first_group // 32, (groups + 31) // 32, tid, query, _ZERO, k0, k1, words)
        for lo in range(count):
            bit = (words[lo >> 5] >> np.uint32(lo & 31)) & np.uint32(1)
            z[lo] = _PLUS1 if bit != 0 else _MINUS1
        return
    philox_block(first_group, groups, tid, query, _ZERO, k0, k1, words)
    gaussian_block(groups, words, z)


# ---------------------------------------------------------------- float formats


@njit(inline="always", **JIT)
def half_to_f32(h):
    """IEEE binary16 bits (in a uint64) -> float32, exact."""
    sign = (h & np.uint64(0x8000)) << np.uint64(16)
    e = (h >> np.uint64(10)) & np.uint64(0x1F)
    m = h & np.uint64(0x3FF)
    if e == np.uint64(0x1F):  # inf / nan
        return f32_from_bits(sign | np.uint64(0x7F800000) | (m << np.uint64(13)))
    if e != _ZERO:
        return f32_from_bits(sign | ((e + np.uint64(112)) << np.uint64(23)) | (m << np.uint64(13)))
    mag = np.float32(m) * _TWO_M24  # subnormal (or zero): m * 2**-24, exact
    return -mag if sign != _ZERO else mag


@njit(inline="always", **JIT)
def bf16_nearest(bits):
    """float32 bits -> bfloat16 bits, round-to-nearest-even (torch's c10 conversion)."""
    if bits & np.uint64(0x7FFFFFFF) > np.uint64(0x7F800000):
        return np.uint64(0x7FC0)
    return (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & _ONE)) >> np.uint64(16)


@njit(inline="always", **JIT)
def f16_nearest(bits):
    """float32 bits -> float16 bits, round-to-nearest-even incl. subnormals and overflow to inf."""
    sign = (bits >> np.uint64(16)) & np.uint64(0x8000)
    a = bits & np.uint64(0x7FFFFFFF)
    if a > np.uint64(0x7F800000):  # nan
        return sign | np.uint64(0x7E00)
    if a >= np.uint64(0x477FF000):  # >= 65520 (incl. inf): rounds to inf
        return sign | np.uint64(0x7C00)
    if a >= np.uint64(0x38800000):  # >= 2**-14: normal half
        h = (a >> np.uint64(13)) - np.uint64(112 << 10)
        rem = a & np.uint64(0x1FFF)
        if rem > np.uint64(0x1000) or (rem == np.uint64(0x1000) and (h & _ONE) != _ZERO):
            h += _ONE
        return sign | h
    if a < np.uint64(0x33000000):  # < 2**-25: rounds to zero
        return sign
    shift = np.uint64(126) - (a >> np.uint64(23))  # 14 … 24: units of 2**-24
    m = (a & np.uint64(0x7FFFFF)) | np.uint64(0x800000)
    h = m >> shift
    rem = m & ((_ONE << shift) - _ONE)
    half = _ONE << (shift - _ONE)
    if rem > half or (rem == half and (h & _ONE) != _ZERO):
        h += _ONE
    return sign | h


@njit(inline="always", **JIT)
def bf16_stochastic(bits, w):
    """float32 bits -> bfloat16 bits, rounding up iff (w >> 16) < dropped bits (rng.stochastic_round)."""
    a = bits & np.uint64(0x7FFFFFFF)
    if a == _ZERO or a > np.uint64(0x7F7F0000):  # zero, beyond bf16 max, inf, nan: nearest
        return bf16_nearest(bits)
    h = bits >> np.uint64(16)
    if (w >> np.uint64(16)) < (bits & np.uint64(0xFFFF)):
        h += _ONE
    return h


@njit(inline="always", **JIT)
def f16_stochastic(bits, w):
    """float32 bits -> float16 bits with the contract's stochastic rounding.

    ``rng.stochastic_round`` rounds the magnitude up iff ``(w >> 8) * 2**-24 < frac``
    where ``frac`` = dropped bits / 2**shift. With ``r`` the dropped bits this is
    the integer test ``(w >> 8) * 2**shift < r * 2**24``: for a normal half
    (shift 13) ``(w >> 19) < r``; for a half subnormal shift = 126 - exponent
    (125 for float32 subnormals), compared without overflow below.
    """
    sign = (bits >> np.uint64(16)) & np.uint64(0x8000)
    a = bits & np.uint64(0x7FFFFFFF)
    if a == _ZERO or a > np.uint64(0x477FE000):  # zero, beyond 65504, inf, nan: nearest
        return f16_nearest(bits)
    u = w >> _U8  # 24 bits
    if a >= np.uint64(0x38800000):
        h = (a >> np.uint64(13)) - np.uint64(112 << 10)
        if (w >> np.uint64(19)) < (a & np.uint64(0x1FFF)):
            h += _ONE
        return sign | h
    e = a >> np.uint64(23)
    if e == _ZERO:
        shift = np.uint64(125)
        m = a
    else:
        shift = np.uint64(126) - e
        m = (a & np.uint64(0x7FFFFF)) | np.uint64(0x800000)
    if shift < np.uint64(24):
        h = m >> shift
        r = m & ((_ONE << shift) - _ONE)
        up = (u << shift) < (r << np.uint64(24))
    else:  # nothing survives the shift: h = 0, r = m < 2**24
        h = _ZERO
        if shift < np.uint64(48):
            up = (u << (shift - np.uint64(24))) < m
        else:
            up = u == _ZERO
    if up:
        h += _ONE
    return sign | h


@njit(**JIT)
def load_block(pf, ph, fmt, count, out):
    """out[0:count] = the first ``count`` elements of a parameter block as float32.

    ``pf``/``ph`` are the float32/uint16 views of the parameter (the one not
    matching ``fmt`` is empty); one loop per format so each vectorises.
    """
    if fmt == F32:
        for lo in range(count):
            out[lo] = pf[lo]
    elif fmt == BF16:
        for lo in range(count):
            out[lo] = f32_from_bits(np.uint64(ph[lo]) << np.uint64(16))
    else:
        for lo in range(count):
            out[lo] = half_to_f32(np.uint64(ph[lo]))


@njit(**JIT)
def store_block(pf, ph, fmt, count, values, stochastic, words):
    """Store values[0:count] into the parameter block: one rounding each (nearest-even, or stochastic
    with the contract's rounding word ``words[l]`` for bfloat16/float16)."""
    if fmt == F32:
        for lo in range(count):
            pf[lo] = values[lo]
    elif fmt == BF16:
        if stochastic:
            for lo in range(count):
                ph[lo] = np.uint16(bf16_stochastic(bits_from_f32(values[lo]), np.uint64(words[lo])))
        else:
            for lo in range(count):
                ph[lo] = np.uint16(bf16_nearest(bits_from_f32(values[lo])))
    elif stochastic:
        for lo in range(count):
            ph[lo] = np.uint16(f16_stochastic(bits_from_f32(values[lo]), np.uint64(words[lo])))
    else:
        for lo in range(count):
            ph[lo] = np.uint16(f16_nearest(bits_from_f32(values[lo])))
