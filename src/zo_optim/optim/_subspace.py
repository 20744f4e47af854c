r"""Block probes: a step perturbs and updates one parameter group (a block), chosen from the step seed.

The opt-in ``block_probes=True`` of :class:`~.mezo.MeZO` and :class:`~.zo_adam.ZOAdam`. The blocks
are the optimizer's param groups (put each layer, or the head, in its own group). At step seed s,
block l is drawn with probability :math:`p_l = w_l / \sum_k w_k` (``w_l`` = the group's
``block_weight``, default 1; a group without trainable parameters has weight 0):

.. math::
    \begin{aligned}
    &u = \lfloor \mathrm{splitmix64}(s \oplus \mathtt{0x626c6f636b}) / 2^{11} \rfloor \cdot 2^{-53}
        \in [0, 1), \qquad l = \min\{\,l : \textstyle\sum_{k \le l} p_k > u\,\} \\
    &g = \frac{L(\theta + \varepsilon z_l) - L(\theta - \varepsilon z_l)}{2\varepsilon}, \qquad
        \theta_l \leftarrow \theta_l - \gamma\,\tfrac{D}{d_l}\,g\,z_l \quad\text{(MeZO; ZOAdam feeds }
        \tfrac{D}{d_l} g z_l \text{ to its moments of block } l\text{)}
    \end{aligned}

with :math:`z_l` the contract's z of block l's tensors (same tensor ids, same streams as a
full-space step), D the trainable parameter count and d_l block l's. Only block l's weights and
state move (block-coordinate ZO-SGD; weight decay and momentum of other blocks wait for their
turn). Why it can beat a full-space probe: :math:`E[(g z_l)] = \nabla_l L` and
:math:`E\|g z_l\|^2 \approx (d_l + 2)\|\nabla_l L\|^2`, so a block probe's noise grows with d_l,
not D; the factor D/d_l gives each block step the same stability bound γ·D·L as a full-space
MeZO step, so MeZO's tuned lr carries over, and a block that holds more of the gradient per
parameter than the average (a classifier head) moves D/d_l·p_l times faster per step than under
full-space probes. Cost: the same forwards per step as the algorithm (2 for central); the passes
touch only block l.

Sources: block-coordinate ZO / random-subspace estimators (SubZero, Yu et al. 2024, arXiv
2410.08989; Sparse-MeZO, Liu et al. 2024, arXiv 2402.15751 perturbs a subset of weights with the
same argument: the variance of an SPSA probe scales with the perturbed dimension).

Replay: the block is a function of the step seed and the groups' ``block_weight`` only, so a
step is still (seed, scalars): ``apply_update(seed, g)`` on a replica with the same groups
reproduces the weights bit for bit (``tests/test_block_probes.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import rng

__all__ = ["BlockProbes", "block_index"]

_BLOCK_TAG = 0x626C6F636B  # "block": keeps this word off the step seed's other uses


def block_index(seed: int, weights: list[float]) -> int:
    """The block drawn at step ``seed`` with sampling weights ``weights`` (module docstring)."""
    total = sum(weights)
    u = (rng.splitmix64(seed ^ _BLOCK_TAG) >> 11) * 2.0**-53
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w / total
        if w > 0 and acc > u:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)  # u within rounding of 1


class BlockProbes:
    """Selection of a step's block (mixed into :class:`~.base.ZOOptimizer`; off unless ``block_probes``)."""

    block_probes: bool = False
    param_groups: list[dict[str, Any]]
    _tensor_ids: dict[int, int]

    def _set_block_probes(self, block_probes: bool) -> None:
        if not isinstance(block_probes, bool):
            raise TypeError(f"Invalid block_probes: {block_probes!r} (True or False)")
        self.block_probes = block_probes
        if block_probes:
            self._block_weights()  # bad block_weight values fail at construction, before any write

    def _block_weights(self) -> list[float]:
        weights = []
        for i, group in enumerate(self.param_groups):
            w = group.get("block_weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"Invalid block_weight of param group {i}: {w!r} (a finite number >= 0)")
            trainable = any(p.requires_grad for p in group["params"])
            weights.append(float(w) if trainable else 0.0)
        if not any(w > 0 for w in weights):
            raise ValueError("block_probes: every param group with trainable parameters has block_weight 0; "
                             "give at least one a positive block_weight")
        return weights

    def _block(self, seed: int) -> tuple[set[int], float]:
        """(ids of the chosen group's params, its step factor D/d_l) for step ``seed``."""
        group = self.param_groups[block_index(seed, self._block_weights())]
        total = sum(p.numel() for g in self.param_groups for p in g["params"] if p.requires_grad)
        chosen = [p for p in group["params"] if p.requires_grad]
        return {id(p) for p in chosen}, total / sum(p.numel() for p in chosen)

    def _block_pairs(self, chunks: list[tuple[list[torch.Tensor], list[int]]],
                     seed: int) -> list[tuple[list[torch.Tensor], list[int]]]:
        """(params, tensor ids) chunks of a perturbation pass restricted to the step's block."""
        if not self.block_probes:
            return chunks
        keep, _ = self._block(seed)
        out = []
        for ps, ids in chunks:
            sel = [(p, i) for p, i in zip(ps, ids, strict=True) if id(p) in keep]
            if sel:
                out.append(([p for p, _ in sel], [i for _, i in sel]))
        return out

    def _block_chunks(self, chunks: list[tuple[dict[str, Any], list[torch.Tensor], list[int]]], seed: int,
                      coeffs: torch.Tensor) -> tuple[list[tuple[dict[str, Any], list[torch.Tensor], list[int]]],
                                                     torch.Tensor]:
        """The update pass's (group, params, ids) chunks restricted to the step's block, and its coefficients."""
        if not self.block_probes:
            return chunks, coeffs
        keep, factor = self._block(seed)
        return [c for c in chunks if id(c[1][0]) in keep], coeffs * factor
