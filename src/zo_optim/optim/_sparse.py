r"""Sparse perturbations (Sparse-MeZO): a step perturbs and updates only the smallest-magnitude weights.

The opt-in ``sparse_density=ρ`` of :class:`~.mezo.MeZO` (default ``None``: off). Before the first pass
of a step, while the weights are at θ, every trainable tensor W gets the mask of its ⌈ρ·n⌉
smallest-magnitude entries

.. math::
    \begin{aligned}
    &h_W = \text{the } \lceil \rho\, n_W \rceil\text{-th smallest } |W_{ij}|, \qquad
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

Cost per step: the same forwards as MeZO; one ``kthvalue`` over |W| per tensor (O(n)); the masks are
kept from the first pass to the update, 1 byte per parameter (bool). The passes run in plain torch on
every backend (z materialised per tensor, as the reference backend does): there is no fused kernel
for the masked passes, so a step costs about what a reference-backend MeZO step costs.
Restrictions: float32/float64 parameters, not DTensors (refused at construction or at the step, before
any write); MeZO only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import rng
from ..ops import _sharding

__all__ = ["SparsePerturbation", "magnitude_mask"]


def magnitude_mask(theta: torch.Tensor, density: float) -> torch.Tensor:
    """The bool mask of the ⌈density·n⌉ smallest |θ| of ``theta`` (ties at the threshold included)."""
    a = theta.detach().abs().reshape(-1)
    k = max(1, math.ceil(density * a.numel()))
    if k >= a.numel():
        return torch.ones_like(theta, dtype=torch.bool)
    h = torch.kthvalue(a.float() if a.dtype != torch.float64 else a, k).values
    return (theta.detach().abs() <= h).reshape(theta.shape)


def _z(seed: int, tid: int, p: torch.Tensor, query: int, distribution: str) -> torch.Tensor:
    gen = rng.normal if distribution == "gaussian" else rng.rademacher
    return gen(seed, tid, p.numel(), query, device=p.device).to(p.dtype).reshape(p.shape)


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

    def _sparse_check_params(self) -> None:
        for i, p in enumerate(self._trainable()):  # type: ignore[attr-defined]
            if _sharding.is_dtensor(p) or p.dtype not in (torch.float32, torch.float64):
                kind = " (a DTensor)" if _sharding.is_dtensor(p) else ""
                raise ValueError(
                    f"sparse_density: trainable parameter {i} is {p.dtype}{kind}"
                    "; the masked passes run in plain torch on float32/float64 local tensors only. Nothing was "
                    "changed: keep those weights in float32 (not sharded), or use sparse_density=None"
                )

    def _sparse_prepare(self, clean: bool) -> None:
        """Masks of the step from θ, when the weights are at θ (``clean``); otherwise keep the step's masks."""
        if self.sparse_density is None:
            return
        self._sparse_check_params()
        if clean or not self._sparse_masks:
            rho = self.sparse_density
            self._sparse_masks = {self._tensor_ids[id(p)]: magnitude_mask(p, rho)
                                  for p in self._trainable()}  # type: ignore[attr-defined]

    def _sparse_direction(self, p: torch.Tensor, tid: int, seed: int, query: int, distribution: str) -> torch.Tensor:
        return _z(seed, tid, p, query, distribution) * self._sparse_masks[tid]

    def _sparse_perturb(self, ps: list[torch.Tensor], ids: list[int], seed: int, query: int, scale: float,
                        distribution: str) -> None:
        """θ ← θ + scale·(m ⊙ z_query) on each tensor (one rounding per element, as the ops' ``nearest``)."""
        for p, tid in zip(ps, ids, strict=True):
            p.add_(self._sparse_direction(p, tid, seed, query, distribution), alpha=scale)

    def _sparse_sgd_update(self, ps: list[torch.Tensor], ids: list[int], seed: int, coeffs: torch.Tensor, *,
                           lr: float, weight_decay: float, momentum: float, bufs: list[torch.Tensor] | None,
                           restore_scale: float, restore_query: int, distribution: str, **_: Any) -> None:
        """The masked restore + MeZO update of :func:`zo_optim.ops.reference.sgd_update_` (module docstring)."""
        for i, (p, tid) in enumerate(zip(ps, ids, strict=True)):
            theta = p.detach()
            if restore_scale != 0.0:
                theta = theta + restore_scale * self._sparse_direction(p, tid, seed, restore_query, distribution)
            g = torch.zeros_like(theta)
            for k in range(coeffs.numel()):
                g = g + coeffs[k].to(theta.dtype) * self._sparse_direction(p, tid, seed, k, distribution)
            d = g + weight_decay * theta if weight_decay != 0.0 else g
            if bufs is not None:
                buf = momentum * bufs[i].to(theta.dtype) + d
                bufs[i].copy_(buf)
                d = buf
            p.copy_(theta - lr * d)
