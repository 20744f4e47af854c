r"""Low-rank directions for weight matrices: LOZO (U Vᵀ) or SubZero (U S Vᵀ), the subspace kept for ν steps.

The opt-in ``lowrank_rank=r`` (with ``lowrank_interval=ν``, default 50, and ``lowrank_kind``, default
``"lozo"``) of :class:`~.mezo.MeZO` (default ``None``: the contract's dense z). A trainable tensor W with
n_0 rows and n_1 = numel/n_0 columns (its first dimension against the rest, as a weight matrix) and
r < min(n_0, n_1) gets the direction

.. math::
    \begin{aligned}
    &\texttt{"lozo"}: \quad u_W = \tfrac{1}{\sqrt r}\, U_W V_W^\top, \qquad
        U_W = z(s_U, \mathrm{id}_W)_{[n_0 \times r]}, \qquad V_W = z(s, \mathrm{id}_W, k)_{[n_1 \times r]} \\
    &\texttt{"subzero"}: \quad u_W = \tfrac{\sqrt{n_0 n_1}}{r}\, U_W S_W V_W^\top, \qquad
        U_W = \mathrm{qr}(\zeta(s_U, \mathrm{id}_W, 0)_{[n_0 \times r]}), \quad
        V_W = \mathrm{qr}(\zeta(s_U, \mathrm{id}_W, 1)_{[n_1 \times r]}), \quad
        S_W = z(s, \mathrm{id}_W, k)_{[r \times r]} \\
    &g = \frac{L(\theta + \varepsilon u) - L(\theta - \varepsilon u)}{2\varepsilon}, \qquad
        d = g\,u + \lambda\theta, \qquad \theta \leftarrow \theta - \gamma\,(b \leftarrow \mu b + d
        \text{ or } d)
    \end{aligned}

with s the step seed, k the query, z the contract's generator (:mod:`zo_optim.rng`; Gaussian or Rademacher
as ``distribution``), ζ its Gaussian generator, and s_U = splitmix64(s_w ⊕ "lowrank"), s_w the seed of the
first step of window w = ⌊t/ν⌋ that ran a pass (t: the step counter): the window's factors (LOZO: U_W;
SubZero: U_W and V_W) are drawn once per window ("lazy subspace update"), the small factor (LOZO: V_W;
SubZero: S_W) at every step and query. Every other tensor (biases, LayerNorm, a matrix with
min(n_0, n_1) ≤ r) gets the contract's dense z of that step.

LOZO (Chen et al. 2024, "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", arXiv 2410.07698): E[u uᵀ] = I (each entry of u has variance 1, as z's), so MeZO's learning
rates carry over to first order. For ν steps the updates of W stay in the column space of U_W (n_0·r of the
n_0·n_1 dimensions): the noise of successive steps is confined to that subspace while their drift
accumulates in it — a lazy random subspace, re-drawn every ν steps so that it covers the whole space.

SubZero (Yu et al. 2024, "SubZero: Random Subspace Zeroth-Order Optimization for Memory-Efficient LLM
Fine-Tuning", arXiv 2410.08989): U_W, V_W are the Q factors (column-orthonormal, sign fixed by diag(R) > 0,
so Q is unique and Haar-distributed) of Gaussian matrices; S_W is r × r. The updates of a window lie in
span(U_W) ⊗ span(V_W) = {U_W A V_Wᵀ}, an r²-dimensional subspace, confined on both sides. The scale c =
√(n_0 n_1)/r makes E‖u‖² = c²·E‖S‖²_F = n_0·n_1, as the dense z's. Within a window u's covariance is
(n_0 n_1/r²)·Π_W, Π_W: A ↦ P_U A P_V the orthogonal projector onto that subspace (P_U = U_W U_Wᵀ,
P_V = V_W V_Wᵀ; not I); averaged over the window's draw (E[P_U] = (r/n_0) I for a Haar subspace) it is
I, as z's, so MeZO's learning rates carry over to first order: the expected step E[g u] ≈ E[u uᵀ]∇ =
(n_0 n_1/r²)·Π_W ∇ has the component (n_0 n_1/r²)·‖Π_W ∇‖² along ∇, which is ‖∇‖² (MeZO's) on average
over windows. (The factors are Gaussian whatever ``distribution``: the isotropy needs a
Haar subspace; S follows ``distribution``.) The paper reports SubZero ahead of MeZO on OPT and LLaMA
fine-tunes; our measurement on the encoder fine-tune is in docs/convergence.md.

Determinism of SubZero's factors: drawn on the CPU (ζ is float32 there by the contract), orthonormalised
by ``torch.linalg.qr`` in float64 on the CPU whatever the parameter's device, then cast to the parameter's
dtype and moved to its device — a pure function of (s_w, id_W, n_0, n_1, r) that does not depend on the
device (a GPU's Box–Muller or QR would differ in the last bits from a CPU replica's). Across LAPACK
builds float64 QR may differ by ~1e-16 relative, which the cast to float32 absorbs except for an entry
within that distance of a float32 rounding boundary (≈1e-8 per entry). Cost: (n_0 + n_1)·r² float64
flops and one host-to-device copy per matrix per window.

A step stays (seed, scalars): the window's factors are a function of the window's first seed, which every
replica applies, and of nothing else, so ``apply_update(seed, g)`` and the federated replay reproduce the
weights bit for bit (``tests/test_lowrank_perturbation.py``). The window's seed (w, s_w) is saved in
``state_dict()`` (``zo["runtime"]``), so a resume mid-window continues in the same subspace.

Cost per step: the same forwards as MeZO; per matrix, n_1·r (LOZO) or r² (SubZero) numbers from the
generator per query instead of n_0·n_1, an n_0 × r × n_1 product per pass (3 passes per step; SubZero
adds an n_0 × r × r one), in plain torch on every backend; the window's factors are cached: n_0·r (LOZO)
or (n_0 + n_1)·r (SubZero) numbers per matrix. Restrictions: float32/float64 parameters, not DTensors, not
with ``sparse_density`` or ``block_probes`` (refused at construction or at the step, before any write);
MeZO only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import rng
from ._plain import ScratchBuffers, check_plain_params, plain_sgd_update_

__all__ = ["LOWRANK_KINDS", "LowRankPerturbation", "lowrank_shape", "orthonormal_factor"]

_LOWRANK_TAG = 0x6C6F7772616E6B  # "lowrank": keeps the window's seed off the step seed's own streams
#: the directions ``lowrank_kind`` chooses between (module docstring)
LOWRANK_KINDS = ("lozo", "subzero")


def lowrank_shape(p: torch.Tensor, rank: int) -> tuple[int, int] | None:
    """(n_0, n_1) of ``p`` seen as a matrix when it gets a rank-``rank`` direction, None when it gets dense z."""
    if p.dim() < 2 or p.numel() == 0:
        return None
    rows = p.shape[0]
    cols = p.numel() // rows
    return (rows, cols) if rank < min(rows, cols) else None


def orthonormal_factor(seed: int, tensor_id: int, n: int, rank: int, query: int) -> torch.Tensor:
    """SubZero's window factor: Q of the QR of the n × rank Gaussian matrix ζ(seed, tensor_id, query), float64 on
    the CPU, columns' signs fixed so that diag(R) > 0 (Q is then unique: not up to LAPACK's sign convention)."""
    a = rng.normal(seed, tensor_id, n * rank, query).double().view(n, rank)
    q, r = torch.linalg.qr(a)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


class LowRankPerturbation:
    """Low-rank directions and their passes (mixed into :class:`~.base.ZOOptimizer`; off unless ``lowrank_rank``)."""

    lowrank_rank: int | None = None
    lowrank_interval: int = 50
    lowrank_kind: str = "lozo"
    _tensor_ids: dict[int, int]
    _t: int
    distribution: str

    def _set_lowrank(self, rank: int | None, interval: int, kind: str = "lozo") -> None:
        def bad(value: Any) -> bool:
            return isinstance(value, bool) or not isinstance(value, int) or value < 1

        if rank is not None and bad(rank):
            raise ValueError(f"Invalid lowrank_rank: {rank!r} (an int >= 1, or None for the dense z)")
        if bad(interval):
            raise ValueError(f"Invalid lowrank_interval: {interval!r} (an int >= 1: steps per subspace)")
        if not isinstance(kind, str) or kind not in LOWRANK_KINDS:
            raise ValueError(f"Invalid lowrank_kind: {kind!r} (one of {', '.join(map(repr, LOWRANK_KINDS))})")
        if rank is None and kind != "lozo":
            # without a rank the option is off: a kind alone would silently run the dense z
            raise ValueError(f"Invalid lowrank_kind: {kind!r} needs lowrank_rank=r (the subspace's rank), got None")
        if rank is not None:
            if getattr(self, "sparse_density", None) is not None or getattr(self, "block_probes", False):
                raise ValueError("lowrank_rank cannot be combined with sparse_density or block_probes; choose one")
            self._lowrank_check_params()
        self.lowrank_rank = rank
        self.lowrank_interval = interval
        self.lowrank_kind = kind
        self._lowrank_window: tuple[int, int] | None = None  # (window index w, its seed s_w)
        self._lowrank_factors: dict[int, tuple[torch.Tensor, ...]] = {}  # tensor id -> the window's factors
        self._lowrank_scratch = ScratchBuffers()  # the directions in the parameters' dtype

    def _lowrank_check_params(self) -> None:
        check_plain_params(self._trainable(), "lowrank_rank", "lowrank_rank=None")  # type: ignore[attr-defined]

    def _lowrank_settings(self) -> dict[str, Any]:
        if self.lowrank_rank is None:
            return {}
        return {"lowrank_rank": self.lowrank_rank, "lowrank_interval": self.lowrank_interval,
                "lowrank_kind": self.lowrank_kind}

    # ------------------------------------------------------------------ the window's subspace

    def _lowrank_u_seed(self, seed: int) -> int:
        """s_U for the step being run with ``seed`` (module docstring: from the window's first seed)."""
        w = self._t // self.lowrank_interval
        if self._t % self.lowrank_interval == 0 or self._lowrank_window is None or self._lowrank_window[0] != w:
            # the window's first step (or the first one run in it: a skipped or replayed start) draws the
            # subspace; re-keying at the first step on every pass keeps replicas equal whatever they estimated
            if self._lowrank_window != (w, seed):
                self._lowrank_window = (w, seed)
                self._lowrank_factors = {}
        return rng.splitmix64(self._lowrank_window[1] ^ _LOWRANK_TAG)

    def _lowrank_window_factors(self, p: torch.Tensor, tid: int, rows: int, cols: int,
                                seed: int) -> tuple[torch.Tensor, ...]:
        """The window's factors of tensor ``tid``, cached: (U,) for LOZO, (U, V) for SubZero, in p's dtype."""
        rank = self.lowrank_rank
        assert rank is not None
        u_seed = self._lowrank_u_seed(seed)
        factors = self._lowrank_factors.get(tid)
        if factors is None or factors[0].device != p.device or factors[0].dtype != p.dtype:
            if self.lowrank_kind == "subzero":
                factors = tuple(orthonormal_factor(u_seed, tid, n, rank, k).to(device=p.device, dtype=p.dtype)
                                for k, n in enumerate((rows, cols)))
            else:
                gen = rng.normal if self.distribution == "gaussian" else rng.rademacher
                factors = (gen(u_seed, tid, rows * rank, 0, device=p.device).to(p.dtype).view(rows, rank),)
            self._lowrank_factors[tid] = factors
        return factors

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
        factors = self._lowrank_window_factors(p, tid, rows, cols, seed)
        if self.lowrank_kind == "subzero":
            U, V = factors
            # the scale c goes on S (r² products instead of n_0·n_1)
            S = gen(seed, tid, rank * rank, query, device=p.device).to(p.dtype).view(rank, rank)
            S.mul_(math.sqrt(rows * cols) / rank)
            torch.mm(torch.mm(U, S), V.t(), out=out.view(rows, cols))
            return out
        (U,) = factors
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
            self._lowrank_factors = {}
