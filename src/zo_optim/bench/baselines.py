r"""Baselines that the benchmarks (and the tests) compare zo-optim against.

``mezo-loop`` is a faithful copy of MeZO's optimizer loop (Malladi et al. 2023,
arXiv 2305.17333; princeton-nlp/MeZO ``large_models/trainer.py``,
``zo_perturb_parameters`` / ``zo_step`` / ``zo_update``), kept line for line
where it decides speed or numerics:

* every pass re-seeds the global generator with ``torch.manual_seed(seed)``;
* per parameter ``z = torch.normal(mean=0, std=1, size=p.data.size(),
  device=p.data.device, dtype=p.data.dtype)`` (z in the weight's dtype);
* the perturbation is out of place: ``p.data = p.data + scaling_factor * z * zo_eps``;
* a step is 4 passes: +ε, forward, −2ε, forward, +ε (restore), then the update
  ``p.data = p.data - lr * (g * z + wd * p.data)`` after re-seeding, with no weight
  decay on names containing ``bias``, ``layer_norm`` or ``layernorm``;
* the projected gradient is read on the host (``.item()``) and the step's seed
  is drawn with ``np.random.randint(1e9)``.

.. math::
    g = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon}, \qquad
    \theta \leftarrow \theta - \text{lr}\,(g\,z + \text{wd}\,\theta)

It lives in the package (not in ``benchmarks/``) so that tests import the same
code the benchmarks time, as Liger-Kernel does with its baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = ["MezoLoop"]

_NO_DECAY = ("bias", "layer_norm", "layernorm")


class MezoLoop:
    """MeZO's ZO-SGD loop over named tensors (or plain tensors, then all get weight decay).

    Args:
        params: ``model.named_parameters()``-style ``(name, tensor)`` pairs, or tensors.
            Tensors with ``requires_grad=False`` are skipped, as in MeZO.
        lr: learning rate.
        zo_eps: perturbation scale ε.
        weight_decay: MeZO's coupled weight decay (not applied to bias/LayerNorm names).
        seed: seeds the NumPy generator that draws each step's seed.
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.Tensor]] | Iterable[torch.Tensor],
        lr: float = 1e-6,
        zo_eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if zo_eps <= 0.0:
            raise ValueError(f"Invalid zo_eps: {zo_eps}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        named: list[tuple[str, torch.Tensor]] = []
        for i, item in enumerate(params):
            name, p = item if isinstance(item, tuple) else (f"param{i}", item)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"MezoLoop params[{i}] is a {type(p).__name__}, not a torch.Tensor")
            if isinstance(p, torch.nn.Parameter) and not p.requires_grad:
                continue  # frozen, as MeZO's `if param.requires_grad`
            named.append((name, p))
        if not named:
            raise ValueError("MezoLoop got no trainable tensors")
        self.named_parameters_to_optim = named
        self.lr = lr
        self.zo_eps = zo_eps
        self.weight_decay = weight_decay
        self.zo_random_seed = 0
        self.projected_grad = 0.0
        self._np_rng = np.random.RandomState(seed)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for _, p in self.named_parameters_to_optim]

    def perturb(self, seed: int | None = None, scaling_factor: float = 1.0) -> None:
        """One pass: θ ← θ + scaling_factor·ε·z (MeZO's ``zo_perturb_parameters``)."""
        torch.manual_seed(self.zo_random_seed if seed is None else seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.zo_eps

    def update(self, seed: int | None = None, projected_grad: float | None = None) -> None:
        """One pass: θ ← θ − lr·(g·z + wd·θ) with z regenerated from the seed (MeZO's ``zo_update``)."""
        g = self.projected_grad if projected_grad is None else projected_grad
        torch.manual_seed(self.zo_random_seed if seed is None else seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if not any(key in name for key in _NO_DECAY):
                param.data = param.data - self.lr * (g * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (g * z)

    def step_passes(self, seed: int, projected_grad: float) -> None:
        """The 4 parameter passes of one step without the forwards (what the kernel benchmark times)."""
        self.perturb(seed, 1)
        self.perturb(seed, -2)
        self.perturb(seed, 1)
        self.update(seed, projected_grad)

    @staticmethod
    def _forward(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        # MeZO's zo_forward: eval mode is the caller's job; inference_mode, detached loss.
        with torch.inference_mode():
            return closure().detach()

    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        """One MeZO step: 2 forwards, 4 passes, ``.item()`` on the projected gradient; returns L(θ+εz)."""
        self.zo_random_seed = int(self._np_rng.randint(1000000000))
        self.perturb(scaling_factor=1)
        loss1 = self._forward(closure)
        self.perturb(scaling_factor=-2)
        loss2 = self._forward(closure)
        self.projected_grad = ((loss1 - loss2) / (2 * self.zo_eps)).item()
        self.perturb(scaling_factor=1)
        self.update()
        return float(loss1.float().mean())

    def directions(self, seed: int) -> Sequence[torch.Tensor]:
        """The z tensors a pass with ``seed`` draws (for tests: regenerated, never stored by the loop)."""
        torch.manual_seed(seed)
        return [torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
                for _, p in self.named_parameters_to_optim]
