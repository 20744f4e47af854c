"""zo-optim: zeroth-order (forward-pass-only) optimizers for PyTorch."""

from . import ops, rng
from .rng import RNG_VERSION

__version__ = "0.1.0"

__all__ = ["RNG_VERSION", "__version__", "ops", "rng"]
