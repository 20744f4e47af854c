"""The zeroth-order optimizers (one step protocol in :mod:`zo_optim.optim.base`)."""

from .base import NonFiniteLossError, WeightsNotRestoredError, ZOOptimizer
from .helene import HELENE
from .hiso import HiSo
from .hizoo import HiZOO
from .mezo import MeZO
from .zo_adam import ZOAdam

__all__ = ["HELENE", "HiSo", "HiZOO", "MeZO", "NonFiniteLossError", "WeightsNotRestoredError", "ZOAdam", "ZOOptimizer"]
