"""Call torch.optim.Optimizer's ``torch._disable_dynamo``-wrapped methods without importing ``torch._dynamo``.

``Optimizer.add_param_group``, ``state_dict`` and ``load_state_dict`` are wrapped in ``torch._disable_dynamo``,
whose first call imports ``torch._dynamo`` (and Triton where installed): 1-3 s on the 2-core dev machine, as
much as ``import torch``, paid once per process. A deployed Flower ClientApp runs every message in a fresh
process, and builds and restores its optimizer there, so it paid that on every round for nothing: the wrapper
only stops Dynamo tracing into the method, and no Dynamo can be tracing while ``torch._dynamo`` is not imported
(``torch.compile`` imports it first). So while it is absent the plain method runs (``functools.wraps`` keeps it
as ``__wrapped__``); once any code imports it, the wrapper runs as torch meant. Decided per call.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["eager"]


def eager(bound: Callable[..., Any]) -> Callable[..., Any]:
    """``bound`` (a method bound via ``super()``) or, while ``torch._dynamo`` is not imported, its unwrapped body."""
    if "torch._dynamo" in sys.modules:
        return bound
    plain = getattr(getattr(bound, "__func__", None), "__wrapped__", None)
    return bound if plain is None else types.MethodType(plain, bound.__self__)  # type: ignore[attr-defined]
