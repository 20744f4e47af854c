"""``zo-optim bench flower-round-time``: the phase arithmetic, the apps it writes, its argument checks.

The bench itself runs real Flower processes for minutes (its recorded output is in
benchmarks/results/*-flower-round-time/); here the parts that decide its numbers are checked cheaply: every
phase is the difference of the two timestamps docs/federated.md defines it by, and the apps it hands to
``flwr run`` are valid Python whose ClientApp wraps the methods the library really has.
"""

from __future__ import annotations

import ast

import pytest

from zo_optim.bench import flower_round_time as bench
from zo_optim.bench._flower_rt_app import KINDS, write_app
from zo_optim.federated.client import FederatedWrapper


def test_phases_are_the_documented_timestamp_differences():
    # one task: pushed at 10.0, process started 12.0, app module at 13.0, torch at 14.0, zo at 14.5, handler
    # 14.7 -> 15.0 (build 0.1 inside participant 0.3; catch-up 0.05, compute 0.1, save 0.01), exit 15.2, pulled 15.9
    records = [
        # the handshake (ZOStrategy's group id -1) is not a round; the first round is numbered 0
        {"side": "server", "event": "push", "round": "-1", "node": 7, "t": 1.0},
        {"side": "client", "event": "message", "kind": "query", "round": "-1", "node": 7, "pid": 0, "start": 2.0,
         "top": 3.0, "torch": 4.0, "zo": 4.5, "task": 4.6, "h0": 4.7, "h1": 5.0, "phases": {}},
        {"side": "server", "event": "reply", "round": "-1", "node": 7, "t": 6.0},
        {"side": "server", "event": "push", "round": "0", "node": 7, "t": 10.0},
        {"side": "server", "event": "push", "round": "0", "node": 8, "t": 10.1},
        {"side": "client", "event": "message", "kind": "train", "round": "0", "node": 7, "pid": 1, "start": 12.0,
         "top": 13.0, "torch": 14.0, "zo": 14.5, "task": 14.6, "h0": 14.7, "h1": 15.0,
         "phases": {"build": 0.1, "participant": 0.3, "catch_up": 0.05, "compute": 0.1, "save": 0.01}},
        {"side": "client", "event": "exit", "pid": 1, "t": 15.2},
        {"side": "server", "event": "reply", "round": "0", "node": 7, "t": 15.9},
        {"side": "server", "event": "reply", "round": "0", "node": 8, "t": 16.4},
    ]
    res = bench.analyse(records)
    query, task = res["tasks"]
    assert query["kind"] == "query" and task["kind"] == "train"
    want = {"wait": 2.0, "flower_start": 1.0, "import_torch": 1.0, "import_zo": 0.5, "app": 0.2, "build": 0.1,
            "restore": 0.2, "catch_up": 0.05, "compute": 0.1, "save": 0.01, "reply": 0.2, "return": 0.7,
            "round_trip": 5.9}
    assert {k: round(task[k], 9) for k in want} == want
    # the round: first push (10.0) to last reply (16.4)
    assert [(r["round"], round(r["seconds"], 9)) for r in res["rounds"]] == [(0, 6.4)]
    assert bench.summarise("zo", res)["round"] == pytest.approx(6.4)


@pytest.mark.parametrize("kind", KINDS)
def test_the_apps_are_valid_and_wrap_real_methods(tmp_path, kind):
    app = write_app(tmp_path, kind)
    assert "[tool.flwr.app.components]" in (app / "pyproject.toml").read_text()
    for path in (app / f"zo_rt_{kind}").glob("*.py"):
        ast.parse(path.read_text(), str(path))
    if kind == "zo":
        from zo_optim.federated.flower import client_app as impl

        text = (app / "zo_rt_zo" / "client_app.py").read_text()
        # the ClientApp times these by name: a rename in the library must fail here, not silently time nothing
        for cls, name in ((impl._ClientNode, "build"), (impl._ClientNode, "participant"), (impl._ClientNode, "save"),
                          (impl._ClientNode, "hello"), (impl._ClientNode, "handle"), (FederatedWrapper, "hello"),
                          (FederatedWrapper, "catch_up"), (FederatedWrapper, "compute")):
            assert callable(getattr(cls, name)) and f'"{name}"' in text, name


@pytest.mark.parametrize("argv", [["--apps", "zo,nope"], ["--nodes", "0"], ["--rounds", "0"]])
def test_bad_arguments_exit_2_before_starting_anything(argv, capsys):
    assert bench.main(argv) == 2
    assert "Invalid" in capsys.readouterr().err
