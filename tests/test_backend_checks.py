"""A broken or missing backend fails its tests; only a dependency absent by design skips (issue 26).

The end-to-end check runs pytest in a subprocess on two tests of test_ops.py with the ``cpu``
backend's module made to raise ``ImportError`` on import (what appending ``raise ImportError("x")``
to ``src/zo_optim/ops/cpu/__init__.py`` does) while numba is installed: before issue 26 those tests
were skipped ("backend 'cpu' unavailable here") and the run passed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import backend_checks
from backend_checks import backend_or_skip

ROOT = Path(__file__).resolve().parents[1]

# A plugin for the subprocess: the cpu backend's module raises on import, numba stays importable.
BROKEN_CPU = '''
import sys

class _Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "zo_optim.ops.cpu":
            raise ImportError("x")
        return None

sys.meta_path.insert(0, _Broken())
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "broken_cpu.py").write_text(BROKEN_CPU)
    pythonpath = os.pathsep.join([str(tmp_path), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "broken_cpu", "-n", "0", "-q", "-p", "no:cacheprovider",
         "tests/test_ops.py::test_auto_resolution", "tests/test_ops.py::test_fast_backend_refuses_float64",
         "tests/test_ops.py::test_leaf_params_requiring_grad_outside_no_grad", *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": pythonpath}, capture_output=True, text=True, timeout=300,
    )


def test_a_broken_backend_module_fails_its_tests_instead_of_skipping(tmp_path):
    res = _pytest(tmp_path, "-k", "resolution or cpu")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    # the three tests that need cpu fail, naming the break; nothing is skipped
    assert "3 failed" in out and "passed" not in out, out[-3000:]
    assert "backend 'cpu' is broken" in out and "skipped" not in out, out[-3000:]


def test_the_summary_names_the_backends_and_fails_a_required_one_never_run(tmp_path):
    # leaf_params[reference] and [chunked] complete 3 reference calls (one is the expected value) and 1 chunked
    res = _pytest(tmp_path, "--require-backends=reference,chunked,cpu", "-k", "reference or chunked")
    out = res.stdout + res.stderr
    assert "op calls completed per backend: reference 3, chunked 1, cpu 0, triton 0" in out, out[-3000:]
    assert "FAILED: required backend(s) ['cpu'] completed no op call" in out, out[-3000:]
    assert res.returncode == 1, out[-3000:]


def test_a_missing_dependency_skips_only_when_not_required(no_numba, monkeypatch):
    monkeypatch.setattr(backend_checks, "_installed", lambda package: False)
    monkeypatch.setattr(backend_checks, "REQUIRED", set())
    with pytest.raises(pytest.skip.Exception, match="needs numba, which is not installed"):
        backend_or_skip("cpu")
    monkeypatch.setattr(backend_checks, "REQUIRED", {"cpu"})
    with pytest.raises(pytest.fail.Exception, match="required by --require-backends"):
        backend_or_skip("cpu")


def test_a_missing_module_of_ours_with_its_dependency_installed_fails(no_numba, monkeypatch):
    monkeypatch.setattr(backend_checks, "_installed", lambda package: True)  # numba there, our module not loading
    monkeypatch.setattr(backend_checks, "REQUIRED", set())
    with pytest.raises(pytest.fail.Exception, match="backend 'cpu' is broken"):
        backend_or_skip("cpu")


def test_a_refusal_fails_unless_triton_runs_on_cuda_by_design(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton now refuses CPU tensors
    monkeypatch.setenv("ZO_OPTIM_TRITON_DEVICE", "cpu")
    with pytest.raises(pytest.fail.Exception, match="refuses cpu tensors"):
        backend_or_skip("triton")
    monkeypatch.setenv("ZO_OPTIM_TRITON_DEVICE", "cuda")
    with pytest.raises(pytest.skip.Exception, match="triton runs compiled on CUDA"):
        backend_or_skip("triton")


def test_backend_runs_reduces_a_check_only_for_an_absent_dependency(no_numba, monkeypatch):
    # what test_bench / test_bench_memory use to decide whether the cpu rows are expected: before issue 26
    # they asked ops.available_backends(), which drops a broken backend as silently as an absent numba
    monkeypatch.setattr(backend_checks, "REQUIRED", set())
    assert backend_checks.backend_runs("reference")
    monkeypatch.setattr(backend_checks, "_installed", lambda package: False)
    assert not backend_checks.backend_runs("cpu")
    monkeypatch.setattr(backend_checks, "_installed", lambda package: True)
    with pytest.raises(pytest.fail.Exception, match="backend 'cpu' is broken"):
        backend_checks.backend_runs("cpu")
