r"""Probe losses → projected-gradient scalars, and their accumulation across micro-batches.

For query :math:`k` with direction :math:`u_k` and scale :math:`\epsilon`:

* central:  :math:`g_k = (L(\theta+\epsilon u_k) - L(\theta-\epsilon u_k)) / 2\epsilon`
* forward:  :math:`g_k = (L(\theta+\epsilon u_k) - L(\theta)) / \epsilon`

Losses are 1-D float32 tensors (a scalar loss is a vector of length 1; a
closure may return a ``[B]`` vector of per-example losses). Whether the losses
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
    """Running sums of the scalars of several estimates of one step (gradient accumulation).

    ``mean`` averages the projected gradients and the extras over the estimates,
    except the extras named in ``summed`` (sums over examples, e.g. HELENE's
    Σ_b g_b², which must not depend on how a batch is split), which stay summed.
    """

    def __init__(self, summed: frozenset[str] = frozenset()) -> None:
        self.summed = summed
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
        return self.grads / self.count, {
            k: v if k in self.summed else v / self.count for k, v in self.extras.items()
        }
