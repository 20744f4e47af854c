r"""Sparse perturbations (Sparse-MeZO): a step perturbs and updates only the smallest-magnitude weights.

The opt-in ``sparse_density=ρ`` of :class:`~.mezo.MeZO` (default ``None``: off). Before the first pass
of a step, while the weights are at θ, every trainable tensor W gets the mask of its smallest-magnitude
entries, a fraction ρ of them (exactly the ⌈ρ·n⌉ smallest for tensors of up to 2¹⁶ entries; for larger
ones the threshold is the ρ-quantile of every c-th entry, s_W ≤ 2¹⁶ of them, so the fraction is ρ within
a sampling error of about √(ρ(1−ρ)/s_W) ≤ 0.2 %)

.. math::
    \begin{aligned}
    &h_W = \text{the } \lceil \rho\, s_W \rceil\text{-th smallest of } |W_{j}|,\
        j \in \{0, c, 2c, \dots\},\ c = \lceil n_W / 2^{16} \rceil, \qquad
        m_W = \mathbb 1[\,|W| \le h_W\,] \\
    &g = \frac{L(\theta + \varepsilon\, m \odot z) - L(\theta - \varepsilon\, m \odot z)}{2\varepsilon},
        \qquad d = g\, (m \odot z) + \lambda\theta, \qquad
        \theta \leftarrow \theta - \gamma\,(b \leftarrow \mu b + d \text{ or } d)
    \end{aligned}

z is the contract's z (:mod:`zo_optim.rng`: same seed, tensor ids, streams and queries as a dense
step), so the direction of a masked coordinate is exactly the dense step's and a step is still
(seed, scalars): the mask is a function of θ alone, which every replica holds bit for bit, so
``apply_update(seed, g)`` and the federated replay recompute it and reproduce the weights exactly
(``tests/test_sparse_perturbation.py``). Ties at h_W are all inside the mask (so a few more than
⌈ρn⌉ coordinates can move); the mask is recomputed from the current θ at every step (the paper's
dynamic mask, with the threshold re-derived from the density instead of fixed at the start, so
nothing but ρ is state).

Why it can beat a dense probe (Liu et al. 2024, "Sparse MeZO: Less Parameters for Better Performance
in Zeroth-Order LLM Fine-Tuning", arXiv 2402.15751, ICML 2024): the noise of an SPSA step grows with
the number of perturbed coordinates, E‖g (m⊙z)‖² ≈ (ρD + 2)‖m⊙∇L‖², while its drift is
‖m⊙∇L‖²; the paper observes that the estimation error hurts most when added to large weights, and
reports a 3.5× speed-up over MeZO on RTE (LLaMA-7b) with a mask of small-magnitude weights. A mask
pays off only if ‖m⊙∇L‖²/‖∇L‖² > ρ (the masked weights hold more than their share of the gradient);
otherwise the larger stable lr (≈ 1/ρ×) is all it buys, and a tuned MeZO lr gets the same.

Cost per step: the same forwards as MeZO; one ``kthvalue`` over (a sample of) |W| per tensor and one
comparison; the masks are kept from the first pass to the update. Two paths, tested against each other:

* fast (every backend but ``reference``): the mask is handed to the backend's fused ops as a
  preconditioner P = 1 inside, +∞ outside (4 B/param, + the 1 B/param bool mask): their directions
  z/√P are then exactly m ⊙ z (1/√∞ = 0, θ + s·0 = θ), so a perturbation is one ``perturb_`` pass and
  the update one ``precond_sgd_update_`` pass with P frozen (HiSo's op). With momentum, the update runs
  in plain torch on z from the backend's kernel (:func:`backend_z_`, scratch buffers reused);
* reference (``backend="reference"``): plain torch, z from :mod:`zo_optim.rng` (:func:`reference_z`)
  times the mask, the formula above written out.

On a loaded 2-core CPU a step of 2.4 M parameters took ≈ 2–5× a dense MeZO step (the mask's abs,
kthvalue and comparison are extra passes over θ); the forwards, which the benchmarks count, are the same.
Restrictions: float32/float64 parameters, not DTensors (refused at construction or at the step, before
any write); MeZO only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import ops, rng
from ._plain import ScratchBuffers, check_plain_params, plain_sgd_update_

__all__ = ["SparsePerturbation", "backend_z_", "magnitude_mask", "reference_z"]


#: the threshold of a larger tensor is taken from a strided sample of this many entries (kthvalue is O(n) but
#: ~0.1 s per 10⁶ entries on one CPU core, as much as the step's three passes together)
MASK_SAMPLE = 1 << 16


def magnitude_mask(theta: torch.Tensor, density: float) -> torch.Tensor:
    """The bool mask |θ| ≤ h, h the ⌈density·s⌉-th smallest |θ| of the strided sample (module docstring)."""
    full = theta.detach().abs()
    a = full.reshape(-1)
    if a.numel() > MASK_SAMPLE:
        a = a[:: -(-a.numel() // MASK_SAMPLE)]  # every ⌈n/S⌉-th entry: at most S, a function of θ only
    k = max(1, math.ceil(density * a.numel()))
    if k >= a.numel():
        return torch.ones_like(theta, dtype=torch.bool)
    return full <= torch.kthvalue(a, k).values


def reference_z(seed: int, tid: int, p: torch.Tensor, query: int, distribution: str) -> torch.Tensor:
    """The contract's z of tensor ``tid`` in plain torch (:mod:`zo_optim.rng`): the reference path."""
    gen = rng.normal if distribution == "gaussian" else rng.rademacher
    return gen(seed, tid, p.numel(), query, device=p.device).to(p.dtype).reshape(p.shape)


def backend_z_(out: torch.Tensor, seed: int, tid: int, query: int, distribution: str, backend: str) -> torch.Tensor:
    """The same z from the optimizer's backend, written into the float32 buffer ``out``: the backend's fused
    perturbation op run on zeros (0 + 1·z = z exactly), so the numba/Triton generator does the work (the
    plain-torch generator is several times slower per element on CPU). The fast path; equal to
    :func:`reference_z` up to the backends' float32 rounding of z (``tests/test_sparse_perturbation.py``)."""
    out.zero_()
    ops.perturb_([out.view(-1)], [tid], seed, 1.0, query=query, distribution=distribution, backend=backend)
    return out


class SparsePerturbation:
    """Masks and masked passes (mixed into :class:`~.base.ZOOptimizer`; off unless ``sparse_density``)."""

    sparse_density: float | None = None
    _sparse_masks: dict[int, torch.Tensor]
    _tensor_ids: dict[int, int]

    def _set_sparse_density(self, density: float | None) -> None:
        if density is not None:
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
                raise ValueError(f"Invalid sparse_density: {density!r} (a fraction in (0, 1], or None for dense)")
            density = float(density)
            self._sparse_check_params()
        self.sparse_density = density
        self._sparse_masks = {}
        self._sparse_scratch = ScratchBuffers(torch.float32)  # z and m ⊙ z in float32
        self._sparse_precond: dict[int, torch.Tensor] = {}

    def _sparse_check_params(self) -> None:
        check_plain_params(self._trainable(), "sparse_density", "sparse_density=None")  # type: ignore[attr-defined]

    def _sparse_prepare(self, clean: bool) -> None:
        """Masks of the step from θ, when the weights are at θ (``clean``); otherwise keep the step's masks."""
        if self.sparse_density is None:
            return
        self._sparse_check_params()
        if clean or not self._sparse_masks:
            rho = self.sparse_density
            self._sparse_masks = {self._tensor_ids[id(p)]: magnitude_mask(p, rho)
                                  for p in self._trainable()}  # type: ignore[attr-defined]
            if self.backend != "reference":  # type: ignore[attr-defined]
                # the fast path's mask: P = 1 inside, +inf outside, as the fused ops' preconditioner (u = z/√P)
                for tid, m in self._sparse_masks.items():
                    P = self._sparse_precond.get(tid)
                    if P is None or P.shape != m.shape or P.device != m.device:
                        P = self._sparse_precond[tid] = torch.empty(m.shape, dtype=torch.float32, device=m.device)
                    P.fill_(math.inf).masked_fill_(m, 1.0)

    def _sparse_fast(self) -> bool:
        return self.backend != "reference"  # type: ignore[attr-defined]

    def _sparse_plain_update(self) -> bool:
        """Whether the masked update runs tensor by tensor in plain torch on a fused backend too (momentum)."""
        return self.sparse_density is not None and any(
            g.get("momentum", 0.0) != 0.0 for g in self.param_groups)  # type: ignore[attr-defined]

    def _sparse_u(self, p: torch.Tensor, tid: int, seed: int, query: int, distribution: str,
                  slot: int = 0) -> torch.Tensor:
        """u = m ⊙ z_query of tensor ``tid`` in a scratch buffer (valid until the slot's next use)."""
        out = self._sparse_scratch(p, slot)
        backend = self.backend  # type: ignore[attr-defined]
        if backend == "reference":
            out.copy_(reference_z(seed, tid, out, query, distribution))
        else:
            backend_z_(out, seed, tid, query, distribution, backend)
        return out.mul_(self._sparse_masks[tid])

    def _sparse_perturb(self, ps: list[torch.Tensor], ids: list[int], seed: int, query: int, scale: float,
                        distribution: str) -> None:
        """θ ← θ + scale·(m ⊙ z_query) on each tensor (one rounding per element, as the ops' ``nearest``)."""
        if self._sparse_fast():
            ops.perturb_(ps, ids, seed, scale, query=query, distribution=distribution,
                         precond=[self._sparse_precond[t] for t in ids], backend=self.backend)  # type: ignore
            return
        for p, tid in zip(ps, ids, strict=True):
            p.add_(self._sparse_u(p, tid, seed, query, distribution), alpha=scale)

    def _sparse_sgd_update(self, ps: list[torch.Tensor], ids: list[int], seed: int, coeffs: torch.Tensor, *,
                           lr: float, weight_decay: float, momentum: float, bufs: list[torch.Tensor] | None,
                           restore_scale: float, restore_query: int, distribution: str, **_: Any) -> None:
        """The masked restore + MeZO update of :func:`zo_optim.ops.reference.sgd_update_`, in place:
        θ_r = θ + restore_scale·u_r; d = Σ_k c_k u_k + wd·θ_r; b ← μb + d (if momentum); θ ← θ_r − lr·(b or d)."""
        if self._sparse_fast() and bufs is None:
            # one fused pass: HiSo's op with its preconditioner frozen; the directions z/√P are m ⊙ z
            ops.precond_sgd_update_(ps, ids, seed, coeffs, lr=lr, precond=[self._sparse_precond[t] for t in ids],
                                    rule="hiso", update_precond=False, precond_decay=1.0, precond_rate=0.0,
                                    weight_decay=weight_decay, restore_scale=restore_scale,
                                    restore_query=restore_query, distribution=distribution, **_)
            return
        plain_sgd_update_(ps, ids, coeffs, lambda p, tid, query, slot: self._sparse_u(p, tid, seed, query,
                                                                                    distribution, slot),
                          self._sparse_scratch, lr=lr, weight_decay=weight_decay, momentum=momentum, bufs=bufs,
                          restore_scale=restore_scale, restore_query=restore_query)
