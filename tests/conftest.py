"""Test configuration.

Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before ``triton`` is first imported; nothing above this line imports
it (zo_optim imports its Triton backend lazily). On a machine with CUDA the
kernels run natively instead.

``ZO_OPTIM_TRITON_DEVICE`` chooses explicitly (benchmarks/gpu_check.sh sets it):

* ``cuda`` — the Triton tests run compiled on the GPU; no CUDA, or ``TRITON_INTERPRET=1``
  already set, is an error instead of a silent fallback to the interpreter;
* ``cpu`` — the interpreter on CPU tensors, even where CUDA is present;
* unset or ``auto`` — ``cuda`` when CUDA is available, else ``cpu``.

The resolved value is written back to the variable, which tests/test_triton_backend.py reads.
"""

import os
import sys

import pytest
import torch

_choice = os.environ.get("ZO_OPTIM_TRITON_DEVICE", "auto").strip().lower() or "auto"
if _choice not in ("auto", "cuda", "cpu"):
    raise pytest.UsageError(f"ZO_OPTIM_TRITON_DEVICE={_choice!r}: choose auto, cuda or cpu")
if _choice == "auto":
    _choice = "cuda" if torch.cuda.is_available() else "cpu"
if _choice == "cuda":
    if not torch.cuda.is_available():
        raise pytest.UsageError("ZO_OPTIM_TRITON_DEVICE=cuda but torch sees no CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("ZO_OPTIM_TRITON_DEVICE=cuda with TRITON_INTERPRET=1: the kernels would be interpreted")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ZO_OPTIM_TRITON_DEVICE"] = _choice


@pytest.fixture
def no_numba(monkeypatch):
    """Pretend numba is not installed: the cpu backend's import fails."""
    import zo_optim.ops as ops

    monkeypatch.setitem(sys.modules, "numba", None)
    for name in [m for m in sys.modules if m.startswith("zo_optim.ops.cpu")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(ops, "_loaded", {k: v for k, v in ops._loaded.items() if k != "cpu"})
