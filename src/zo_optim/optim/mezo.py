"""MeZO: zeroth-order SGD."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from .. import ops
from .base import ZOOptimizer

__all__ = ["MeZO"]


class MeZO(ZOOptimizer):
    r"""MeZO — zeroth-order SGD with coupled weight decay and optional momentum.

    .. math::
        \begin{aligned}
        &\textbf{input: } \theta_0,\ \text{lr } \gamma,\ \varepsilon\ (\texttt{zo\_eps}),\
            \text{weight decay } \lambda,\ \text{momentum } \mu,\ q\ (\texttt{num\_queries}) \\
        &\textbf{for } t = 0, 1, \dots: \quad s_t = \text{step\_seed}(\text{seed}, t) \\
        &\quad z_k = z(s_t, \text{tensor\_id}, k), \quad
            g_k = \frac{L(\theta + \varepsilon z_k) - L(\theta - \varepsilon z_k)}{2\varepsilon}
            \quad (\text{forward: } \tfrac{L(\theta + \varepsilon z_k) - L(\theta)}{\varepsilon}) \\
        &\quad \hat g = \tfrac1q \textstyle\sum_k g_k z_k, \qquad d = \hat g + \lambda\theta \\
        &\quad b \leftarrow \mu b + d \ (\text{if } \mu \neq 0), \qquad
            \theta \leftarrow \theta - \gamma\,(b \text{ or } d) \\
        &\quad \theta \leftarrow \theta + \gamma\lambda_a(\theta_a - \theta) \quad (\texttt{anchor\_decay}\ \lambda_a,
            \text{default 0; } \theta_a = \theta \text{ at construction: } \texttt{optim.\_anchor})
        \end{aligned}

    Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes",
    arXiv 2305.17333. Momentum is ZO-SGD-MMT of Zhang et al. 2024 (arXiv 2402.11592),
    in ``torch.optim.SGD``'s heavy-ball form.

    Differences from the released code (princeton-nlp/MeZO): z comes from the
    counter-based contract of :mod:`zo_optim.rng` (the same on every device and
    rank) instead of ``torch.manual_seed`` + ``torch.normal``; a central step
    takes 3 passes over the weights (+ε, −2ε, fused restore + update) instead
    of 4; weight decay applies to every parameter of a group (use param groups
    to exclude biases/LayerNorm as MeZO does).

    Option ``block_probes=True`` (default ``False``): each step perturbs and updates one param group
    (a block, drawn from the step seed ∝ the group's ``block_weight``, default 1), with the step
    scaled by D/d_l (trainable parameters in all / in the block) — math, sources and cost in
    :mod:`zo_optim.optim._subspace`; measured in docs/convergence.md. A step stays (seed, scalars).

    Option ``sparse_density=ρ`` (default ``None``: dense): Sparse-MeZO (Liu et al. 2024, arXiv 2402.15751) —
    each step perturbs and updates only the ⌈ρ·n⌉ smallest-magnitude weights of every tensor, z masked:
    g = (L(θ + ε m⊙z) − L(θ − ε m⊙z)) / 2ε, θ ← θ − γ g (m⊙z), with m = 1[|W| ≤ h_W] recomputed from θ at
    every step (so a step stays (seed, scalars)); math, cost and restrictions in
    :mod:`zo_optim.optim._sparse`; measured in docs/convergence.md.

    Option ``lowrank_rank=r`` (default ``None``: dense), with ``lowrank_interval=ν`` (default 50): LOZO
    (Chen et al. 2024, arXiv 2410.07698) — a weight matrix W (n_0 × n_1) is perturbed and updated along
    u = U Vᵀ/√r, U (n_0 × r) drawn once per window of ν steps, V (n_1 × r) every step, both from the contract's
    generator; other tensors get the dense z. A step stays (seed, scalars); math, cost and restrictions in
    :mod:`zo_optim.optim._lowrank`; measured in docs/convergence.md.

    Option ``lowrank_kind="subzero"`` (with ``lowrank_rank=r``; default ``"lozo"``): SubZero (Yu et al. 2024,
    arXiv 2410.08989) — the same windows, with u = (√(n_0 n_1)/r)·U S Vᵀ, U (n_0 × r) and V (n_1 × r)
    column-orthonormal (QR of Gaussian matrices, float64 on the CPU) drawn once per window, S (r × r) every
    step: a window's updates lie in span(U) ⊗ span(V) (r² dimensions), and E‖u‖² = n_0·n_1 as the dense z's.

    Scalars for :meth:`apply_update`: ``projected_grads`` = the q values g_k; no extras.
    State: ``momentum_buffer`` (fp32) only when ``momentum != 0`` — 0 or 4 bytes/param.
    """

    algorithm = "mezo"
    #: recommended settings per use (:data:`zo_optim.optim.registry.USES`): the defaults of the commands
    recommended: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "demo/head": {"lr": 1e-2}, "demo/last-k": {"lr": 2e-3, "lr_decay": True}, "demo/all": {"lr": 1e-4},
        "demo/lora": {"lr": 1e-3}, "federated/head": {"lr": 1e-2},
        "finetune/lora": {"lr": 1e-2}, "finetune/full": {"lr": 3e-4},
        "finetune-clm/full": {"lr": 1e-4}, "finetune-clm/lora": {"lr": 3e-3},
        "convergence/quadratic": {"lr": 0.3}, "convergence/rosenbrock": {"lr": 1e-3},
        "convergence/mlp": {"lr": 3e-3}, "convergence/minilm": {"lr": 2e-3}, "convergence/encoder": {"lr": 3e-4},
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        zo_eps: float = 1e-3,
        num_queries: int = 1,
        estimator: str = "central",
        block_probes: bool = False,
        sparse_density: float | None = None,
        lowrank_rank: int | None = None,
        lowrank_interval: int = 50,
        lowrank_kind: str = "lozo",
        **kwargs: Any,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, zo_eps=zo_eps, num_queries=num_queries, estimator=estimator, **kwargs)
        self._set_block_probes(block_probes)
        self._set_sparse_density(sparse_density)
        self._set_lowrank(lowrank_rank, lowrank_interval, lowrank_kind)

    def _settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sparse_density": self.sparse_density} if self.sparse_density is not None else {}
        out.update(self._lowrank_settings())
        return out

    def _runtime_state(self) -> dict[str, Any]:
        return self._lowrank_runtime()

    def _check_runtime_state(self, runtime: Mapping[str, Any]) -> None:
        super()._check_runtime_state(runtime)
        self._lowrank_check_runtime(runtime)

    def _load_runtime_state(self, runtime: dict[str, Any]) -> None:
        self._lowrank_load_runtime(runtime)

    def _prepare(self) -> None:
        super()._prepare()
        # the masks come from θ: recomputed only while the weights are at θ (not after a deferred restore)
        self._sparse_prepare(clean=self._perturbation.pending_restore()[0] == 0.0)
        if self.lowrank_rank is not None:
            self._lowrank_check_params()  # a parameter cast to bf16 since construction: refused before any write

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        m = group["momentum"]
        if not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise ValueError(f"Invalid momentum value: {m!r} (in [0, 1))")

    def _buffers(self, group: dict[str, Any]) -> dict[str, float]:
        return {"momentum_buffer": 0.0} if group["momentum"] != 0.0 else {}

    def _fused_update(self, group, params, ids, seed, coeffs, extras, step, op_kwargs) -> None:
        momentum = group["momentum"]
        bufs = [self.state[p]["momentum_buffer"] for p in params] if momentum != 0.0 else None
        if self.sparse_density is not None:
            self._sparse_sgd_update(params, ids, seed, coeffs, lr=group["lr"], weight_decay=group["weight_decay"],
                                    momentum=momentum, bufs=bufs, **op_kwargs)
            return
        if self.lowrank_rank is not None:
            self._lowrank_sgd_update(params, ids, seed, coeffs, lr=group["lr"], weight_decay=group["weight_decay"],
                                     momentum=momentum, bufs=bufs, **op_kwargs)
            return
        ops.sgd_update_(params, ids, seed, coeffs, lr=group["lr"], weight_decay=group["weight_decay"],
                        momentum=momentum, momentum_buffers=bufs, **op_kwargs)


