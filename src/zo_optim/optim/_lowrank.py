r"""Low-rank directions (LOZO): a matrix is perturbed along U Vᵀ, U kept for ν steps, V fresh every step.

The opt-in ``lowrank_rank=r`` (and ``lowrank_interval=ν``, default 50) of :class:`~.mezo.MeZO` (default
``None``: the contract's dense z). A trainable tensor W with n_0 rows and n_1 = numel/n_0 columns (its
first dimension against the rest, as a weight matrix) and r < min(n_0, n_1) gets the direction

.. math::
    \begin{aligned}
    &u_W = \tfrac{1}{\sqrt r}\, U_W V_W^\top, \qquad U_W = z(s_U, \mathrm{id}_W)_{[n_0 \times r]}, \qquad
        V_W = z(s, \mathrm{id}_W, k)_{[n_1 \times r]} \\
    &g = \frac{L(\theta + \varepsilon u) - L(\theta - \varepsilon u)}{2\varepsilon}, \qquad
        d = g\,u + \lambda\theta, \qquad \theta \leftarrow \theta - \gamma\,(b \leftarrow \mu b + d
        \text{ or } d)
    \end{aligned}

with s the step seed, k the query, z the contract's generator (:mod:`zo_optim.rng`; Gaussian or Rademacher
as ``distribution``) and s_U = splitmix64(s_w ⊕ "lowrank"), s_w the seed of the first step of window
w = ⌊t/ν⌋ that ran a pass (t: the step counter); every other tensor (biases, LayerNorm, a matrix with
min(n_0, n_1) ≤ r) gets the contract's dense z of that step. E[u uᵀ] = I (each entry of u has variance 1,
as z's), so MeZO's learning rates carry over to first order.

Why it can beat a dense probe (Chen et al. 2024, "Enhancing Zeroth-order Fine-tuning for Language Models
with Low-rank Structures", arXiv 2410.07698, LOZO): the gradients of a fine-tune's weight matrices are
close to low rank, and for ν steps the updates of W stay in the column space of U_W (an n_0·r-dimensional
subspace of the n_0·n_1 weights), so the noise of successive steps is confined to that subspace while
their drift accumulates in it — a lazy random subspace, re-drawn every ν steps so that it covers the
whole space over time. The paper reports LOZO ahead of MeZO on SuperGLUE with OPT and LLaMA; our
measurement on the encoder fine-tune is in docs/convergence.md.

A step stays (seed, scalars): U_W is a function of the window's first seed, which every replica applies,
and of nothing else, so ``apply_update(seed, g)`` and the federated replay reproduce the weights bit for
bit (``tests/test_lowrank_perturbation.py``). The window's seed (w, s_w) is saved in ``state_dict()``
(``zo["runtime"]``), so a resume mid-window continues in the same subspace.

Cost per step: the same forwards as MeZO; per matrix, (n_0 + n_1)·r numbers from the generator instead of
n_0·n_1 (U is cached for the window) and an n_0 × r × n_1 product per pass (3 passes per step), in plain
torch on every backend. Restrictions: float32/float64 parameters, not DTensors, not with ``sparse_density``
or ``block_probes`` (refused at construction or at the step, before any write); MeZO only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import rng
from ._plain import ScratchBuffers, check_plain_params, plain_sgd_update_

__all__ = ["LowRankPerturbation", "lowrank_shape"]

_LOWRANK_TAG = 0x6C6F7772616E6B  # "lowrank": keeps U's seed off the step seed's own streams


def lowrank_shape(p: torch.Tensor, rank: int) -> tuple[int, int] | None:
    """(n_0, n_1) of ``p`` seen as a matrix when it gets a rank-``rank`` direction, None when it gets dense z."""
    if p.dim() < 2 or p.numel() == 0:
        return None
    rows = p.shape[0]
    cols = p.numel() // rows
    return (rows, cols) if rank < min(rows, cols) else None


class LowRankPerturbation:
    """Low-rank directions and their passes (mixed into :class:`~.base.ZOOptimizer`; off unless ``lowrank_rank``)."""

    lowrank_rank: int | None = None
    lowrank_interval: int = 50
    _tensor_ids: dict[int, int]
    _t: int
    distribution: str

    def _set_lowrank(self, rank: int | None, interval: int) -> None:
        def bad(value: Any) -> bool:
            return isinstance(value, bool) or not isinstance(value, int) or value < 1

        if rank is not None and bad(rank):
            raise ValueError(f"Invalid lowrank_rank: {rank!r} (an int >= 1, or None for the dense z)")
        if bad(interval):
            raise ValueError(f"Invalid lowrank_interval: {interval!r} (an int >= 1: steps per subspace)")
        if rank is not None:
            if getattr(self, "sparse_density", None) is not None or getattr(self, "block_probes", False):
                raise ValueError("lowrank_rank cannot be combined with sparse_density or block_probes; choose one")
            self._lowrank_check_params()
        self.lowrank_rank = rank
        self.lowrank_interval = interval
        self._lowrank_window: tuple[int, int] | None = None  # (window index w, its seed s_w)
        self._lowrank_u_cache: dict[int, torch.Tensor] = {}  # tensor id -> U of the current window
        self._lowrank_scratch = ScratchBuffers()  # the directions in the parameters' dtype

    def _lowrank_check_params(self) -> None:
        check_plain_params(self._trainable(), "lowrank_rank", "lowrank_rank=None")  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ the window's subspace

    def _lowrank_u_seed(self, seed: int) -> int:
        """The seed of U for the step being run with ``seed`` (module docstring: the window's first seed)."""
        w = self._t // self.lowrank_interval
        if self._t % self.lowrank_interval == 0 or self._lowrank_window is None or self._lowrank_window[0] != w:
            # the window's first step (or the first one run in it: a skipped or replayed start) draws the
            # subspace; re-keying at the first step on every pass keeps replicas equal whatever they estimated
            if self._lowrank_window != (w, seed):
                self._lowrank_window = (w, seed)
                self._lowrank_u_cache = {}
        return rng.splitmix64(self._lowrank_window[1] ^ _LOWRANK_TAG)

    def _lowrank_u(self, p: torch.Tensor, tid: int, seed: int, query: int, slot: int = 0) -> torch.Tensor:
        """u_query of tensor ``tid`` at step ``seed`` (module docstring) in a scratch buffer of slot ``slot``."""
        gen = rng.normal if self.distribution == "gaussian" else rng.rademacher
        out = self._lowrank_scratch(p, slot)
        rank = self.lowrank_rank
        assert rank is not None
        shape = lowrank_shape(p, rank)
        if shape is None:
            return out.copy_(gen(seed, tid, p.numel(), query, device=p.device).view(p.shape))
        rows, cols = shape
        u_seed = self._lowrank_u_seed(seed)
        U = self._lowrank_u_cache.get(tid)
        if U is None or U.device != p.device or U.dtype != p.dtype:
            U = gen(u_seed, tid, rows * rank, 0, device=p.device).to(p.dtype).view(rows, rank)
            self._lowrank_u_cache[tid] = U
        V = gen(seed, tid, cols * rank, query, device=p.device).to(p.dtype).view(cols, rank)
        torch.mm(U, V.t(), out=out.view(rows, cols))
        return out.mul_(1.0 / math.sqrt(rank))

    # ------------------------------------------------------------------ passes

    def _lowrank_perturb(self, ps: list[torch.Tensor], ids: list[int], seed: int, query: int, scale: float) -> None:
        """θ ← θ + scale·u_query on each tensor."""
        for p, tid in zip(ps, ids, strict=True):
            p.add_(self._lowrank_u(p, tid, seed, query), alpha=scale)

    def _lowrank_sgd_update(self, ps: list[torch.Tensor], ids: list[int], seed: int, coeffs: torch.Tensor, *,
                            lr: float, weight_decay: float, momentum: float, bufs: list[torch.Tensor] | None,
                            restore_scale: float, restore_query: int, **_: Any) -> None:
        """The restore + MeZO update with the low-rank directions (:func:`._plain.plain_sgd_update_`)."""
        plain_sgd_update_(ps, ids, coeffs, lambda p, tid, query, slot: self._lowrank_u(p, tid, seed, query, slot),
                          self._lowrank_scratch, lr=lr, weight_decay=weight_decay, momentum=momentum, bufs=bufs,
                          restore_scale=restore_scale, restore_query=restore_query)

    # ------------------------------------------------------------------ state dict

    def _lowrank_runtime(self) -> dict[str, Any]:
        return {} if self.lowrank_rank is None else {"lowrank_window": None if self._lowrank_window is None
                                                      else list(self._lowrank_window)}

    def _lowrank_check_runtime(self, runtime: Any) -> None:
        win = runtime.get("lowrank_window")
        if win is not None and not (isinstance(win, (list, tuple)) and len(win) == 2
                                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in win)):
            raise ValueError(f"Invalid state dict: zo['runtime']['lowrank_window'] = {win!r} "
                             "(None or [window index, seed], two ints >= 0)")

    def _lowrank_load_runtime(self, runtime: Any) -> None:
        if "lowrank_window" in runtime:
            win = runtime["lowrank_window"]
            self._lowrank_window = None if win is None else (int(win[0]), int(win[1]))
            self._lowrank_u_cache = {}
