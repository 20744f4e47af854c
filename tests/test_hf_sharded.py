"""ZOTrainer on a model sharded with FSDP2 (``fully_shard`` before the Trainer): 2 gloo ranks under torchrun.

accelerate 1.15 runs the Trainer's own ``fsdp=`` path only on accelerators (see
zo_optim/integrations/hf/_sharded.py); on CPU the user shards the model. Without the integration's
two fixes the run dies in accelerate's DDP wrapper (DDP cannot broadcast DTensors), or the root reads
stale gathered weights. The expected values come from an independent run: the same script with full
replicas (the data-parallel path, DDP-wrapped by accelerate), which must end bit-identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch

import hf_tiny as T
from gloo import free_port

TESTS = Path(__file__).resolve().parent


def _torchrun(out: Path, *extra: str) -> None:
    out.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(TESTS / "hf_scripts" / "fsdp_train.py"), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_zotrainer_on_a_fully_sharded_model_equals_the_replicated_run(tmp_path):
    _torchrun(tmp_path / "fsdp")
    _torchrun(tmp_path / "ddp", "--replicated")
    s0, s1 = (torch.load(tmp_path / "fsdp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    d0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    assert s0["kinds"] == ["DTensor"] and d0["kinds"] == ["Parameter"]  # the optimizer saw shards vs replicas
    assert torch.equal(s0["grads"], d0["grads"]) and torch.equal(s0["grads"], s1["grads"])
    assert s0["weights"].keys() == d0["weights"].keys()
    init = T.tiny_gpt2().state_dict()
    moved = [k for k, v in d0["weights"].items() if not torch.equal(v, init[k])]
    assert moved, "the replicated run did not train"
    for k, v in d0["weights"].items():
        assert torch.equal(s0["weights"][k], v), k
        assert torch.equal(s1["weights"][k], v), k


@pytest.mark.slow
@pytest.mark.distributed
def test_zotrainer_checkpoints_of_a_sharded_model_resume_bit_for_bit(tmp_path):
    """Trainer checkpoints of a fully_shard model (ZO-Adam: state sharded like its parameter): the resumed run
    ends where the uninterrupted one does, weights, moments, step counter and lr schedule, on both ranks."""
    _torchrun(tmp_path / "resume", "--resume")
    r0, r1 = (torch.load(tmp_path / "resume" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the model gathered into a plain HF checkpoint (rank 0), the optimizer's shards by every rank (DCP)
    files = r0["files"]
    assert "model.safetensors" in files and "zo_optimizer_dcp" in files and "optimizer.pt" not in files
    for r in (r0, r1):
        whole, resumed = r["whole"], r["resumed"]
        assert whole["step"] == resumed["step"] == 4 and whole["lr"] == resumed["lr"]
        init = T.tiny_gpt2().state_dict()
        assert any(not torch.equal(v, init[k]) for k, v in whole["weights"].items()), "did not train"
        assert whole["state"] and whole["state"].keys() == resumed["state"].keys()
        for part in ("weights", "state"):
            for k, v in whole[part].items():
                assert torch.equal(resumed[part][k], v), (part, k)
    # trainer.save_model() of the sharded model is the gathered model, loadable by from_pretrained
    for k, v in r0["pretrained"].items():
        assert torch.equal(v, r0["whole"]["weights"][k]), k
