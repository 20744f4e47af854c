"""The zeroth-order optimizers (one step protocol in :mod:`zo_optim.optim.base`)."""

from .base import NonFiniteLossError, ZOOptimizer
from .mezo import MeZO
from .zo_adam import ZOAdam

__all__ = ["MeZO", "NonFiniteLossError", "ZOAdam", "ZOOptimizer"]
