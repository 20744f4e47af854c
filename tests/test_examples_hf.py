"""The examples/ scripts run offline on CPU in their --smoke mode (issue 11 item 6)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(cmd: list[str], tmp_path: Path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run([*cmd, "--smoke", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out accuracy:" in proc.stdout
    # The smoke run is 2 steps: too few to move held-out accuracy reliably, so it shows the optimizer acted.
    # The frozen weights (LoRA's base model) must not move at all. The trainable ones must move by more than
    # the in-place ±ε round trip alone can: 3 passes a step (MeZO, q = 1), each rounding once in float32 by at
    # most ½ spacing at a size below max|θ| + 6ε (|z| < 6), so 2 steps drift at most 3 spacings of it. An lr of
    # 0, or an update that is never applied, stays within that bound.
    moved = re.findall(r"max \|weight change\|: trainable ([0-9.e+-]+), frozen ([0-9.e+-]+) "
                       r"\(largest trainable \|weight\| ([0-9.e+-]+)\)", proc.stdout)
    assert moved, proc.stdout[-2000:]
    for trainable, frozen, largest in moved:
        size = torch.tensor(float(largest) + 6 * 1e-3)
        drift = 2 * 3 * 0.5 * float(torch.nextafter(size, torch.tensor(float("inf"))) - size)
        assert float(trainable) > drift and float(frozen) == 0.0, (drift, proc.stdout[-2000:])
    return proc.stdout


@pytest.mark.slow
def test_hf_trainer_minilm_smoke(tmp_path):
    _run([sys.executable, str(EXAMPLES / "hf_trainer_minilm.py")], tmp_path)


@pytest.mark.slow
def test_hf_peft_lora_smoke(tmp_path):
    pytest.importorskip("peft")
    out = _run([sys.executable, str(EXAMPLES / "hf_peft_lora.py")], tmp_path)
    assert "LoRA" in out


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_ddp_smoke(tmp_path):
    out = _run(["bash", str(EXAMPLES / "torchrun_ddp.sh")], tmp_path)
    assert out.count("held-out accuracy:") == 1  # printed by rank 0 only
