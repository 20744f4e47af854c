"""HELENE: annealed momentum + A-GNB diagonal Hessian with layer-wise clipping."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from .. import ops
from ._estimate import Probes
from ._validation import check_betas, check_positive
from .base import ZOOptimizer

__all__ = ["HELENE"]

ClipFn = Callable[[str, torch.Tensor], float]


class HELENE(ZOOptimizer):
    r"""HELENE — Hessian layer-wise clipping and gradient annealing (seed paper's Algorithm 1).

    .. math::
        \begin{aligned}
        &m_0 = 0,\ h_0 = 0; \quad \textbf{for } t = 1, 2, \dots \\
        &\quad \hat g_t = \tfrac1q \textstyle\sum_k g_k z_k \quad (\text{SPSA}, g_k \text{ as in } \texttt{MeZO}) \\
        &\quad \alpha_t = \beta_1 + (1-\beta_1)\,e^{-t/T}, \qquad m_t = \beta_1 m_{t-1} + \alpha_t \hat g_t \\
        &\quad \textbf{if } t \bmod k = 1 \ (t = 1, k+1, \dots):\
            h_t = \beta_2 h_{t-k} + (1-\beta_2)\,\hat h_t, \quad
            \hat h_t = \begin{cases}
                \tfrac1q \sum_k \big(\sum_b g_{k,b}^2\big)\, z_k \odot z_k & \text{per-example losses} \\
                \hat g_t \odot \hat g_t & \text{scalar loss}
            \end{cases} \\
        &\quad \theta \leftarrow \theta\,(1 - \eta\,\text{wd}) \\
        &\quad \theta_i \leftarrow \theta_i - \eta\,\frac{m_{t,i}}{\gamma \max(h_{t,i}, \lambda_i) + \delta}
            \quad \text{for each tensor (layer) } i \\
        &\quad \theta \leftarrow \theta + \eta\lambda_a(\theta_a - \theta) \quad (\texttt{anchor\_decay}\ \lambda_a,
            \text{default 0; } \theta_a = \theta \text{ at construction: } \texttt{optim.\_anchor})
        \end{aligned}

    "HELENE: Hessian Layer-wise Clipping and Gradient Annealing for Accelerating
    Fine-tuning LLM with Zeroth-order Optimization", arXiv 2411.10696. Arguments:
    ``betas`` = (β1, β2), ``anneal_T`` = T, ``hessian_interval`` = k, ``gamma`` = γ,
    ``clip_lambda`` = λ, ``eps`` = δ (``zo_eps`` is the perturbation scale).
    ``anneal_T``, ``hessian_interval`` and ``lambda_mode`` are constructor settings (one
    per optimizer, recorded in ``state_dict()["zo"]["settings"]`` for information, not
    loaded back): pass the same values when resuming; a callable ``clip_lambda`` is not
    saved either (the groups hold ``None``): such a state dict loads only into a HELENE
    constructed with a callable (a ``ValueError`` otherwise), while a float ``clip_lambda``
    saved into one with a callable wins, as a saved ``lr`` does.

    A-GNB (the asymptotic Gauss-Newton-Bartlett estimate): when the closure returns
    a ``[B]`` vector of per-example losses, g_{k,b} = (L⁺_b − L⁻_b)/2ε are free
    by-products of the two forwards and ĥ uses Σ_b g_{k,b}² (no extra forward);
    with a scalar loss ĥ = ĝ ⊙ ĝ. Σ_b runs over the whole batch of the step: with
    gradient accumulation (several ``estimate`` calls per step) the per-micro-batch
    sums are added, and in data parallel they are summed across ranks (while ĝ is
    averaged), so ĥ does not depend on how a batch is split (2 micro-batches of 8
    give the same h as one batch of 16). A closure that returns a 1-D vector is
    per-example even when B = 1.

    λ_i: ``clip_lambda`` is a float (default 1.0: the paper's ablation found 1…3
    stable, 0.9 unstable) or a callable ``(name, param) -> float``, evaluated once per
    tensor (pass ``model.named_parameters()``, or groups with a ``"param_names"`` list,
    so names exist). ``lambda_mode="dim"`` divides it
    by √d_i (d_i = numel of tensor i), the paper's theoretical choice
    λ_i = R_i / (2√d_i).

    Conventions and differences (no public code exists; this follows the paper):

    * The momentum is used as written, m ← β1·m + α_t·ĝ with α_t → β1, so its
      steady-state scale is β1/(1−β1) (9× ĝ for β1 = 0.9) and ≈ 10× at the start;
      an lr ~10× smaller than MeZO's gives the same step length once h is clipped at λ.
    * t counts from 1 at the first step; the Hessian EMA is refreshed at
      t = 1, k+1, 2k+1, … (the paper's ``t mod k = 1``) and frozen in between.
    * Weight decay is decoupled (line 13 of Algorithm 1).
    * ``hessian_bias_correction=True`` (an option, off by default so the default is
      the paper's algorithm): h starts at 0 and, like Adam's v, is biased low for
      its first ~1/(1−β2) refreshes. Where the true h exceeds λ, the too-small
      denominator makes the early steps up to 1/(1−β2) = 100× LARGER than intended,
      and they shrink as h warms up (where h < λ the clip hides the bias). With the
      option the update uses h / (1 − β2ⁿ), n = refreshes so far.
      Measured (``docs/convergence.md``): MLP final test MSE/var 0.874 → 0.099,
      MiniLM head accuracy 0.650 → 0.690, MeZO's final accuracy reached in 0.65× of
      MeZO's forwards. It is applied exactly through the fused op's arguments:
      γ·max(h/c, λ) = (γ/c)·max(h, λ·c) with c = 1 − β2ⁿ.

    Scalars for :meth:`apply_update`: ``projected_grads`` (g_k) and, only when the
    losses were per-example, ``sq_grad_sum`` = Σ_b g_{k,b}² per query (without it
    ĥ = ĝ⊙ĝ). State: ``exp_avg`` (m) and ``hessian`` (h), fp32 — 8 bytes/param.
    """

    algorithm = "helene"
    #: recommended settings per use (:data:`zo_optim.optim.registry.USES`): the defaults of the commands
    recommended: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "demo/head": {"lr": 1e-3}, "demo/last-k": {"lr": 3e-4}, "demo/all": {"lr": 1e-5},
        "demo/lora": {"lr": 1e-4}, "federated/head": {"lr": 1e-3},
        "finetune/lora": {"lr": 1e-3}, "finetune/full": {"lr": 1e-5},
        "finetune-clm/full": {"lr": 3e-6}, "finetune-clm/lora": {"lr": 3e-4},
        "convergence/quadratic": {"lr": 3e-2}, "convergence/rosenbrock": {"lr": 5e-4},
        "convergence/mlp": {"lr": 3e-2}, "convergence/minilm": {"lr": 3e-3}, "convergence/encoder": {"lr": 3e-4},
    }
    extra_scalars: ClassVar[dict[str, bool]] = {"sq_grad_sum": False}
    summed_extras: ClassVar[frozenset[str]] = frozenset({"sq_grad_sum"})
    buffer_ranges: ClassVar[dict[str, tuple[float, bool]]] = {"hessian": (0.0, False)}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        zo_eps: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        anneal_T: float = 1000.0,
        hessian_interval: int = 10,
        gamma: float = 1.0,
        clip_lambda: float | ClipFn = 1.0,
        lambda_mode: str = "const",
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        hessian_bias_correction: bool = False,
        num_queries: int = 1,
        estimator: str = "central",
        **kwargs: Any,
    ) -> None:
        check_positive("anneal_T", anneal_T)
        if not isinstance(hessian_interval, int) or isinstance(hessian_interval, bool) or hessian_interval < 1:
            raise ValueError(f"Invalid hessian_interval: {hessian_interval!r} (an int >= 1)")
        if lambda_mode not in ("const", "dim"):
            raise ValueError(f"Invalid lambda_mode: {lambda_mode!r} (choose from 'const', 'dim')")
        self.anneal_T = float(anneal_T)
        self.hessian_interval = hessian_interval
        self.lambda_mode = lambda_mode
        self._clip_fn: ClipFn | None = None
        self._clip_cache: dict[int, float] = {}  # the callable is evaluated once per tensor
        if callable(clip_lambda):
            self._clip_fn = clip_lambda
            clip_lambda = None  # the group holds a float or None (callable kept off the state dict)
        defaults = dict(
            lr=lr, betas=betas, gamma=gamma, clip_lambda=clip_lambda, eps=eps, weight_decay=weight_decay,
            hessian_bias_correction=bool(hessian_bias_correction),
        )
        super().__init__(params, defaults, zo_eps=zo_eps, num_queries=num_queries, estimator=estimator, **kwargs)
        if self._clip_fn is not None and any("param_names" not in g for g in self.param_groups):
            raise ValueError(
                "clip_lambda is a callable (name, param) -> float, which needs parameter names: "
                "pass model.named_parameters() (or groups built from named parameters)"
            )

    def _settings(self) -> dict[str, Any]:
        return {"anneal_T": self.anneal_T, "hessian_interval": self.hessian_interval, "lambda_mode": self.lambda_mode}

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_betas(group["betas"])
        check_positive("gamma", group["gamma"])
        check_positive("epsilon value", group["eps"], allow_zero=True)
        if group["clip_lambda"] is not None:
            check_positive("clip_lambda", group["clip_lambda"], allow_zero=True)
        elif self._clip_fn is None:
            # a group holds None only when clip_lambda is a callable (kept off the state dict): a state dict
            # saved by such an optimizer names no λ, so it needs the callable again
            raise ValueError(
                "Invalid clip_lambda: None (the state dict was saved by a HELENE whose clip_lambda is a callable, "
                "which is not saved); construct HELENE with that callable, clip_lambda=fn(name, param), and "
                "model.named_parameters() before loading it, or set group['clip_lambda'] to a float"
            )

    def _buffers(self, group: dict[str, Any]) -> dict[str, float]:
        return {"exp_avg": 0.0, "hessian": 0.0}

    def _extras_from_probes(self, probes: Probes) -> dict[str, torch.Tensor]:
        if not probes.has_per_example():
            return {}
        return {"sq_grad_sum": probes.per_example_grads().square().sum(dim=1)}

    def _prepare(self) -> None:
        # evaluate (and validate) every λ_i now: a bad value must fail before the first pass
        for group in self.param_groups:
            self.clip_values(group, [p for p in group["params"] if p.requires_grad])

    def _check_scalars(self, grads: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        super()._check_scalars(grads, extras)
        sq = extras.get("sq_grad_sum")
        if sq is not None and bool((sq < 0).any()):
            raise ValueError(
                f"HELENE.apply_update: negative sq_grad_sum {sq.tolist()}; it is a sum of squares "
                "(Σ_b g_b² per query) and >= 0 (a negative one would drive the hessian below 0); nothing was applied"
            )

    def clip_values(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[float]:
        """λ_i of each tensor of ``group`` (after ``lambda_mode``)."""
        names = dict(zip(map(id, group["params"]), group.get("param_names", ()), strict=False))
        out = []
        for p in params:
            lam = group["clip_lambda"]
            if lam is None:
                if id(p) not in self._clip_cache:
                    assert self._clip_fn is not None
                    value = float(self._clip_fn(names[id(p)], p))
                    if not math.isfinite(value) or value < 0.0:
                        raise ValueError(f"Invalid clip_lambda for {names[id(p)]!r}: {value} (a finite float >= 0)")
                    self._clip_cache[id(p)] = value
                lam = self._clip_cache[id(p)]
            # a zero-element tensor has no update to clip: its λ is unused (kept finite)
            out.append(lam / math.sqrt(max(p.numel(), 1)) if self.lambda_mode == "dim" else float(lam))
        return out

    def _fused_update(self, group, params, ids, seed, coeffs, extras, step, op_kwargs) -> None:
        beta1, beta2 = group["betas"]
        alpha = beta1 + (1.0 - beta1) * math.exp(-step / self.anneal_T)
        sq = extras.get("sq_grad_sum")
        gamma, clip = group["gamma"], self.clip_values(group, params)
        if group.get("hessian_bias_correction", False):
            refreshes = (step - 1) // self.hessian_interval + 1
            correction = 1.0 - beta2**refreshes
            gamma, clip = gamma / correction, [lam * correction for lam in clip]
        ops.helene_update_(
            params, ids, seed, coeffs, lr=group["lr"], alpha=alpha, beta1=beta1, beta2=beta2, gamma=gamma,
            eps=group["eps"], clip=clip,
            exp_avgs=[self.state[p]["exp_avg"] for p in params], hessians=[self.state[p]["hessian"] for p in params],
            update_hessian=(step - 1) % self.hessian_interval == 0,
            hessian_coeffs=None if sq is None else sq / coeffs.numel(),
            weight_decay=group["weight_decay"], **op_kwargs,
        )
