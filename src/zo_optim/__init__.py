"""zo-optim: zeroth-order (forward-pass-only) optimizers for PyTorch."""

from . import ops, rng
from .optim import HELENE, HiSo, HiZOO, MeZO, NonFiniteLossError, WeightsNotRestoredError, ZOAdam, ZOOptimizer
from .rng import RNG_VERSION

__version__ = "0.2.0"

__all__ = [
    "HELENE",
    "RNG_VERSION",
    "HiSo",
    "HiZOO",
    "MeZO",
    "NonFiniteLossError",
    "WeightsNotRestoredError",
    "ZOAdam",
    "ZOOptimizer",
    "__version__",
    "ops",
    "rng",
]
