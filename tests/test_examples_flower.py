"""examples/flower: its defaults match its pyproject, and its apps run in Flower's simulation runtime."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("transformers")

from flower_inprocess import use_in_process_backend

try:
    import tomllib
except ImportError:  # Python 3.10 (flwr depends on tomli)
    import tomli as tomllib

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"


@pytest.fixture
def task(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from zo_flower_minilm import task

    return task


def test_defaults_are_the_pyproject_run_config(task):
    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert config["config"] == task.DEFAULTS
    assert config["components"] == {"serverapp": "zo_flower_minilm.server_app:app",
                                    "clientapp": "zo_flower_minilm.client_app:app"}


@pytest.mark.slow
def test_example_apps_train_and_stay_identical(task, monkeypatch, tmp_path, capsys):
    from flwr.simulation import run_simulation

    use_in_process_backend(monkeypatch)
    small = {"num-server-rounds": 8, "train-examples": 96, "eval-examples": 40, "cache-dir": str(tmp_path)}
    monkeypatch.setattr(task, "DEFAULTS", {**task.DEFAULTS, **small})
    from zo_flower_minilm import client_app, server_app

    run_simulation(server_app.app, client_app.app, num_supernodes=3)
    out = capsys.readouterr().out
    assert "replicas identical: True" in out and "refused: none" in out, out
    got = re.search(r"held-out accuracy: ([0-9.]+) -> ([0-9.]+), loss ([0-9.]+) -> ([0-9.]+)", out)
    assert got, out
    acc0, acc, loss0, loss = map(float, got.groups())
    # Trained: measured 0.425 -> 0.675 held-out accuracy (40 tweets) and cross-entropy 0.7146 -> 0.6488 in these
    # 8 rounds; asked: about half of each gain, +0.125 (5 of 40 tweets) and -0.03. The evaluation is
    # deterministic, so a loss that moved means the head's weights moved; with lr = 0 the run prints
    # "0.425 -> 0.425" and the same loss, and fails here.
    assert acc >= acc0 + 0.125, (acc0, acc)
    assert loss <= loss0 - 0.03, (loss0, loss)
    assert list(tmp_path.glob("*.pt"))  # features cached on the node's disk
    for name in [m for m in sys.modules if m.startswith("zo_flower_minilm")]:
        monkeypatch.delitem(sys.modules, name)
