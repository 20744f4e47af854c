r"""Triton backend of :mod:`zo_optim.ops`: fused kernels, one launch per (device, dtype) group.

Importing this package imports Triton; :mod:`zo_optim.ops` does so only when the
backend is requested (never at ``import zo_optim``). CPU tensors run through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before Triton was imported.

Layout: :mod:`._rng` (``@triton.jit`` Philox4x32-10, Box-Muller of all four words,
Rademacher bits, stochastic rounding), :mod:`.kernels` (one kernel per op) and
:mod:`.launch` (tables, table cache, launches).

Design (DESIGN §4):

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

Interpreter vs GPU (both paths are written for the GPU; differences found so far):

* ``tl.log``/``tl.sin``/``tl.cos`` are libdevice's precise ``__nv_logf``/``__nv_sinf``/
  ``__nv_cosf`` on GPU (checked in the PTX) and numpy's float32 functions in the
  interpreter: z agrees within a few ulp, not bitwise. libdevice calls
  (``triton.language.extra.libdevice``) do not run in the interpreter, so none are used.
* ``tl.sqrt`` and ``tl.rsqrt`` are approximate on GPU (``sqrt.approx.ftz``) but exact
  in the interpreter; the kernels use ``tl.sqrt_rn`` and ``tl.div_rn`` instead.
* Kernels are launched with ``enable_fp_fusion=False`` so the GPU does the same
  roundings as the interpreter (no mul+add contraction).

Still to validate and tune on a GPU (no GPU was available when this was written):
bit-exactness of the Philox words and rounding decisions on device (the tests do
this when run on a CUDA machine), the vectorisation of the unmasked path (PTX
inspection shows 128-bit accesses), ``DEFAULT_BLOCK``/``num_warps``, and the
fraction of copy bandwidth reached (``zo-optim bench kernels``).
"""

from .launch import adamw_update_, helene_update_, perturb_, precond_sgd_update_, sgd_update_

__all__ = ["adamw_update_", "helene_update_", "perturb_", "precond_sgd_update_", "sgd_update_"]
