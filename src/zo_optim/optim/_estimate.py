r"""Probe losses → projected-gradient scalars, and their accumulation across micro-batches.

For query :math:`k` with direction :math:`u_k` and scale :math:`\epsilon`:

* central:  :math:`g_k = (L(\theta+\epsilon u_k) - L(\theta-\epsilon u_k)) / 2\epsilon`
* forward:  :math:`g_k = (L(\theta+\epsilon u_k) - L(\theta)) / \epsilon`

Losses are 1-D tensors (a scalar loss is a vector of length 1; a closure may
return a ``[B]`` vector of per-example losses) in float32, or float64 when the
closure returned float64: loss differences are taken in the loss's precision, so
``1000 + ||w - c||^2`` with ε = 1e-6 keeps its signal (float32 would round the
difference of two losses near 1000 to 0). Whether the losses
are per-example is decided by the closure's output rank, not by its length: a
1-D output is per-example even when B = 1 (the last, short micro-batch of an
epoch), so every micro-batch and every rank produces the same kinds of scalars.
Everything stays on the device: no host sync here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Probes:
    """The losses measured for one estimate (one closure, one micro-batch)."""

    estimator: str
    zo_eps: float
    center: torch.Tensor | None = None  # L(θ), [B] or [1]
    plus: list[torch.Tensor] = field(default_factory=list)  # L(θ + ε u_k)
    minus: list[torch.Tensor] = field(default_factory=list)  # L(θ − ε u_k) (central only)
    per_example: list[bool] = field(default_factory=list)  # one per closure call: returned a 1-D vector

    def all_losses(self) -> list[torch.Tensor]:
        return ([self.center] if self.center is not None else []) + self.plus + self.minus

    def per_example_grads(self) -> torch.Tensor:
        """[q, B] per-example projected gradients (B = 1 for a scalar loss)."""
        plus = torch.stack(self.plus)
        if self.estimator == "central":
            return (plus - torch.stack(self.minus)) / (2.0 * self.zo_eps)
        assert self.center is not None
        return (plus - self.center.unsqueeze(0)) / self.zo_eps

    def projected_grads(self) -> torch.Tensor:
        """[q] projected gradients of the mean loss."""
        plus = torch.stack([p.mean() for p in self.plus])
        if self.estimator == "central":
            return (plus - torch.stack([m.mean() for m in self.minus])) / (2.0 * self.zo_eps)
        assert self.center is not None
        return (plus - self.center.mean()) / self.zo_eps

    def has_per_example(self) -> bool:
        return bool(self.per_example) and all(self.per_example)

    def loss(self) -> torch.Tensor:
        """Estimate of L(θ): L0 when measured, else the mean of the probes."""
        if self.center is not None:
            return self.center.mean()
        return torch.stack([t.mean() for t in self.plus + self.minus]).mean()


class Accumulator:
    """Weighted running sums of the scalars of several estimates of one step (gradient accumulation).

    Each estimate carries a weight w (default 1, e.g. a micro-batch's token count);
    :meth:`mean` is the weighted mean Σ w·g / Σ w of the projected gradients and of
    the averaged extras. The extras named in ``summed`` (sums over examples, e.g.
    HELENE's Σ_b g_b², which must not depend on how a batch is split) are summed
    unweighted. All estimates of one step share one seed. Sums are kept in the
    scalars' dtype (float32, or float64 for float64 losses).
    """

    def __init__(self, seed: int, summed: frozenset[str] = frozenset()) -> None:
        self.seed = seed
        self.summed = summed
        self.count = 0
        self.weight = 0.0
        self.grads: torch.Tensor | None = None  # Σ w·g
        self.extras: dict[str, torch.Tensor] = {}  # Σ w·x (Σ x for summed extras)
        self.nonfinite = False
        # positions of the trainable parameters when the first estimate was measured
        self.layout: tuple[int, ...] = ()

    def add(self, grads: torch.Tensor, extras: dict[str, torch.Tensor], nonfinite: bool, weight: float = 1.0) -> None:
        if self.count and set(extras) != set(self.extras):
            raise ValueError(
                f"micro-batches of one step produced different scalars ({sorted(extras)} vs {sorted(self.extras)}); "
                "return the same kind of loss (scalar or per-example vector) from every closure"
            )
        self.nonfinite |= nonfinite
        wg = grads * weight
        self.grads = wg if self.grads is None else self.grads + wg
        weighted = {k: v if k in self.summed else v * weight for k, v in extras.items()}
        self.extras = {k: v if k not in self.extras else self.extras[k] + v for k, v in weighted.items()}
        self.weight += weight
        self.count += 1

    def mean(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.grads is not None and self.count > 0
        return self.grads / self.weight, {
            k: v if k in self.summed else v / self.weight for k, v in self.extras.items()
        }
