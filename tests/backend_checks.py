"""Which ops backends a test run must exercise, and what a test does when one cannot run (issue 26).

A test that needs a backend calls :func:`backend_or_skip`. It may skip only for a reason that is a
property of the machine, never for a fault of ours:

* a fast backend whose optional dependency is not installed (``numba`` for ``cpu``, ``triton`` for
  ``triton``) skips, unless the run requires that backend (``--require-backends``, which the README's
  test command and so ``.ci/run`` pass): then it fails;
* ``triton`` refusing CPU tensors on a machine whose Triton tests run compiled on CUDA
  (``ZO_OPTIM_TRITON_DEVICE=cuda``) skips: those kernels are exercised on the GPU there;
* anything else fails: our own backend module raising on import while its dependency is installed,
  ``reference``/``chunked`` not resolving, a refusal on a machine where the backend should run.

:func:`count_dispatches` counts the op calls each backend completed in this process (conftest.py
prints the totals and fails a run that did not exercise a required backend).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os

import pytest
import torch

import zo_optim.ops as ops

#: the optional package each fast backend imports
DEPENDENCY = {"cpu": "numba", "triton": "triton"}
#: filled by conftest.py from --require-backends
REQUIRED: set[str] = set()
#: backend name -> op calls it completed in this process
DISPATCHED: collections.Counter[str] = collections.Counter()


def backend_or_skip(name: str, device: torch.device | str = "cpu") -> str:
    """``name`` if it can run tensors on ``device`` here; else skip (absent by design) or fail (broken)."""
    try:
        ops.resolve_backend(name, torch.device(device))
    except ImportError as exc:
        dep = DEPENDENCY.get(name)
        if name in REQUIRED:
            pytest.fail(f"backend {name!r} is required by --require-backends but cannot load: {exc}", pytrace=False)
        if dep is not None and not _installed(dep):
            pytest.skip(f"backend {name!r} needs {dep}, which is not installed", allow_module_level=True)
        pytest.fail(f"backend {name!r} is broken: {exc}", pytrace=False)
    except RuntimeError as exc:
        on_gpu = os.environ.get("ZO_OPTIM_TRITON_DEVICE") == "cuda"
        if name == "triton" and torch.device(device).type == "cpu" and on_gpu:
            pytest.skip(f"triton runs compiled on CUDA in this run, not CPU tensors: {exc}", allow_module_level=True)
        pytest.fail(f"backend {name!r} refuses {device} tensors here: {exc}", pytrace=False)
    return name


def backend_runs(name: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``name`` runs here, for a test that checks less without it: False only where
    :func:`backend_or_skip` would skip (an optional dependency absent by design); a broken backend fails."""
    try:
        backend_or_skip(name, device)
    except pytest.skip.Exception:
        return False
    return True


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent package missing, or a sys.modules entry of None
        return False


def count_dispatches() -> None:
    """Wrap ``ops._dispatch`` so each completed op call counts for the backend it resolved to."""
    if getattr(ops._dispatch, "_counts_backends", False):
        return
    dispatch, load = ops._dispatch, ops.load_backend
    last: list[str] = []

    def loading(name: str):
        module = load(name)
        last.append(name)
        return module

    @functools.wraps(dispatch)
    def counting(*args, **kwargs):
        del last[:]
        dispatch(*args, **kwargs)
        if last:  # _dispatch's last load is the backend it ran on
            DISPATCHED[last[-1]] += 1

    counting._counts_backends = True
    ops._dispatch, ops.load_backend = counting, loading
