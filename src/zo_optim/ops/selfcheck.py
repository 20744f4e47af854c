"""Self-check of a backend on a device: the RNG contract's known answers and one pass of each op kind
against the reference, before the backend's first write there.

Why: the Triton kernels are compiled for whatever GPU the user has, by whatever Triton and driver are
installed, and a miscompiled or mis-ported kernel does not crash, it trains silently wrong. So the
first op of the ``triton`` backend on each (device, dtype) runs these checks on scratch tensors
(:func:`gate`, called by the dispatcher in :mod:`zo_optim.ops`) and caches the verdict for the
process:

* ``philox-kat`` — the Random123 known answers of Philox4x32-10 (docs/rng.md), bit for bit;
* ``rademacher`` — a perturb of zeros by ``scale = 1``: the stored values *are* z, bit for bit with
  :func:`zo_optim.rng.rademacher` (integer work);
* ``gaussian`` — the same with Gaussian z: within the contract's float32 tolerance ``1e-6`` of
  :func:`zo_optim.rng.normal` (log/sin/cos differ by library);
* per dtype, ``perturb`` — one Gaussian perturb of a random tensor against the reference op, within
  ``scale·1e-6 + 1 ulp`` of the stored dtype per element (z within 1e-6 moves θ + scale·z by at most
  scale·1e-6 before its one rounding, which can then land one ulp away);
* per dtype, ``restore+update`` — one fused restore + momentum-SGD update (q = 2, weight decay,
  Rademacher z, stochastic rounding for bf16/fp16) against the reference op: bit for bit, params and
  momentum buffer (Rademacher z makes every float32 operation the reference's);
* before the first op on shards of sharded tensors (FSDP2), ``shard-rademacher`` and ``shard-gaussian``
  — the two perturbs of zeros above, run as two shards of the tensor split at :data:`SHARD_SPLIT` (an
  offset that is a multiple of neither 4 nor 128) in one call: the same bounds against the contract's z
  of the whole tensor. Checked only when shards come (a separate kernel variant: no compile for others).

The scratch tensors have :data:`NUMEL` elements: two full blocks of the Triton default (the unmasked,
alignment-hinted path) and a masked tail. The reference always runs on the CPU (the spec). On a
mismatch, ``backend="auto"`` warns once per (backend, device) with what differed and how to report
it, and runs on ``chunked`` (the reference's code, on the tensors' device); an explicit
``backend="triton"`` raises before anything is written. ``zo-optim check`` runs the same checks,
uncached, for every backend on every device (:func:`run_checks`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .. import rng
from . import load_backend, reference

__all__ = ["GAUSSIAN_ATOL", "NUMEL", "Check", "SelfCheckWarning", "describe", "gate", "run_checks", "verified"]

#: Philox4x32-10 known answers (Random123's kat_vectors): counter, key, output words
KNOWN_ANSWERS = (
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
)
#: the contract's float32 tolerance on Gaussian z across devices (docs/rng.md)
GAUSSIAN_ATOL = 1e-6
#: elements of the scratch tensors: two full Triton blocks of 2048 and a masked tail of 77
NUMEL = 2 * 2048 + 77
#: where the second shard of the shard checks starts: past one full block of 2048 and not a multiple of the
#: 4-element Philox group or of Rademacher's 128 elements per counter, so its first block starts before it
SHARD_SPLIT = 2048 + 13
# Seed and tensor id with the top bit of every word set: the kernels pass uint32 words as int32 bit patterns.
SEED = 0x9E3779B97F4A7C15
TENSOR_ID = 0x80000003
PERTURB_SCALE = 1e-3
#: where ``backend="auto"`` runs instead of a backend that failed its self-check
FALLBACK = "chunked"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class SelfCheckWarning(UserWarning):
    """A backend failed its self-check and ``backend="auto"`` fell back to ``chunked``."""


@dataclass(frozen=True)
class Check:
    """One check of one backend on one device (and dtype: ``"-"`` for the dtype-independent ones)."""

    backend: str
    device: str
    dtype: str
    name: str
    max_err: float
    tol: str
    passed: bool
    detail: str = ""

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        extra = f": {self.detail}" if self.detail else ""
        return (f"{self.backend} on {self.device} {self.dtype} {self.name}: {verdict}, max error {self.max_err:.3g} "
                f"(allowed {self.tol}){extra}")


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()
    # NaN where the reference has none counts as an infinite error (a NaN in both is the same value)
    d = torch.where(a.isnan() & b.isnan(), torch.zeros_like(d), d.nan_to_num(nan=float("inf")))
    return float(d.max()) if d.numel() else 0.0


def _bitwise(backend, device, dtype, name, out: torch.Tensor, ref: torch.Tensor) -> Check:
    out, ref = out.cpu(), ref.cpu()
    same = torch.equal(out, ref)
    detail = "" if same else f"{int((out != ref).sum())} of {ref.numel()} elements differ"
    return Check(backend, str(device), dtype, name, _max_abs(out, ref), "0 (bitwise)", same, detail)


def _philox_words(backend: str, device: torch.device, counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The backend's own Philox on ``device``: its Triton function, its numba function, or the torch reference."""
    if backend == "triton":
        from .triton import probes

        return probes.philox_words(counters, keys, device)
    if backend == "cpu":
        import numpy as np

        from .cpu import _numerics

        out = np.empty(4 * counters.shape[0], dtype=np.uint32)
        for i, ((c0, c1, c2, c3), (k0, k1)) in enumerate(zip(counters.tolist(), keys.tolist(), strict=True)):
            words = [np.uint64(w) for w in (c0, c1, c2, c3, k0, k1)]  # the uint64 registers numba's kernels pass
            _numerics.philox_block(words[0], 1, *words[1:], out[4 * i:4 * i + 4])
        return torch.from_numpy(out.astype(np.int64)).reshape(-1, 4)
    return rng.philox4x32_10(counters.to(device), keys.to(device)).cpu()


def _rng_checks(backend: str, device: torch.device) -> list[Check]:
    mod = load_backend(backend)
    counters = torch.tensor([c for c, _, _ in KNOWN_ANSWERS], dtype=torch.int64)
    keys = torch.tensor([k for _, k, _ in KNOWN_ANSWERS], dtype=torch.int64)
    expected = torch.tensor([w for _, _, w in KNOWN_ANSWERS], dtype=torch.int64)
    out = [_bitwise(backend, device, "-", "philox-kat", _philox_words(backend, device, counters, keys), expected)]
    query = 3
    zeros = torch.zeros(NUMEL, device=device)
    mod.perturb_([zeros], [TENSOR_ID], SEED, 1.0, query=query, distribution="rademacher")
    out.append(_bitwise(backend, device, "-", "rademacher", zeros, rng.rademacher(SEED, TENSOR_ID, NUMEL, query)))
    zeros = torch.zeros(NUMEL, device=device)
    mod.perturb_([zeros], [TENSOR_ID], SEED, 1.0, query=query, distribution="gaussian")
    err = _max_abs(zeros.cpu(), rng.normal(SEED, TENSOR_ID, NUMEL, query))
    out.append(Check(backend, str(device), "-", "gaussian", err, f"{GAUSSIAN_ATOL:g}", err <= GAUSSIAN_ATOL))
    return out


def _shard_checks(backend: str, device: torch.device) -> list[Check]:
    mod = load_backend(backend)
    query, out = 3, []
    for dist in ("rademacher", "gaussian"):
        shards = [torch.zeros(SHARD_SPLIT, device=device), torch.zeros(NUMEL - SHARD_SPLIT, device=device)]
        if backend == "reference":  # the spec takes one offset per call
            for t, off in zip(shards, (0, SHARD_SPLIT), strict=True):
                mod.perturb_([t], [TENSOR_ID], SEED, 1.0, query=query, distribution=dist, offset=off)
        else:
            mod.perturb_(shards, [TENSOR_ID] * 2, SEED, 1.0, query=query, distribution=dist, offsets=[0, SHARD_SPLIT])
        got = torch.cat([t.cpu() for t in shards])
        if dist == "rademacher":
            out.append(_bitwise(backend, device, "-", "shard-rademacher", got, rng.rademacher(SEED, TENSOR_ID, NUMEL,
                                                                                                  query)))
        else:
            err = _max_abs(got, rng.normal(SEED, TENSOR_ID, NUMEL, query))
            out.append(Check(backend, str(device), "-", "shard-gaussian", err, f"{GAUSSIAN_ATOL:g}",
                             err <= GAUSSIAN_ATOL))
    return out


def _scratch(dtype: torch.dtype, salt: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(salt)
    return torch.randn(NUMEL, generator=gen).to(dtype)


def _op_checks(backend: str, device: torch.device, dtype: torch.dtype) -> list[Check]:
    mod = load_backend(backend)
    name = _DTYPES[dtype]
    low = dtype != torch.float32
    # perturb: Gaussian z, nearest rounding; the bound of each element is derived in the module docstring
    theta = _scratch(dtype, 1)
    got = theta.to(device, copy=True)  # a copy also on the CPU: the reference then runs on the original
    mod.perturb_([got], [TENSOR_ID], SEED, PERTURB_SCALE, query=1, distribution="gaussian")
    reference.perturb_([theta], [TENSOR_ID], SEED, PERTURB_SCALE, query=1, distribution="gaussian")
    ref = theta.double()
    bound = PERTURB_SCALE * GAUSSIAN_ATOL + torch.finfo(dtype).eps * ref.abs() + torch.finfo(dtype).tiny
    diff = (got.cpu().double() - ref).abs().nan_to_num(nan=float("inf"))
    n_out = int((diff > bound).sum())
    checks = [Check(backend, str(device), name, "perturb", float(diff.max()), "scale*1e-6 + 1 ulp", n_out == 0,
                    f"{n_out} of {NUMEL} elements beyond it" if n_out else "")]
    # fused restore + update: Rademacher z, momentum, weight decay, q = 2: bit for bit (the stochastic rounding
    # of bf16/fp16 uses the contract's rounding words, so it checks those too)
    theta, buf = _scratch(dtype, 2), _scratch(torch.float32, 3)
    got, got_buf = theta.to(device, copy=True), buf.to(device, copy=True)
    kw = dict(lr=0.1, weight_decay=0.01, momentum=0.9, restore_scale=PERTURB_SCALE, restore_query=1,
              distribution="rademacher", rounding="stochastic" if low else "nearest", rounding_slot=0)
    coeffs = torch.tensor([0.5, -1.25])
    mod.sgd_update_([got], [TENSOR_ID], SEED, coeffs.to(device), momentum_buffers=[got_buf], **kw)
    reference.sgd_update_([theta], [TENSOR_ID], SEED, coeffs, momentum_buffers=[buf], **kw)
    both = _bitwise(backend, device, name, "restore+update", torch.cat([got.cpu().float(), got_buf.cpu()]),
                    torch.cat([theta.float(), buf]))
    checks.append(both)
    return checks


def _guarded(backend: str, device: torch.device, dtype: str, name: str, fn, *args) -> list[Check]:
    # A kernel that does not compile or crashes on this device is a failed check, not a crash of the caller.
    try:
        return fn(*args)
    except Exception as exc:  # any failure of the backend is the finding
        return [Check(backend, str(device), dtype, name, float("inf"), "-", False, f"{type(exc).__name__}: {exc}")]


@torch.no_grad()
def run_checks(backend: str, device: torch.device | str, dtype: torch.dtype | None = None, *,
               shards: bool = False) -> list[Check]:
    """Run the checks of ``backend`` on ``device`` now (uncached): the RNG ones when ``dtype`` is None,
    else the op ones for that dtype (float32, bfloat16 or float16); with ``shards``, the shard-offset ones."""
    device = torch.device(device)
    if shards:
        return _guarded(backend, device, "-", "shards", _shard_checks, backend, device)
    if dtype is None:
        return _guarded(backend, device, "-", "rng", _rng_checks, backend, device)
    if dtype not in _DTYPES:
        raise ValueError(f"Invalid dtype: {dtype} (the self-check covers {', '.join(_DTYPES.values())})")
    return _guarded(backend, device, _DTYPES[dtype], "ops", _op_checks, backend, device, dtype)


_lock = threading.Lock()
_cache: dict[tuple[str, str, str], list[Check]] = {}
_warned: set[tuple[str, str]] = set()
_passed: set[tuple[str, torch.device, frozenset[torch.dtype], bool]] = set()


def verified(backend: str, device: torch.device, dtypes: Iterable[torch.dtype], sharded: bool = False) -> list[Check]:
    """The checks of ``backend`` on ``device`` for ``dtypes`` (the RNG ones, each dtype's, and with ``sharded``
    the shard-offset ones), run on first use and cached for the process."""
    keys = [("-", None)] + [(_DTYPES[d], d) for d in sorted(set(dtypes), key=str) if d in _DTYPES]
    if sharded:
        keys.append(("shards", None))
    out: list[Check] = []
    with _lock:
        for key, dtype in keys:
            k = (backend, str(device), key)
            if k not in _cache:
                _cache[k] = run_checks(backend, device, shards=True) if key == "shards" else run_checks(
                    backend, device, dtype)
            out += _cache[k]
    return out


def describe(checks: Iterable[Check]) -> str:
    return "; ".join(c.line() for c in checks)


def gate(requested: str, backend: str, device: torch.device, dtypes: Iterable[torch.dtype],
         sharded: bool = False) -> str:
    """The backend to run: ``backend`` when it passed its self-check on ``device`` for ``dtypes`` (and for
    shards, when ``sharded``), else
    :data:`FALLBACK` with one :class:`SelfCheckWarning` per (backend, device) when ``requested`` is
    ``"auto"``; a ``RuntimeError`` when ``backend`` was requested by name (nothing written yet)."""
    key = (backend, device, frozenset(dtypes), sharded)
    if key in _passed:  # the per-op fast path once verified: one set lookup
        return backend
    failed = [c for c in verified(backend, device, key[2], sharded) if not c.passed]
    if not failed:
        _passed.add(key)
        return backend
    what = describe(failed)
    report = ("Please report it: run `zo-optim check` on this machine and attach its output (it names the "
              "device and the torch/triton versions) to a bug report.")
    if requested != "auto":
        raise RuntimeError(
            f"backend {backend!r} failed its self-check on {device} and was not run (nothing was written): "
            f"{what}. Its results would not follow the RNG contract here. Use backend='auto' (falls back to "
            f"{FALLBACK!r} with a warning) or backend={FALLBACK!r}. {report}"
        )
    if (backend, str(device)) not in _warned:
        _warned.add((backend, str(device)))
        warnings.warn(
            f"zo-optim: backend {backend!r} FAILED its self-check on {device}: {what}. Its results would not "
            f"follow the RNG contract here, so backend='auto' runs these tensors on {FALLBACK!r} instead (the "
            f"reference's results on the same device, slower). {report} Pass backend={FALLBACK!r} to silence "
            "this warning.",
            SelfCheckWarning,
            stacklevel=4,
        )
    return FALLBACK
