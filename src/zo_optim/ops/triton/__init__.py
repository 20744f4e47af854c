r"""Triton backend of :mod:`zo_optim.ops`: fused kernels, one launch per (device, dtype) group.

Importing this package imports Triton; :mod:`zo_optim.ops` does so only when the
backend is requested (never at ``import zo_optim``). CPU tensors run through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before Triton was imported.

Layout: :mod:`._rng` (``@triton.jit`` Philox4x32-10, Box-Muller of all four words,
Rademacher bits, stochastic rounding), :mod:`.kernels` (one kernel per op) and
:mod:`.launch` (tables, table cache, launches).

Design (see docs/backends.md):

* **One launch per (device, dtype) group** over all tensors of the call: an int64
  slot table (address, numel, tensor_id, state addresses) and a block table
  (program → slot, block index), cached on the host per call signature.
* **z in registers** from the RNG contract: each Philox counter's four words feed
  four consecutive elements (Gaussian: bm4; Rademacher: 128 elements per counter).
* **float32 math, one rounding per store**: nearest-even, or stochastic for
  bf16/fp16 parameters (``rounding="stochastic"``) from the contract's rounding
  stream (counter (i // 4, tensor_id, rounding_slot, 1)).
* **Unmasked fast path**: only a tensor's tail block is masked; when every
  address is 16-byte aligned the unmasked path is compiled with alignment hints
  (128-bit loads/stores).
* **No host sync**: per-query scalars (``coeffs``, ``precond_coeffs``,
  ``hessian_coeffs``) are read through pointers; host scalars are arguments. The
  query loop, the restore of the last perturbation and the state updates (momentum,
  Adam m/v, HiZOO Σ, HiSo K, HELENE m/h) are one pass.

Interpreter vs GPU (both paths are written for the GPU; the divergences found, and
what the kernels do about them):

* ``tl.log``/``tl.sin``/``tl.cos`` are libdevice's precise ``__nv_logf``/``__nv_sinf``/
  ``__nv_cosf`` on GPU (checked in the PTX) and numpy's float32 functions in the
  interpreter: z agrees within a few ulp, not bitwise. Explicit libdevice calls
  (``triton.language.extra.libdevice``) do not run in the interpreter; none are used.
* ``tl.sqrt``/``tl.rsqrt``/``/`` are approximate on GPU (``sqrt.approx.ftz``,
  ``rsqrt.approx``) but exact in the interpreter: the kernels use ``tl.sqrt_rn`` and
  ``tl.div_rn``, which are IEEE on both.
* float32 -> bfloat16 ``.to()`` truncates in the interpreter (RNE on GPU), and
  bfloat16 -> float32 flushes subnormals there: both conversions are done by bits
  (:func:`._rng.f32_to_bf16_rne`, :func:`._rng.bf16_to_f32`), exact on both.
* A ``range`` loop variable is a Python int in the interpreter (no ``.to``): use
  ``tl.cast``/``tl.full``.
* Kernels are launched with ``enable_fp_fusion=False`` so the GPU does the same
  roundings as the interpreter (no mul+add contraction): with Rademacher z the
  results equal the reference bit for bit.

Cost model (sm_90 SASS of the Triton 3.9 compile, ``benchmarks/triton_sass.py --cost``):
one Philox counter (four Gaussian outputs) takes ~330 thread instructions on the fast
path: Philox-10 ~70 (40 IMAD, ~25 LOP3; the key schedule runs on the uniform
datapath), Box-Muller ~260 (two logf, two sqrt_rn, two sinf + two cosf with their
range reduction, four int->float). That is ~83 instructions per element for Gaussian z
and ~5 for Rademacher (one counter per 128 elements). An H100 SXM issues
132 SMs x 128 thread-instr/clk x ~1.75 GHz ~ 30e12 instr/s, so Gaussian z is
generated at most at ~360e9 elements/s per query, against a memory rate of ~375e9
elements/s for a float32 perturb (8 B/element at ~3 TB/s copy bandwidth) and ~750e9
for bfloat16 (4 B/element). Hence: float32 perturb ~balanced, bfloat16 perturb with
Gaussian z compute-bound (~half the copy bandwidth); Rademacher and the state-heavy
updates (AdamW: 20-24 B/element) memory-bound. The issue's "90% of copy bandwidth
for bf16" needs <~40 instr/element, out of reach with precise bm4 + Philox-10.
Cheapest gains, to try on a GPU: one sincos with a shared Cody-Waite reduction for
phi in [0, 2 pi) and no slow path (~-70 instr/counter), a log specialised to u in (0, 1).

Self-check: before the first write on each (device, dtype), :mod:`zo_optim.ops.selfcheck` runs the Philox
known answers (:mod:`.probes`), z and one perturb and one fused update against the reference; a mismatch
raises for ``backend="triton"`` and falls back to ``chunked`` with a warning for ``"auto"``.

Still to validate and tune on a GPU (no GPU was available when this was written):
run ``tests/test_triton_backend.py`` and ``tests/test_ops.py`` on CUDA (they use
CUDA tensors when available: Philox words, rounding decisions bit for bit, z within
1e-6); ``DEFAULT_BLOCK`` (2048) and ``num_warps`` (8): chosen from registers per
thread (60-80 at 2048, no spills, 3-4 programs per SM), not timed; the fraction of
copy bandwidth reached (``zo-optim bench kernels``); the H2D copy of a table on a
cache miss (~5 MB for OPT-1.3b's 388 tensors at 2048 elements per block).
"""

from .launch import adamw_update_, helene_update_, perturb_, precond_sgd_update_, sgd_update_

__all__ = ["adamw_update_", "helene_update_", "perturb_", "precond_sgd_update_", "sgd_update_"]
