r"""``@triton.jit`` building blocks of the RNG contract (:mod:`zo_optim.rng`).

Everything here runs in registers on uint32/float32 tensors and reproduces the
pure-torch reference: the Philox words bit for bit, the Gaussian z within a few
float32 ulp (``log``/``sin``/``cos`` come from libdevice on GPU and numpy in the
interpreter), Rademacher signs and stochastic-rounding decisions bit for bit.

Layout convention: a block of ``BLOCK`` consecutive elements starting at element
``i0`` (a multiple of ``BLOCK``, itself a multiple of 128) needs the Philox
counters ``j0 .. j0 + BLOCK // 4 - 1`` with ``j0 = i0 // 4`` for the Gaussian
and rounding streams, and ``i0 // 128 .. + BLOCK // 128 - 1`` for Rademacher.
The four words of counter j are spread over elements ``4j .. 4j + 3`` with
``tl.join`` + ``tl.reshape`` (:func:`spread4`).
"""

from __future__ import annotations

import triton
import triton.language as tl

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
# float32(2*pi), the contract's TWO_PI_F32.
TWO_PI: tl.constexpr = tl.constexpr(6.2831854820251465)
TWO_POW_M24: tl.constexpr = tl.constexpr(5.9604644775390625e-08)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds (Random123 constants) on uint32 tensors/scalars.

    ``c0`` is a uint32 tensor; the other counter words and the key may be
    uint32 scalars (broadcast). Returns the four output words.
    """
    c1 = c1 + tl.zeros_like(c0)
    c2 = c2 + tl.zeros_like(c0)
    c3 = c3 + tl.zeros_like(c0)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        a = c0
        b = c2
        # lo words by wrapping uint32 multiplication, hi words by umulhi.
        c0 = tl.umulhi(b, PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(a, PHILOX_M0) ^ c3 ^ k1
        c1 = b * PHILOX_M1
        c3 = a * PHILOX_M0
    return c0, c1, c2, c3


@triton.jit
def spread4(x0, x1, x2, x3):
    """Four ``[N]`` tensors -> ``[4N]`` with element ``4j + a`` = ``x_a[j]``."""
    # join stacks along a new last axis: [j, a, b] holds x_{2b+a} for join(join(x0, x1), join(x2, x3)), so join the
    # pairs (x0, x2), (x1, x3) first to get [j, a, b] = x_{2a+b} at element 4j + 2a + b.
    n: tl.constexpr = x0.shape[0]
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (4 * n,))


@triton.jit
def _uniform24(x):
    # ((x >> 8) + 0.5) * 2**-24, exact in float32.
    return ((x >> 8).to(tl.float32) + 0.5) * TWO_POW_M24


@triton.jit
def box_muller4(x0, x1, x2, x3):
    """The contract's bm4: four float32 normals from four uint32 words."""
    u0 = _uniform24(x0)
    u1 = _uniform24(x1)
    u2 = _uniform24(x2)
    u3 = _uniform24(x3)
    # tl.log/sin/cos lower to libdevice's precise __nv_logf/__nv_sinf/__nv_cosf
    # (checked in the PTX); tl.sqrt would be sqrt.approx, so use sqrt_rn.
    r0 = tl.sqrt_rn(-2.0 * tl.log(u0))
    r1 = tl.sqrt_rn(-2.0 * tl.log(u2))
    phi0 = TWO_PI * u1
    phi1 = TWO_PI * u3
    return r0 * tl.cos(phi0), r0 * tl.sin(phi0), r1 * tl.cos(phi1), r1 * tl.sin(phi1)


@triton.jit
def _counters(i0, BLOCK: tl.constexpr):
    """Counter words c0 = i0 // 4 + t, t < BLOCK // 4 (one per four elements), uint32."""
    return (i0 // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)


@triton.jit
def gaussian_block(i0, k0, k1, tensor_id, query, BLOCK: tl.constexpr):
    """Gaussian z of elements ``i0 .. i0 + BLOCK - 1`` (i0 a multiple of 4), float32 [BLOCK]."""
    c0 = _counters(i0, BLOCK)
    x0, x1, x2, x3 = philox4x32_10(c0, tensor_id, query, tl.full((), 0, tl.uint32), k0, k1)
    z0, z1, z2, z3 = box_muller4(x0, x1, x2, x3)
    return spread4(z0, z1, z2, z3)


@triton.jit
def rademacher_block(i0, k0, k1, tensor_id, query, BLOCK: tl.constexpr):
    """Rademacher z (+-1.0) of elements ``i0 .. i0 + BLOCK - 1`` (i0 a multiple of 128)."""
    c0 = (i0 // 128 + tl.arange(0, BLOCK // 128)).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32_10(c0, tensor_id, query, tl.full((), 0, tl.uint32), k0, k1)
    words = spread4(x0, x1, x2, x3)  # [BLOCK // 32]: the word of elements 32w .. 32w + 31
    offs = tl.reshape(tl.arange(0, BLOCK), (BLOCK // 32, 32))
    bits = (words[:, None] >> (offs & 31).to(tl.uint32)) & 1
    return tl.reshape(bits.to(tl.float32) * 2.0 - 1.0, (BLOCK,))


@triton.jit
def direction_block(i0, k0, k1, tensor_id, query, RADEMACHER: tl.constexpr, BLOCK: tl.constexpr):
    if RADEMACHER:
        return rademacher_block(i0, k0, k1, tensor_id, query, BLOCK)
    else:
        return gaussian_block(i0, k0, k1, tensor_id, query, BLOCK)


@triton.jit
def rounding_block(i0, k0, k1, tensor_id, rounding_slot, BLOCK: tl.constexpr):
    """Stochastic-rounding words (counter (i // 4, tensor_id, slot, 1), word i % 4), uint32 [BLOCK]."""
    c0 = _counters(i0, BLOCK)
    x0, x1, x2, x3 = philox4x32_10(c0, tensor_id, rounding_slot, tl.full((), 1, tl.uint32), k0, k1)
    return spread4(x0, x1, x2, x3)


@triton.jit
def _bf16_from_bits(bits):
    """bfloat16 whose bits are the high half of uint32 ``bits`` (exact)."""
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def bf16_to_f32(x):
    """Exact bfloat16 -> float32 by bits (the interpreter's float conversion flushes bf16 subnormals)."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_rne(x):
    """float32 -> bfloat16, round to nearest even, by bits.

    Same result as the GPU's ``cvt.rn.bf16.f32`` and torch; the interpreter's own
    conversion truncates. Overflow carries into the exponent (-> inf); NaN -> 0x7FC0.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return _bf16_from_bits(tl.where(x != x, 0x7FC00000, rounded))


@triton.jit
def to_f32(x, DTYPE: tl.constexpr):
    """Loaded value of dtype ``DTYPE`` -> float32, exact."""
    if DTYPE == tl.bfloat16:
        return bf16_to_f32(x)
    else:
        return x.to(tl.float32)


@triton.jit
def round_nearest(x, DTYPE: tl.constexpr):
    """float32 -> ``DTYPE`` with round-to-nearest-even."""
    if DTYPE == tl.bfloat16:
        return f32_to_bf16_rne(x)
    else:
        return x.to(DTYPE)


@triton.jit
def _sr_bf16(x, w):
    # Round the magnitude up iff (w >> 16) < (bits & 0xFFFF); adding 0x10000 to the
    # bits increments the magnitude for either sign, carrying into the exponent.
    bits = x.to(tl.uint32, bitcast=True)
    up = (w >> 16) < (bits & 0xFFFF)
    out = (bits & 0xFFFF0000) + tl.where(up, 0x10000, 0).to(tl.uint32)
    # NaN/inf and |x| above bf16's max (0x7F7F0000) keep round-to-nearest-even.
    plain = (bits & 0x7FFFFFFF) > 0x7F7F0000
    return tl.where(plain, f32_to_bf16_rne(x), _bf16_from_bits(out))


@triton.jit
def _sr_fp16(x, w):
    # frac = (|x| - lo) / ulp with ulp = 2**(max(E, -14) - 10): exact float32 arithmetic
    # (power-of-two scalings, floor, and a subtraction of numbers in one binade).
    bits = x.to(tl.uint32, bitcast=True)
    mag_bits = bits & 0x7FFFFFFF
    e = tl.maximum((mag_bits >> 23).to(tl.int32) - 127, -14)
    inv_ulp = ((10 - e + 127) << 23).to(tl.float32, bitcast=True)
    ulp = ((e - 10 + 127) << 23).to(tl.float32, bitcast=True)
    q = mag_bits.to(tl.float32, bitcast=True) * inv_ulp
    lo = tl.floor(q)
    u = (w >> 8).to(tl.float32) * TWO_POW_M24
    mag = (lo + tl.where(u < q - lo, 1.0, 0.0)) * ulp
    out = (mag.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    # NaN/inf and |x| above fp16's max (65504 = 0x477FE000) keep round-to-nearest-even.
    plain = mag_bits > 0x477FE000
    return tl.where(plain, x, out).to(tl.float16)


@triton.jit
def stochastic_round(x, w, DTYPE: tl.constexpr):
    """Round float32 ``x`` to ``DTYPE`` (bf16/fp16) with rounding words ``w``; other dtypes: nearest."""
    if DTYPE == tl.bfloat16:
        return _sr_bf16(x, w)
    elif DTYPE == tl.float16:
        return _sr_fp16(x, w)
    else:
        return x.to(DTYPE)
