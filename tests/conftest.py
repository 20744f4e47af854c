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

``--require-backends=reference,chunked,cpu,triton`` (the README's test command, hence ``.ci/run``, passes
it) names the ops backends the run must exercise: a test that needs one of them errors instead of
skipping when it cannot load (tests/backend_checks.py), the terminal summary prints how many op calls
each backend completed, and a run that completed none on a required backend fails. Without the option
a backend may be skipped only when its optional dependency is not installed; a broken backend module
of ours fails either way.
"""

import os
import sys

import pytest
import torch

import backend_checks  # imports zo_optim.ops, which imports neither triton nor numba

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


def pytest_addoption(parser):
    parser.addoption(
        "--require-backends", default="", metavar="NAMES",
        help="comma-separated ops backends this run must exercise (a test needing one errors instead of skipping)",
    )


def pytest_configure(config):
    import zo_optim.ops as ops

    names = [n.strip() for n in config.getoption("--require-backends").split(",") if n.strip()]
    unknown = sorted(set(names) - set(ops.BACKENDS[1:]))
    if unknown:
        raise pytest.UsageError(f"--require-backends: unknown backend(s) {unknown}; choose from {ops.BACKENDS[1:]}")
    backend_checks.REQUIRED.update(names)
    backend_checks.count_dispatches()  # in each process; xdist workers send their counts in sessionfinish


def pytest_sessionfinish(session, exitstatus):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
        workeroutput["zo_backend_counts"] = dict(backend_checks.DISPATCHED)
        return
    missing = sorted(n for n in backend_checks.REQUIRED if not backend_checks.DISPATCHED[n])
    if missing and session.testscollected and not session.config.option.collectonly:
        session.config._zo_backends_missing = missing
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller collects each worker's counts
def pytest_testnodedown(node, error):
    backend_checks.DISPATCHED.update(getattr(node, "workeroutput", {}).get("zo_backend_counts", {}))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workeroutput"):
        return
    counts = backend_checks.DISPATCHED
    shown = ", ".join(f"{n} {counts[n]}" for n in ("reference", "chunked", "cpu", "triton"))
    triton_mode = "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"
    terminalreporter.write_sep("-", "ops backends exercised")
    terminalreporter.write_line(f"op calls completed per backend: {shown} (triton: {triton_mode})")
    required = ",".join(sorted(backend_checks.REQUIRED)) or "none"
    terminalreporter.write_line(f"required (--require-backends): {required}")
    missing = getattr(config, "_zo_backends_missing", [])
    if missing:
        terminalreporter.write_line(f"FAILED: required backend(s) {missing} completed no op call in this run", red=True)
