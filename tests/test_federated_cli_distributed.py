"""``zo-optim federated --engine distributed`` under torchrun: real gloo processes end with simulate's checksum."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from zo_optim.apps import assets
from zo_optim.apps import federated as federated_cli

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--rounds", "3", "--clients", "3", "--clients-per-round", "2", "--batch-size", "8", "--train-examples", "48",
        "--eval-examples", "16", "--max-len", "24", "--no-progress"]


@pytest.fixture(autouse=True)
def _keep_process_settings(monkeypatch):
    for key in assets.offline_env():
        monkeypatch.delenv(key, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_engine_gives_the_same_checksum_as_simulate(tmp_path):
    """4 processes (rank 0 serves, ranks 1-3 are clients 0-2) launched by torchrun, as the docs say to; the rounds
    are simulate()'s, so the final server weights hash the same, and every client's replica equals the server's."""
    sim = federated_cli.run(federated_cli.build_parser().parse_args([*TINY, "--out", str(tmp_path / "s")]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "zo_optim.cli", "federated", *TINY, "--engine", "distributed",
           "--out", str(tmp_path / "d")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    dist = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert dist["engine"] == "distributed" and dist["checksum"] == sim["checksum"]
    assert dist["participations"] == sim["participations"]
    assert [c["accuracy"] for c in dist["curve"]] == [c["accuracy"] for c in sim["curve"]]
    assert dist["replicas"]["checked"] == [0, 1, 2] and dist["replicas"]["differing"] == []
    assert "replicas: 3 replica(s) checked: all identical to the server" in res.stdout


def test_distributed_engine_refuses_a_wrong_launch_before_any_collective(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert federated_cli.main([*TINY, "--engine", "distributed", "--out", str(tmp_path)]) == 2
    assert "launch it with e.g. `torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # 2 clients, but --clients 3
    assert federated_cli.main([*TINY, "--engine", "distributed", "--out", str(tmp_path)]) == 2
    assert "--clients must be 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert federated_cli.main([*TINY, "--engine", "distributed", "--dropout", "0.1", "--out", str(tmp_path)]) == 2
    assert "dropout is simulated by the in-process engine only" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written before the refusal
