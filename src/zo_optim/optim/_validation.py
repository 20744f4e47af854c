"""Argument checks of the optimizers: plain functions that refuse a bad value in torch.optim's style.

Every check raises ``ValueError(f"Invalid {name}: ...")`` (or returns the value in its canonical type,
for the ``_as_*`` ones) and changes nothing, so the constructors, the param-group checks, ``estimate``,
``apply_update`` and ``load_state_dict`` can call them before the first write. The choice lists the
optimizer's arguments accept live here too (the ops' own lists come from :mod:`zo_optim.ops._checks`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..ops import _checks as ops_checks

__all__ = [
    "DISTRIBUTIONS",
    "ESTIMATORS",
    "NONFINITE",
    "PERTURBATIONS",
    "ROUNDINGS",
    "ZO_EPS_RANGE",
    "as_precond_floor",
    "as_seed",
    "as_weight",
    "as_zo_eps",
    "check_betas",
    "check_choice",
    "check_positive",
    "is_int",
]

ESTIMATORS = ("central", "forward")
PERTURBATIONS = ("inplace", "transient")
NONFINITE = ("skip", "raise")
DISTRIBUTIONS = ops_checks.DISTRIBUTIONS
# the ops' roundings, listed with the optimizer's default ("stochastic") first as its error message always did
ROUNDINGS = ops_checks.ROUNDINGS[::-1]
# The accepted perturbation scales. Below 1e-18, 2ε² (HiZOO's curvature denominator) nears the float32
# underflow (1.2e-38) and every derived scalar overflows, so every step would be skipped; above 100, ε·|u|
# reaches ~600, whose float32 ulp (6e-5) makes the in-place ±ε round trip move the weights by more than a
# typical update (and 1e30 destroys them). Typical values are 1e-4 .. 1e-1.
ZO_EPS_RANGE = (1e-18, 100.0)

# one choice check for the whole package (the ops validate their string arguments with it too)
check_choice = ops_checks.check_choice


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """A finite real number > 0 (>= 0 with ``allow_zero``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}")
    if value < 0.0 or (value == 0.0 and not allow_zero):
        raise ValueError(f"Invalid {name}: {value}")


def check_betas(betas: Any) -> None:
    """A pair of decay rates in [0, 1), checked as torch.optim.Adam does."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (a pair)")
    for i, b in enumerate(betas):
        if not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r}")


def as_zo_eps(value: Any) -> float:
    """The perturbation scale ε as a float, inside ``ZO_EPS_RANGE``."""
    check_positive("zo_eps", value)
    lo, hi = ZO_EPS_RANGE
    if not lo <= value <= hi:
        raise ValueError(
            f"Invalid zo_eps: {value!r} (the perturbation scale must lie in [{lo:g}, {hi:g}]: smaller values underflow "
            "the float32 scalars so every step is skipped, larger ones make the ±ε round trip destroy the weights; "
            "typical values are 1e-4 .. 1e-1)"
        )
    return float(value)


def as_precond_floor(value: Any, symbol: str) -> float:
    """``hessian_min``, the floor of a preconditioner ``symbol`` (HiZOO's Σ, HiSo's K) that starts at 1."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"Invalid hessian_min: {value!r} (a floor of {symbol} in (0, 1]; {symbol} starts at 1)")
    return float(value)


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_seed(value: Any) -> int:
    """A uint64 seed from an int-like value (Python or NumPy integer), else ValueError."""
    if is_int(value):
        seed = int(value)
        if 0 <= seed < 2**64:
            return seed
    raise ValueError(f"Invalid seed: {value!r} (an int in [0, 2**64))")


def as_weight(value: Any) -> float:
    """A micro-batch weight: a positive finite number (a one-element tensor is read on the host)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        w = float(value)
        if math.isfinite(w) and w > 0.0:
            return w
    raise ValueError(f"Invalid weight: {value!r} (a positive finite number, e.g. the micro-batch's token count)")
