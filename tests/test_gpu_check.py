"""benchmarks/gpu_check.sh without a GPU: it exits 3 with a clear message and writes nothing;
the bench command lines it would run on a GPU are valid for their parsers."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zo_optim.apps import check
from zo_optim.bench import kernels, memory, step

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: this machine has CUDA")
def test_no_cuda_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results"
    res = run(RESULTS_DIR=str(out), CUDA_VISIBLE_DEVICES="")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no CUDA GPU: nothing to check" in res.stdout
    assert not out.exists()


def test_print_commands_are_valid() -> None:
    res = run("--print-commands")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 6
    # zo-optim check first, with arguments its parser accepts
    words = shlex.split(lines[0])
    assert words[:2] == ["zo-optim", "check"], lines[0]
    assert set(check.build_parser().parse_args(words[2:]).dtypes.split(",")) == {"float32", "bfloat16", "float16"}
    assert lines[1].startswith("ZO_OPTIM_TRITON_DEVICE=cuda ") and "tests/test_triton_backend.py" in lines[1]
    assert lines[5].endswith("tests/hf_scripts/fsdp_train.py RESULTS_DIR/fsdp2_trainer --gpu-check")
    parsers = {"kernels": kernels.build_parser(), "step": step.build_parser(), "memory": memory._parser()}
    parsed = {}
    for line in lines[2:5]:
        words = shlex.split(line.replace("RESULTS_DIR", "/tmp/x"))
        assert words[:2] == ["zo-optim", "bench"], line
        parsed[words[2]] = parsers[words[2]].parse_args(words[3:])
    k, s = parsed["kernels"], parsed["step"]
    assert k.models == "opt-1.3b" and set(k.dtypes.split(",")) == {"fp32", "bf16"} and "triton" in k.providers
    assert (s.model, s.dtype, s.batch, s.seq, s.backend) == ("opt-1.3b", "bf16", 16, 128, "triton")
    m = parsed["memory"]
    assert m.models == ["bert-large", "opt-350m"] and m.methods == list(memory.METHODS)


def test_help_and_bad_argument() -> None:
    res = run("--help")
    assert res.returncode == 0 and "Exit codes" in res.stdout
    res = run("--bogus")
    assert res.returncode == 2 and "unknown argument" in res.stderr
