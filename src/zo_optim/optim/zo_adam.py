"""ZOAdam: AdamW on the zeroth-order gradient estimate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from .. import ops
from ._validation import check_betas, check_positive
from .base import ZOOptimizer

__all__ = ["ZOAdam"]


class ZOAdam(ZOOptimizer):
    r"""ZO-Adam — AdamW (decoupled weight decay, bias correction) on the ZO estimate ĝ.

    .. math::
        \begin{aligned}
        &\hat g_t = \tfrac1q \textstyle\sum_k g_k z_k \quad (g_k \text{ as in } \texttt{MeZO}) \\
        &\theta \leftarrow \theta\,(1 - \gamma\lambda) \\
        &m \leftarrow \beta_1 m + (1-\beta_1)\hat g_t, \qquad v \leftarrow \beta_2 v + (1-\beta_2)\hat g_t^2 \\
        &\theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^{t}}\,
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^{t}} + \epsilon}
        \qquad (t \text{ counted from 1}) \\
        &\theta \leftarrow \theta + \gamma\lambda_a(\theta_a - \theta) \quad (\texttt{anchor\_decay}\ \lambda_a,
            \text{default 0; } \theta_a = \theta \text{ at construction: } \texttt{optim.\_anchor})
        \end{aligned}

    Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM
    Fine-Tuning: A Benchmark", arXiv 2402.11592 (ZO-Adam); arithmetic of
    ``torch.optim.AdamW``. ``zo_eps`` is the perturbation scale ε, ``eps`` Adam's δ.

    Differences from ZO-Bench's code: it calls ``torch.optim.Adam.step`` once per
    tensor with ``p.grad = g·z`` (dense gradients, O(#tensors²) bookkeeping);
    here the restore of the last perturbation, m, v and θ are one fused pass and
    z is never materialised.

    Scalars for :meth:`apply_update`: ``projected_grads`` (g_k); no extras.
    State: ``exp_avg``, ``exp_avg_sq`` (fp32) — 8 bytes/param. A skipped step still
    advances t (bias correction uses the step counter + 1).
    """

    algorithm = "zo_adam"
    #: recommended settings per use (:data:`zo_optim.optim.registry.USES`): the defaults of the commands
    recommended: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "demo/head": {"lr": 3e-3}, "demo/all": {"lr": 1e-4},
        # issue 24's winner on this fine-tune (docs/convergence.md): q = 8 forward differences, lr decayed to 0
        "demo/last-k": {"lr": 6e-3, "estimator": "forward", "num_queries": 8, "lr_decay": True},
        "demo/lora": {"lr": 1e-3}, "federated/head": {"lr": 3e-3},
        "finetune/lora": {"lr": 1e-3}, "finetune/full": {"lr": 3e-4},
        "finetune-clm/full": {"lr": 1e-4}, "finetune-clm/lora": {"lr": 3e-4},
        "convergence/quadratic": {"lr": 3e-2}, "convergence/rosenbrock": {"lr": 5e-2},
        "convergence/mlp": {"lr": 3e-3}, "convergence/minilm": {"lr": 1e-3}, "convergence/encoder": {"lr": 1e-4},
    }
    buffer_ranges: ClassVar[dict[str, tuple[float, bool]]] = {"exp_avg_sq": (0.0, False)}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        zo_eps: float = 1e-3,
        num_queries: int = 1,
        estimator: str = "central",
        **kwargs: Any,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, zo_eps=zo_eps, num_queries=num_queries, estimator=estimator, **kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_positive("epsilon value", group["eps"], allow_zero=True)
        check_betas(group["betas"])

    def _buffers(self, group: dict[str, Any]) -> dict[str, float]:
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    def _fused_update(self, group, params, ids, seed, coeffs, extras, step, op_kwargs) -> None:
        beta1, beta2 = group["betas"]
        ops.adamw_update_(params, ids, seed, coeffs, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"], step=step,
                          exp_avgs=[self.state[p]["exp_avg"] for p in params],
                          exp_avg_sqs=[self.state[p]["exp_avg_sq"] for p in params], **op_kwargs)
