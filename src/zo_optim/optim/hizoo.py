"""HiZOO: Hessian-informed zeroth-order SGD with a diagonal Σ."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from .. import ops
from ._estimate import Probes
from ._validation import as_precond_floor, check_positive
from .base import ZOOptimizer

__all__ = ["HiZOO"]


class HiZOO(ZOOptimizer):
    r"""HiZOO — ZO-SGD along directions shaped by a diagonal Hessian estimate Σ.

    .. math::
        \begin{aligned}
        &\Sigma_0 = \mathbf 1 \ (\text{fp32}), \quad u_k = \Sigma_t^{-1/2} \odot z_k \\
        &L_0 = L(\theta), \quad L_k^{\pm} = L(\theta \pm \varepsilon u_k) \quad (2q + 1 \text{ forwards}) \\
        &g_k = \frac{L_k^+ - L_k^-}{2\varepsilon}, \qquad
            h_k = \frac{|L_k^+ + L_k^- - 2L_0|}{2\varepsilon^2} \\
        &\hat g = \tfrac1q \textstyle\sum_k g_k u_k \quad (\text{with the } \Sigma_t
            \text{ used for the perturbation}) \\
        &\theta \leftarrow \theta - \gamma\,(\hat g + \lambda\theta) \\
        &\theta \leftarrow \theta + \gamma\lambda_a(\theta_a - \theta) \quad (\texttt{anchor\_decay}\ \lambda_a,
            \text{default 0; } \theta_a = \theta \text{ at construction: } \texttt{optim.\_anchor}) \\
        &\Sigma_{t+1} = (1-\alpha)\,\Sigma_t + \alpha\,\Sigma_t \odot
            \tfrac1q \textstyle\sum_k h_k\, z_k \odot z_k
        \end{aligned}

    Zhao et al. 2024/25, "Second-Order Fine-Tuning without Pain for LLMs: a Hessian
    Informed Zeroth-Order Optimizer", arXiv 2402.15173. ``hessian_smooth`` = α.

    Differences from the released code (Yanjun-Zhao/HiZOO), on purpose:

    * Σ is kept in fp32. The scripts keep it in the weights' dtype (fp16); with
      the default α = 0 Σ never moves (the method is then exactly MeZO), and with
      α = 1e-8 the fp16 update underflows to 0. Our default α is non-zero (an
      initial guess; the convergence benchmark proposes the final value), and
      the update's ``(1-α)`` and ``α`` are applied as two fp32 factors so that
      tiny α survive.
    * ĝ uses the same Σ_t as the perturbation. The released code updates Σ first
      and builds the gradient with Σ_{t+1}, so the direction of the update is not
      the direction whose derivative was measured.
    * 3 forwards per step (L0, L±); the released code runs a 4th (for logging).
      Passes over the weights: 3 (+εu, −2εu, fused restore + update + Σ update).

    Σ shrinks where h_k z² < 1 (then u grows): on a flat direction geometrically,
    by (1 − α) per step. The paper does not bound it; we floor it at ``hessian_min``
    (default 1e-4, so |u| ≤ 100·|z|): without a floor, α = 0.5 on a flat loss took
    Σ to 1e-17 in 56 steps and the in-place ±εu round trip, run at |εu| ≈ 3e5, moved
    the weights by 0.025. With the floor the round trip stays exact to a few ulp of
    max(|θ|, 100·ε·|z|). Σ is also capped at the float32 maximum (an overflow stays
    finite instead of turning into inf·0 = NaN at the next update).

    Scalars for :meth:`apply_update`: ``projected_grads`` (g_k) and the required
    ``curvature`` (h_k, per query, not divided by q). State: ``hessian`` (Σ, fp32)
    — 4 bytes/param.
    """

    algorithm = "hizoo"
    #: recommended settings per use (:data:`zo_optim.optim.registry.USES`): the defaults of the commands
    recommended: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "demo/head": {"lr": 1e-2}, "demo/last-k": {"lr": 3e-3}, "demo/all": {"lr": 1e-4},
        "demo/lora": {"lr": 1e-3}, "federated/head": {"lr": 1e-2},
        "finetune/lora": {"lr": 1e-2}, "finetune/full": {"lr": 1e-5},
        "finetune-clm/full": {"lr": 3e-6}, "finetune-clm/lora": {"lr": 3e-3},
        "convergence/quadratic": {"lr": 0.3}, "convergence/rosenbrock": {"lr": 1e-3},
        "convergence/mlp": {"lr": 1e-2}, "convergence/minilm": {"lr": 2e-3}, "convergence/encoder": {"lr": 3e-4},
    }
    precond_buffer = "hessian"
    needs_center_loss = True
    estimators = ("central",)
    extra_scalars: ClassVar[dict[str, bool]] = {"curvature": True}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        zo_eps: float = 1e-3,
        hessian_smooth: float = 1e-6,
        hessian_min: float = 1e-4,
        weight_decay: float = 0.0,
        num_queries: int = 1,
        estimator: str = "central",
        **kwargs: Any,
    ) -> None:
        self.hessian_min = as_precond_floor(hessian_min, "Σ")
        defaults = dict(lr=lr, hessian_smooth=hessian_smooth, weight_decay=weight_decay)
        super().__init__(params, defaults, zo_eps=zo_eps, num_queries=num_queries, estimator=estimator, **kwargs)

    def _settings(self) -> dict[str, Any]:
        return {"hessian_min": self.hessian_min}

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        a = group["hessian_smooth"]
        check_positive("hessian_smooth", a, allow_zero=True)
        if a >= 1.0:  # α = 1 would replace Σ by h·Σ⊙z², which is 0 wherever h or z is
            raise ValueError(f"Invalid hessian_smooth: {a} (in [0, 1))")

    def _buffers(self, group: dict[str, Any]) -> dict[str, float]:
        return {"hessian": 1.0}

    def _extras_from_probes(self, probes: Probes) -> dict[str, torch.Tensor]:
        assert probes.center is not None
        l0 = probes.center.mean()
        plus = torch.stack([p.mean() for p in probes.plus])
        minus = torch.stack([m.mean() for m in probes.minus])
        return {"curvature": (plus + minus - 2.0 * l0).abs() / (2.0 * probes.zo_eps**2)}

    def _check_scalars(self, grads: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        super()._check_scalars(grads, extras)
        curvature = extras["curvature"]
        if bool((curvature < 0).any()):
            raise ValueError(
                f"HiZOO.apply_update: negative curvature {curvature.tolist()}; h_k = |L+ + L- - 2 L0| / (2 eps^2) "
                "is >= 0 (a negative one would shrink Σ towards zero or below); nothing was applied"
            )

    def _fused_update(self, group, params, ids, seed, coeffs, extras, step, op_kwargs) -> None:
        alpha = group["hessian_smooth"]
        ops.precond_sgd_update_(
            params, ids, seed, coeffs, lr=group["lr"], precond=[self.state[p]["hessian"] for p in params],
            rule="hizoo", update_precond=alpha > 0.0, precond_decay=1.0 - alpha, precond_rate=alpha,
            precond_coeffs=extras["curvature"] / coeffs.numel(), precond_min=self.hessian_min,
            weight_decay=group["weight_decay"], **op_kwargs,
        )
