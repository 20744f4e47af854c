"""``zo-optim bench federated --task encoder``: the convergence bench's encoder problem, federated (issue 24)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from zo_optim import cli
from zo_optim.apps import assets
from zo_optim.bench import encoder as E
from zo_optim.bench import federated, report
from zo_optim.bench.federated_encoder import build_encoder_task


@pytest.fixture(autouse=True)
def _small_cached_encoder(tmp_path, monkeypatch):
    """A private feature cache of 32 + 32 tweets (the ``ci`` key), and the process settings the CLI changes."""
    for key in assets.offline_env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ZO_OPTIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(E.SIZES, "ci", (32, 32))


def test_encoder_task_is_the_convergence_problem():
    """Same weights -> the federated model's logits, per-example losses and accuracy equal the encoder problem's."""
    task = build_encoder_task("ci", clients=4, alpha=1.0, batch_size=8, seed=0)
    inst = E.encoder("ci", seed=0)
    model = task.model_fn()
    assert [n.replace(".", "_") for n in inst.names] == [n for n, _ in model.named_parameters()]
    assert 1_900_000 < sum(p.numel() for p in model.parameters()) < 1_950_000
    # Move both off the initial weights identically: a wrong tensor order would then show in the logits
    # (at the initial weights too, but a perturbation also rules out two tensors that happen to be equal).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), inst.params, strict=True):
            p.add_(torch.randn(p.shape, generator=gen), alpha=0.02)
            q.copy_(p)
    te = task.test
    with torch.no_grad():
        got, want = model(te["h"], te["mask"]), inst.extras["logits"](te["h"], te["mask"])
    assert torch.equal(got, want)  # the same float ops in the same order: bit-equal, not merely close
    acc, loss = task.evaluate(model)
    assert acc == inst.evaluate()
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(want, te["y"])), rel=1e-6)
    # a client's loss is per-example (HELENE-style optimizers need [B]) on its own share of the pool
    per_example = task.client_loss(2)(model, 0)
    idx = task.batch_index(2, 0)
    assert per_example.shape == (len(idx),) and set(idx.tolist()) <= set(task.parts[2])
    assert sorted(i for part in task.parts for i in part) == list(range(len(task.train["y"])))  # a partition
    with pytest.raises(ValueError, match="Invalid client: 4"):
        task.client_loss(4)
    with pytest.raises(ValueError, match="Invalid size: 'tiny'"):
        build_encoder_task("tiny")


def test_encoder_task_rounds_keep_replicas_identical():
    """Real simulated HiSo rounds (K moves, τ = 2): the server moves and every client replica equals it bit for bit.

    (DeComFL's runs are checked by the CLI test below: run_one raises if a replica differs.)
    """
    import zo_optim
    from zo_optim.federated import simulate

    task = build_encoder_task("ci", clients=4, alpha=1.0, batch_size=8, seed=0).resplit(clients=4, alpha=0.5, seed=1)
    res = simulate(task.model_fn, lambda m: zo_optim.HiSo(m.parameters(), lr=1e-3, num_queries=1, seed=1),
                   [task.client_loss(c) for c in range(task.num_clients)], rounds=2, clients_per_round=2,
                   local_steps=2, seed=1)
    init = task.model_fn()
    assert any(not torch.equal(p, q) for p, q in zip(res.server.parameters(), init.parameters(), strict=True))
    assert res.replicas_identical()
    k = torch.cat([res.coordinator.optimizer.state[p]["hessian"].flatten() for p in res.server.parameters()])
    assert float(k.min()) < 1.0  # K left its initial 1: the optimizer state compared above is not trivial
    for client in res.clients:
        assert all(torch.equal(p, q) for p, q in zip(client.parameters(), res.server.parameters(), strict=True))


def test_bench_federated_encoder_ci_size(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "federated", "--task", "encoder", "--rounds", "4", "--eval-every", "2", "--clients", "4",
                     "--clients-per-round", "2", "--batch-size", "8", "--out", str(out)]) == 0
    rows = report.read_csv(out / "federated.csv")
    # the encoder's defaults: lr 3e-3 (the head task's 1e-2 is not used), one seed
    assert {r["name"] for r in rows if r["metric"] == "held_out_accuracy"} == {
        f"{m}/lr=0.003/seed=0" for m in federated.METHODS}
    best = {(r["name"], r["metric"]): r["value"] for r in rows if r["x"] == "best"}
    # P = 1 by default: 4 B of scalars + the 42 B header (protocol 3, docs/federated.md)
    assert best[("hiso", "bytes_up_per_reply")] == best[("decomfl", "bytes_up_per_reply")] == 46
    n = sum(t.numel() for t in build_encoder_task("ci", clients=4, batch_size=8).init)
    text = capsys.readouterr().out
    assert "encoder task" in text and f"({n:,} parameters)" in text
    assert (out / "federated.png").read_bytes()[:4] == b"\x89PNG" and (out / "env.json").is_file()


def test_anchor_decay_pulls_hiso_and_keeps_replicas_identical(tmp_path, capsys):
    """``--anchor-decay``: HiSo's replicas still agree bit for bit, and one round's move from θ0 shrinks by 1 − a.

    After one round every replica moved by the same Δ from θ0 (the same scalars, K still 1), so with the pull the
    distance to θ0 is exactly (1 − lr·λ)·‖Δ‖ up to float32 rounding; DeComFL (no pull) is unchanged.
    """
    import zo_optim
    from zo_optim.federated import simulate

    task = build_encoder_task("ci", clients=4, alpha=1.0, batch_size=8, seed=0)
    lr, lam = 1e-3, 100.0

    def run(anchor_decay: float):
        res = simulate(task.model_fn, lambda m: zo_optim.HiSo(m.parameters(), lr=lr, num_queries=1, seed=1,
                                                              anchor_decay=anchor_decay),
                       [task.client_loss(c) for c in range(task.num_clients)], rounds=1, clients_per_round=2, seed=1)
        assert res.replicas_identical()
        init = task.model_fn()
        return sum(float((p - q).double().pow(2).sum()) for p, q in zip(res.server.parameters(), init.parameters(),
                                                                        strict=True)) ** 0.5

    plain, pulled = run(0.0), run(lam)
    assert plain > 0
    assert abs(pulled / plain - (1 - lr * lam)) < 1e-4
    out = tmp_path / "out"
    assert cli.main(["bench", "federated", "--task", "encoder", "--rounds", "2", "--eval-every", "1", "--clients", "4",
                     "--clients-per-round", "2", "--batch-size", "8", "--anchor-decay", "3", "--out", str(out)]) == 0
    assert "HiSo anchor_decay=3" in capsys.readouterr().out


def test_lr_decay_halves_the_second_of_two_rounds_and_keeps_replicas_identical(tmp_path, capsys):
    """``--lr-decay``: lr_decay_steps = rounds·τ. With 2 rounds and τ = 1 round 1 runs at lr (t = 0) and round 2 at
    lr/2 (t = 1): both runs are equal after round 1, so round 2 measures the same scalars and its move is exactly
    half (up to float32 rounding), and the replicas agree bit for bit."""
    import zo_optim
    from zo_optim.federated import simulate

    task = build_encoder_task("ci", clients=4, alpha=1.0, batch_size=8, seed=0)

    def run(rounds: int, decay_steps: int):
        res = simulate(task.model_fn, lambda m: zo_optim.HiSo(m.parameters(), lr=1e-3, num_queries=1, seed=1,
                                                              lr_decay_steps=decay_steps),
                       [task.client_loss(c) for c in range(task.num_clients)], rounds=rounds, clients_per_round=2,
                       seed=1)
        assert res.replicas_identical()
        return [p.detach().double() for p in res.server.parameters()]

    one, const, decayed = run(1, 0), run(2, 0), run(2, 2)
    assert all(torch.equal(a, b) for a, b in zip(run(1, 2), one, strict=True))  # round 1: lr·1
    full = sum(float((c - o).pow(2).sum()) for c, o in zip(const, one, strict=True)) ** 0.5
    half = sum(float((d - o).pow(2).sum()) for d, o in zip(decayed, one, strict=True)) ** 0.5
    assert full > 0 and abs(half / full - 0.5) < 1e-3
    out = tmp_path / "out"
    assert cli.main(["bench", "federated", "--task", "encoder", "--rounds", "2", "--eval-every", "1", "--clients", "4",
                     "--clients-per-round", "2", "--batch-size", "8", "--lr-decay", "--out", str(out)]) == 0
    assert "lr decayed linearly to 0 (both)" in capsys.readouterr().out
