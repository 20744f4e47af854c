r"""Probe losses → projected-gradient scalars, and their accumulation across micro-batches.

For query :math:`k` with direction :math:`u_k` and scale :math:`\epsilon`:

* central:  :math:`g_k = (L(\theta+\epsilon u_k) - L(\theta-\epsilon u_k)) / 2\epsilon`
* forward:  :math:`g_k = (L(\theta+\epsilon u_k) - L(\theta)) / \epsilon`

Losses are 1-D float32 tensors (a scalar loss is a vector of length 1; a
closure may return a ``[B]`` vector of per-example losses). Everything stays on
the device: no host sync here.
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
        return all(t.numel() > 1 for t in self.all_losses())

    def loss(self) -> torch.Tensor:
        """Estimate of L(θ): L0 when measured, else the mean of the probes."""
        if self.center is not None:
            return self.center.mean()
        return torch.stack([t.mean() for t in self.plus + self.minus]).mean()


class Accumulator:
    """Running sums of the scalars of several estimates of one step (gradient accumulation)."""

    def __init__(self) -> None:
        self.count = 0
        self.grads: torch.Tensor | None = None
        self.extras: dict[str, torch.Tensor] = {}
        self.nonfinite = False

    def add(self, grads: torch.Tensor, extras: dict[str, torch.Tensor], nonfinite: bool) -> None:
        if self.count and set(extras) != set(self.extras):
            raise ValueError(
                f"micro-batches of one step produced different scalars ({sorted(extras)} vs {sorted(self.extras)}); "
                "return the same kind of loss (scalar or per-example vector) from every closure"
            )
        self.nonfinite |= nonfinite
        self.grads = grads if self.grads is None else self.grads + grads
        self.extras = {k: v if k not in self.extras else self.extras[k] + v for k, v in extras.items()}
        self.count += 1

    def mean(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.grads is not None and self.count > 0
        return self.grads / self.count, {k: v / self.count for k, v in self.extras.items()}
