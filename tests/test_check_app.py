"""``zo-optim check`` (zo_optim.apps.check): the table, the exit status, a forced failure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zo_optim.apps import check
from zo_optim.ops import chunked

DEVICE = os.environ.get("ZO_OPTIM_TRITON_DEVICE") or "cpu"


def _rows(out: str) -> dict[tuple[str, str, str], list[str]]:
    """The table's rows by (backend, device, dtype)."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 6 and cells[0] in ("triton", "cpu", "chunked", "reference"):
            rows[tuple(cells[:3])] = cells
    return rows


def test_every_row_passes_and_carries_a_bandwidth_figure(capsys):
    rc = check.main(["--devices", "cpu", "--backends", "chunked,reference", "--dtypes", "float32,bfloat16",
                     "--numel", "4096"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _rows(out)
    dtypes = ("-", "shards", "float32", "bfloat16")
    assert set(rows) == {(b, "cpu", d) for b in ("chunked", "reference") for d in dtypes}
    assert all(r[5] == "PASS" for r in rows.values())
    # perturb and copy GB/s, and the ratio, on every dtype row
    assert "GB/s" in out and all(r[7] == "/" for k, r in rows.items() if k[2] not in ("-", "shards"))
    assert f"torch {torch.__version__}" in out and "RNG contract philox4x32-10/bm4/v1" in out


def test_a_forced_failure_exits_1_and_names_the_check(capsys, monkeypatch):
    real = chunked.perturb_

    def off_by_one_ulp_and_more(params, *args, **kwargs):
        real(params, *args, **kwargs)
        for p in params:
            p.mul_(1.001)

    monkeypatch.setattr(chunked, "perturb_", off_by_one_ulp_and_more)
    rc = check.main(["--devices", "cpu", "--backends", "chunked,reference", "--dtypes", "float32",
                     "--no-bandwidth"])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = _rows(out)
    assert rows[("chunked", "cpu", "-")][5:] == ["FAIL", "(rademacher,", "gaussian)"]
    assert rows[("chunked", "cpu", "shards")][5:] == ["FAIL", "(shard-rademacher,", "shard-gaussian)"]
    assert rows[("chunked", "cpu", "float32")][5:] == ["FAIL", "(perturb)"]
    assert rows[("reference", "cpu", "float32")][5] == "PASS" and rows[("reference", "cpu", "shards")][5] == "PASS"
    assert "5 check(s) FAILED" in out and "chunked on cpu - rademacher: FAILED" in out
    assert "attach this whole output to a bug report" in out


@pytest.mark.skipif(DEVICE != "cpu", reason="patches a kernel: the Triton interpreter only")
def test_a_patched_triton_kernel_fails_the_check(capsys, monkeypatch):
    pytest.importorskip("triton")
    from triton_skewed import skewed_direction_block
    from zo_optim.ops.triton import kernels

    monkeypatch.setattr(kernels, "direction_block", skewed_direction_block)
    rc = check.main(["--devices", "cpu", "--backends", "triton", "--dtypes", "bfloat16", "--no-bandwidth"])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = _rows(out)
    assert rows[("triton", "cpu", "-")][5] == "FAIL" and rows[("triton", "cpu", "bfloat16")][5] == "FAIL"


def test_an_unavailable_backend_is_skipped_not_failed(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton runs CPU tensors only when interpreted
    rc = check.main(["--devices", "cpu", "--backends", "triton,chunked", "--dtypes", "float32", "--no-bandwidth"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "skipped: triton on cpu: not available here" in out
    assert ("chunked", "cpu", "float32") in _rows(out)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="Invalid backends: 'cuda'"):
        check.main(["--backends", "cuda"])
    with pytest.raises(SystemExit, match="Invalid dtypes: 'float64'"):
        check.main(["--dtypes", "float64"])


def test_the_cli_runs_it():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "zo_optim.cli", "check", "--devices", "cpu", "--backends", "reference",
           "--dtypes", "float32", "--no-bandwidth"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all 3 rows passed" in res.stdout
    help_ = subprocess.run([sys.executable, "-m", "zo_optim.cli", "--help"], capture_output=True, text=True, env=env)
    assert "check " in help_.stdout
