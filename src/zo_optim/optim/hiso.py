"""HiSo (local form): forward-difference ZO-SGD preconditioned by a diagonal K."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from .. import ops
from ._validation import as_precond_floor, check_positive
from .base import ZOOptimizer

__all__ = ["HiSo"]


class HiSo(ZOOptimizer):
    r"""HiSo — Hessian-informed ZO-SGD with a diagonal K learned from past estimates (HiSo-local).

    .. math::
        \begin{aligned}
        &K_0 = \mathbf 1 \ (\text{fp32}), \quad u_p = z_p / \sqrt{K} \quad (p = 1..P,\ P = \texttt{num\_queries}) \\
        &g_p = \frac{L(\theta + \mu u_p) - L(\theta)}{\mu} \quad (1 + P \text{ forwards}), \qquad
            \hat g = \tfrac1P \textstyle\sum_p g_p u_p \\
        &\theta \leftarrow \theta - \gamma\,(\hat g + \lambda\theta) \\
        &\theta \leftarrow \theta + \gamma\lambda_a(\theta_a - \theta) \quad (\texttt{anchor\_decay}\ \lambda_a,
            \text{default 0; } \theta_a = \theta \text{ at construction: } \texttt{optim.\_anchor}) \\
        &\textbf{every } k \text{ steps } (\texttt{k\_interval}):\quad
            K \leftarrow \beta K + (1-\beta)(\hat g \odot \hat g + \epsilon_H);
            \quad K \text{ frozen in between}
        \end{aligned}

    Li, Ying, Liu, Dong, Yang, "Converge Faster, Talk Less: Hessian-Informed
    Federated Zeroth-Order Optimization", ICLR 2026, arXiv 2506.02370; built on
    DeComFL (Liu et al., arXiv 2405.15861). μ is ``zo_eps``, ε_H ``hessian_eps``.

    Differences from the released code (DeComFL's ``adam_forward`` estimator), on purpose:

    * For P > 1 the reference has two code paths that disagree (one updates K
      per direction, one from the averaged estimate); we use the batch form
      above: one K update from ĝ averaged over the P directions.
    * ε_H (``hessian_eps``, default 1e-8) keeps K > 0 where ĝ = 0 (frozen
      coordinates, exact zeros); the reference has no such term. K is also
      clamped to [``hessian_min``, float32 max] (default floor 1e-10, below ε_H,
      so it only acts when ``hessian_eps`` < 1e-10: K never reaches 0, where
      u = z/√K would be infinite and the ±μu round trip would write NaN).
    * z comes from the counter-based contract (device- and rank-independent);
      the reference seeds a ``torch.Generator`` per direction on the device,
      so a CPU/GPU mix diverges.

    The federated wrapper freezes K within a round (``can_freeze_precond`` tells it
    this class has the flag); set ``opt.freeze_precond = True`` to stop K updates
    entirely (``k_interval`` counts steps otherwise).
    ``freeze_precond`` is saved by ``state_dict()`` and restored by ``load_state_dict``;
    ``k_interval`` is a constructor setting (recorded in ``state_dict()["zo"]["settings"]``
    for information): pass the same value when resuming.
    Passes over the weights: 2P (+μu_p, then restore; the last restore is fused
    with the update and the K update).

    Scalars for :meth:`apply_update`: ``projected_grads`` (g_p); no extras.
    State: ``hessian`` (K, fp32) — 4 bytes/param.
    """

    algorithm = "hiso"
    #: recommended settings per use (:data:`zo_optim.optim.registry.USES`): the defaults of the commands
    recommended: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "demo/head": {"lr": 3e-3}, "demo/last-k": {"lr": 1e-3}, "demo/all": {"lr": 1e-4},
        "demo/lora": {"lr": 1e-3}, "federated/head": {"lr": 1e-2},
        "finetune/lora": {"lr": 1e-3}, "finetune/full": {"lr": 3e-4},
        "finetune-clm/full": {"lr": 1e-4}, "finetune-clm/lora": {"lr": 3e-4},
        "convergence/quadratic": {"lr": 0.1}, "convergence/rosenbrock": {"lr": 6e-3},
        "convergence/mlp": {"lr": 3e-3}, "convergence/minilm": {"lr": 2e-3}, "convergence/encoder": {"lr": 3e-4},
    }
    precond_buffer = "hessian"
    can_freeze_precond = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        zo_eps: float = 1e-3,
        num_queries: int = 1,
        beta: float = 0.95,
        hessian_eps: float = 1e-8,
        hessian_min: float = 1e-10,
        k_interval: int = 1,
        weight_decay: float = 0.0,
        estimator: str = "forward",
        **kwargs: Any,
    ) -> None:
        if not isinstance(k_interval, int) or isinstance(k_interval, bool) or k_interval < 1:
            raise ValueError(f"Invalid k_interval: {k_interval!r} (an int >= 1)")
        self.k_interval = k_interval
        self.hessian_min = as_precond_floor(hessian_min, "K")
        self.freeze_precond = False
        defaults = dict(lr=lr, beta=beta, hessian_eps=hessian_eps, weight_decay=weight_decay)
        super().__init__(params, defaults, zo_eps=zo_eps, num_queries=num_queries, estimator=estimator, **kwargs)

    def _settings(self) -> dict[str, Any]:
        return {"k_interval": self.k_interval, "hessian_min": self.hessian_min}

    def _runtime_state(self) -> dict[str, Any]:
        return {"freeze_precond": bool(self.freeze_precond)}

    def _check_runtime_state(self, runtime: Mapping[str, Any]) -> None:
        super()._check_runtime_state(runtime)
        if not isinstance(runtime.get("freeze_precond", False), bool):
            raise ValueError(
                f"Invalid state dict: zo['runtime']['freeze_precond'] = {runtime['freeze_precond']!r} (a bool)"
            )

    def _load_runtime_state(self, runtime: dict[str, Any]) -> None:
        if "freeze_precond" in runtime:
            self.freeze_precond = bool(runtime["freeze_precond"])

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        b = group["beta"]
        if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta: {b!r} (in [0, 1))")
        check_positive("hessian_eps", group["hessian_eps"], allow_zero=True)

    def _buffers(self, group: dict[str, Any]) -> dict[str, float]:
        return {"hessian": 1.0}

    def _fused_update(self, group, params, ids, seed, coeffs, extras, step, op_kwargs) -> None:
        beta = group["beta"]
        ops.precond_sgd_update_(
            params, ids, seed, coeffs, lr=group["lr"], precond=[self.state[p]["hessian"] for p in params],
            rule="hiso", update_precond=not self.freeze_precond and step % self.k_interval == 0,
            precond_decay=beta, precond_rate=1.0 - beta, hessian_eps=group["hessian_eps"], precond_min=self.hessian_min,
            weight_decay=group["weight_decay"], **op_kwargs,
        )
