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
with :mod:`zo_optim.ops.reference` except where libm's logf/sinf/cosf differ from
torch's by an ulp.
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


@njit(**JIT)
def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10: uint64 registers holding uint32 words in, four words out."""
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> _U32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _U32) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


@njit(**JIT)
def _uniform24(x):
    return (np.float32(x >> _U8) + _HALF_F32) * _TWO_M24


@njit(**JIT)
def z4(rademacher, k0, k1, j, tid, query):
    """z of elements 4j … 4j+3 of tensor ``tid`` for ``query`` (float32 4-tuple)."""
    if rademacher:
        words = philox(j >> np.uint64(5), tid, query, _ZERO, k0, k1)
        w = words[(j >> np.uint64(3)) & np.uint64(3)] >> (np.uint64(4) * (j & np.uint64(7)))
        return (
            _PLUS1 if w & _ONE else _MINUS1,
            _PLUS1 if (w >> _ONE) & _ONE else _MINUS1,
            _PLUS1 if (w >> np.uint64(2)) & _ONE else _MINUS1,
            _PLUS1 if (w >> np.uint64(3)) & _ONE else _MINUS1,
        )
    x0, x1, x2, x3 = philox(j, tid, query, _ZERO, k0, k1)
    r0 = math.sqrt(_MINUS_TWO * math.log(_uniform24(x0)))
    r1 = math.sqrt(_MINUS_TWO * math.log(_uniform24(x2)))
    phi0 = _TWO_PI * _uniform24(x1)
    phi1 = _TWO_PI * _uniform24(x3)
    return r0 * math.cos(phi0), r0 * math.sin(phi0), r1 * math.cos(phi1), r1 * math.sin(phi1)


# ---------------------------------------------------------------- float formats


@njit(**JIT)
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


@njit(**JIT)
def load(pf, ph, fmt, i):
    """Element ``i`` of a parameter as float32 (pf: float32 view, ph: uint16 view)."""
    if fmt == F32:
        return pf[i]
    h = np.uint64(ph[i])
    if fmt == BF16:
        return f32_from_bits(h << np.uint64(16))
    return half_to_f32(h)


@njit(**JIT)
def bf16_nearest(bits):
    """float32 bits -> bfloat16 bits, round-to-nearest-even (torch's c10 conversion)."""
    if bits & np.uint64(0x7FFFFFFF) > np.uint64(0x7F800000):
        return np.uint64(0x7FC0)
    return (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & _ONE)) >> np.uint64(16)


@njit(**JIT)
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


@njit(**JIT)
def bf16_stochastic(bits, w):
    """float32 bits -> bfloat16 bits, rounding up iff (w >> 16) < dropped bits (rng.stochastic_round)."""
    a = bits & np.uint64(0x7FFFFFFF)
    if a == _ZERO or a > np.uint64(0x7F7F0000):  # zero, beyond bf16 max, inf, nan: nearest
        return bf16_nearest(bits)
    h = bits >> np.uint64(16)
    if (w >> np.uint64(16)) < (bits & np.uint64(0xFFFF)):
        h += _ONE
    return h


@njit(**JIT)
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
def store(pf, ph, fmt, i, x, stochastic, w):
    """Store float32 ``x`` into element ``i``: one rounding to the parameter's format."""
    if fmt == F32:
        pf[i] = x
        return
    bits = bits_from_f32(x)
    if fmt == BF16:
        h = bf16_stochastic(bits, w) if stochastic else bf16_nearest(bits)
    else:
        h = f16_stochastic(bits, w) if stochastic else f16_nearest(bits)
    ph[i] = np.uint16(h)
