r"""The RNG contract of zo-optim: a wire protocol, never changed silently.

Every participant (backend, device, rank, federated client) derives the same
perturbation from the same numbers. This module is the pure-torch reference of
that contract; the fast backends (`zo_optim.ops.cpu`, `zo_optim.ops.triton`)
must reproduce its integer words bit for bit and its float32 outputs within a
few ulp (log/sin/cos differ by library).

Streams (all keyed by the 64-bit step seed, key = (seed & 0xFFFFFFFF, seed >> 32)):

=====================  ==========================================  ==================
stream                 Philox counter (c0, c1, c2, c3)             element ``i`` uses
=====================  ==========================================  ==================
Gaussian z             (i // 4, tensor_id, query, 0)               Box-Muller slot i % 4
Rademacher z           (i // 128, tensor_id, query, 0)             bit i % 32 of word (i // 32) % 4
stochastic rounding    (i // 4, tensor_id, rounding_slot, 1)       word i % 4
=====================  ==========================================  ==================

* ``query`` is the index of the random direction within a step (0 … q-1).
* ``rounding_slot`` numbers the passes of one step that store low-precision
  values: 0 is the update pass, 1 + k the k-th perturbation pass of the step.
* ``tensor_id`` is the position of the tensor in the flattened list of all
  trainable params of all param groups (frozen params excluded before numbering).

Step seeds: ``step_seed(base_seed, t) = splitmix64(base_seed ^ splitmix64(t))``
for ``t`` = number of steps already applied. Federated rounds derive local-step
seeds the same way from (server seed, round, local step); see
:func:`round_seed`.

Gaussian: ``u_a = ((x_a >> 8) + 0.5) * 2**-24`` evaluated in float32 (the sum is
exact below 2**23 and rounds to even above, so ``u`` lies in (0, 1] and can be
exactly 1.0, giving z = ±0; every backend performs the same float32 operations),
``r0 = sqrt(-2 ln u0), phi0 = 2 pi u1, r1 = sqrt(-2 ln u2), phi1 = 2 pi u3`` and
the four outputs ``(r0 cos phi0, r0 sin phi0, r1 cos phi1, r1 sin phi1)``, all
float32. Because every counter yields four outputs, z of element ``i`` does not
depend on how a kernel blocks the tensor or groups tensors into launches.

Stochastic rounding of a float32 value ``x`` to bfloat16/float16: with ``lo <=
|x| <= hi`` the two neighbouring representable magnitudes (spacing ``ulp``),
``frac = (|x| - lo) / ulp`` (exact), and ``u = (w >> 8) * 2**-24`` from the
rounding word ``w``, the magnitude rounds up iff ``u < frac``. The sign is kept;
non-finite values and values outside the target's finite range fall back to
round-to-nearest-even. For bfloat16 this equals ``(w >> 16) < (bits(x) & 0xFFFF)``.

Out of contract: elements with index >= 2**32 * 4 in one tensor (the counter
word c0 would wrap); :func:`check_numel` raises for them.

Random123 reference: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011.
"""

from __future__ import annotations

import math

import torch

Device = torch.device | str | None

__all__ = [
    "MAX_NUMEL",
    "RNG_VERSION",
    "check_numel",
    "normal",
    "philox4x32_10",
    "rademacher",
    "round_seed",
    "rounding_words",
    "splitmix64",
    "step_seed",
    "stochastic_round",
]

RNG_VERSION = "philox4x32-10/bm4/v1"

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
TWO_PI_F32 = float(torch.tensor(2.0 * math.pi, dtype=torch.float32))
MAX_NUMEL = (1 << 32) * 4
"""Largest per-tensor element count the counter layout can address."""


def splitmix64(x: int) -> int:
    """One splitmix64 step (Steele, Lea, Flood 2014), all arithmetic mod 2**64."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def step_seed(base_seed: int, t: int) -> int:
    """Seed of local step ``t`` (steps already applied) for a run with ``base_seed``."""
    if t < 0:
        raise ValueError(f"Invalid step counter: {t}")
    return splitmix64((base_seed & MASK64) ^ splitmix64(t))


def round_seed(server_seed: int, round_idx: int, local_step: int) -> int:
    """Seed of local step ``local_step`` of federated round ``round_idx``.

    The federated protocol numbers local steps from 1; 0 is accepted (any
    ``local_step >= 0`` gives a seed) but is not used by it.

    Derived with the same mixing as :func:`step_seed`: the server seed is first
    mixed with the round number, then with the local step.
    """
    if round_idx < 0 or local_step < 0:
        raise ValueError(f"Invalid round/local step: {round_idx}/{local_step}")
    return step_seed(step_seed(server_seed, round_idx), local_step)


def check_numel(numel: int, what: str = "tensor") -> None:
    """Raise if a tensor has more elements than the counter layout addresses."""
    if numel > MAX_NUMEL:
        raise ValueError(
            f"{what} has {numel} elements, more than the RNG contract addresses per tensor "
            f"({MAX_NUMEL} = 2**32 * 4); split it into several parameters"
        )


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a constant a < 2**32 and int64 b < 2**32.

    Split into 16-bit halves so no intermediate exceeds 2**49 (no int64 overflow).
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo
    p_hi = b * a_hi
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 on int64 tensors holding uint32 words.

    Args:
        counter: int64 tensor ``[..., 4]`` of words in ``[0, 2**32)``.
        key: int64 tensor ``[..., 2]`` broadcastable against ``counter[..., :2]``.

    Returns:
        int64 tensor ``[..., 4]`` of output words in ``[0, 2**32)``.
    """
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise TypeError("philox4x32_10 takes int64 tensors holding uint32 words")
    if counter.shape[-1] != 4 or key.shape[-1] != 2:
        raise ValueError("philox4x32_10 takes counter [..., 4] and key [..., 2]")
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key[..., 0], key[..., 1]
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def _words(
    seed: int, tensor_id: int, n_counters: int, c2: int, c3: int, start: int = 0, device: Device = None
) -> torch.Tensor:
    """Philox output words ``[n_counters, 4]`` for counters (start + j, tensor_id, c2, c3), on ``device``."""
    if not 0 <= tensor_id <= MASK32 or not 0 <= c2 <= MASK32:
        raise ValueError(f"tensor_id/slot out of uint32 range: {tensor_id}/{c2}")
    seed &= MASK64
    j = torch.arange(start, start + n_counters, dtype=torch.int64, device=device)
    counter = torch.stack(
        [j, torch.full_like(j, tensor_id), torch.full_like(j, c2), torch.full_like(j, c3)], dim=-1
    )
    key = torch.tensor([seed & MASK32, seed >> 32], dtype=torch.int64, device=device)
    return philox4x32_10(counter, key)


def uniform24(words: torch.Tensor) -> torch.Tensor:
    """``((x >> 8) + 0.5) * 2**-24`` in float32: in (0, 1] (the sum rounds to even above 2**23)."""
    return ((words >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def box_muller4(words: torch.Tensor) -> torch.Tensor:
    """Four float32 normals from each row of four uint32 words (the contract's bm4)."""
    u = uniform24(words)
    r0 = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    r1 = torch.sqrt(-2.0 * torch.log(u[..., 2]))
    phi0 = TWO_PI_F32 * u[..., 1]
    phi1 = TWO_PI_F32 * u[..., 3]
    return torch.stack(
        [r0 * torch.cos(phi0), r0 * torch.sin(phi0), r1 * torch.cos(phi1), r1 * torch.sin(phi1)], dim=-1
    )


def _counter_span(numel: int, offset: int, per_counter: int) -> tuple[int, int, int]:
    """(first counter, number of counters, skip): the counters holding elements [offset, offset + numel),
    and how many leading outputs of the first one precede ``offset``."""
    if offset < 0:
        raise ValueError(f"Invalid offset: {offset} (an element index >= 0)")
    check_numel(offset + numel)
    first = offset // per_counter
    end = (offset + numel + per_counter - 1) // per_counter
    return first, end - first, offset - first * per_counter


def normal(
    seed: int, tensor_id: int, numel: int, query: int = 0, offset: int = 0, device: Device = None
) -> torch.Tensor:
    """Gaussian z of elements ``offset … offset + numel - 1`` of a tensor: float32 tensor ``[numel]`` on ``device``
    (default CPU; on another device log/sin/cos are that device's, within the contract's float32 tolerance)."""
    first, n_counters, skip = _counter_span(numel, offset, 4)
    z = box_muller4(_words(seed, tensor_id, n_counters, query, 0, start=first, device=device)).reshape(-1)
    return z[skip:skip + numel]


def rademacher(
    seed: int, tensor_id: int, numel: int, query: int = 0, offset: int = 0, device: Device = None
) -> torch.Tensor:
    """Rademacher z (+1/-1) of elements ``offset … offset + numel - 1``: float32 tensor ``[numel]`` on ``device``
    (default CPU; integer work, the same bits on every device)."""
    first, n_counters, skip = _counter_span(numel, offset, 128)
    words = _words(seed, tensor_id, n_counters, query, 0, start=first, device=device)  # [n, 4]
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64, device=words.device)) & 1  # [n, 4, 32]
    return (bits.reshape(-1)[skip:skip + numel].to(torch.float32) * 2.0) - 1.0


def rounding_words(
    seed: int, tensor_id: int, numel: int, rounding_slot: int, offset: int = 0, device: Device = None
) -> torch.Tensor:
    """The stochastic-rounding word of elements ``offset … offset + numel - 1``: int64 tensor of uint32 on
    ``device`` (default CPU; the same bits on every device)."""
    first, n_counters, skip = _counter_span(numel, offset, 4)
    words = _words(seed, tensor_id, n_counters, rounding_slot, 1, start=first, device=device)
    return words.reshape(-1)[skip:skip + numel]


_SR_FORMATS = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    """Round float32/float64 ``x`` to ``dtype`` stochastically with the contract's words.

    The reference definition (exact arithmetic in float64). ``x`` is first rounded
    to float32 (the fast backends' compute type), then to ``dtype``. For float32
    and float64 targets this is plain rounding.
    """
    if dtype not in _SR_FORMATS:
        return x.to(dtype)
    mant_bits, emin = _SR_FORMATS[dtype]
    x32 = x.to(torch.float32)
    a = x32.abs().to(torch.float64)
    _, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    exp = torch.clamp(e.to(torch.int64) - 1, min=emin)
    ulp = torch.pow(2.0, (exp - mant_bits).to(torch.float64))  # a Python base: on x's device, no CPU tensor
    q = a / ulp
    lo = torch.floor(q)
    frac = q - lo
    u = (words.reshape(x.shape) >> 8).to(torch.float64) * (2.0**-24)
    mag = (lo + (u < frac).to(torch.float64)) * ulp
    out = torch.copysign(mag, x32.to(torch.float64)).to(dtype)
    finfo = torch.finfo(dtype)
    plain = x32.to(dtype)
    keep_plain = ~torch.isfinite(x32) | (a > finfo.max) | (a == 0)
    return torch.where(keep_plain, plain, out)
