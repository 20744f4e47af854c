"""``zo-optim bench convergence``: problems are what they claim, the runner counts and ranks right."""

from __future__ import annotations

import math

import pytest
import torch

import zo_optim
from zo_optim.bench import convergence as C
from zo_optim.bench import problems as P
from zo_optim.bench import report
from zo_optim.optim.registry import recommended_lr


def _loss(inst: P.Instance) -> float:
    with torch.no_grad():
        return float(inst.closure_for_step()().mean())


def test_quadratic_optimum_is_zero_and_start_is_normalised():
    inst = P.build("quadratic", "ci", seed=0)
    assert 0.5 < inst.evaluate() < 2.0  # normalised so that E[L(θ0)] = 1
    assert len({p.numel() for p in inst.params}) == len(inst.params)  # layers of different sizes
    with torch.no_grad():
        for p, o in zip(inst.params, inst.extras["optimum"], strict=True):
            p.copy_(o)
    assert inst.evaluate() == pytest.approx(0.0, abs=1e-6)


def test_rosenbrock_optimum_is_zero():
    inst = P.build("rosenbrock", "ci", seed=0)
    assert inst.evaluate() > 10.0
    with torch.no_grad():
        inst.params[0].fill_(1.0)
    assert inst.evaluate() == 0.0


def test_problem_is_fixed_and_seed_only_changes_batches():
    a, b = P.build("mlp", "ci", seed=0), P.build("mlp", "ci", seed=1)
    for pa, pb in zip(a.params, b.params, strict=True):
        assert torch.equal(pa, pb)
    assert a.evaluate() == b.evaluate()
    assert _loss(a) != _loss(b)  # different first mini-batch
    with torch.no_grad():
        per_example = a.closure_for_step()()
    assert per_example.shape == (64,)  # per-example losses for HELENE's A-GNB


def test_closure_sees_the_same_batch_until_the_next_step():
    inst = P.build("mlp", "ci", seed=0)
    closure = inst.closure_for_step()
    with torch.no_grad():
        assert torch.equal(closure(), closure())


def test_mezo_decreases_the_quadratic():
    inst = P.build("quadratic", "ci", seed=0)
    start = inst.evaluate()
    opt = zo_optim.MeZO(inst.params, lr=recommended_lr("mezo", "convergence/quadratic"), seed=0)
    closure = inst.closure_for_step()
    with torch.no_grad():
        for _ in range(300):
            opt.step(closure)
    assert inst.evaluate() < 0.5 * start


def test_forwards_are_counted_not_steps():
    spec = P.PROBLEMS["quadratic"]
    mezo = C.run_one(spec, "ci", "mezo", {"lr": 1e-3}, 0, C.zo_optim_factory, budget=60)
    hizoo = C.run_one(spec, "ci", "hizoo", {"lr": 1e-3}, 0, C.zo_optim_factory, budget=60)
    assert mezo.forwards[-1] == 60 and mezo.steps == 30  # central: 2 forwards per step
    assert hizoo.forwards[-1] == 60 and hizoo.steps == 20  # L0, L+, L-: 3 per step


def _run(values, forwards=None, diverged=False):
    forwards = forwards or list(range(0, 10 * len(values), 10))
    r = C.RunResult(forwards, values, len(values), diverged, 0.0)
    r.final = math.inf if diverged else C._smooth(values)[-1]
    return r


def test_first_reach_uses_the_smoothed_curve():
    spec = P.PROBLEMS["quadratic"]  # lower is better
    # One noisy dip (0.1 at 10 forwards) is not enough: the 3-point running mean crosses 0.5 at 30.
    assert C.first_reach(spec, [0, 10, 20, 30, 40], C._smooth([1.0, 0.1, 1.0, 0.2, 0.2]), 0.5) == 30
    assert math.isnan(C.first_reach(spec, [0, 10], [1.0, 0.9], 0.5))


def test_best_config_prefers_final_metric_and_rejects_divergence():
    spec = P.PROBLEMS["minilm"]  # higher is better
    good = C.ConfigResult("mezo", {"lr": 1.0}, [_run([0.5, 0.7, 0.8, 0.8]), _run([0.5, 0.7, 0.8, 0.8])])
    fast_but_diverged = C.ConfigResult("mezo", {"lr": 2.0}, [_run([0.5, 0.9, 0.9, 0.9]), _run([0.5], diverged=True)])
    worse = C.ConfigResult("mezo", {"lr": 0.5}, [_run([0.5, 0.6, 0.6, 0.7]), _run([0.5, 0.6, 0.6, 0.7])])
    assert C.best_config(spec, [worse, fast_but_diverged, good]) is good


def test_cli_smoke_writes_long_format_csv_png_and_table(tmp_path, capsys):
    out = tmp_path / "conv"
    rc = C.main(["--problems", "quadratic,mlp", "--optimizers", "mezo,helene", "--seeds", "2", "--budget", "60",
                 "--out", str(out)])
    assert rc == 0
    rows = report.read_csv(out / "convergence.csv")  # raises unless the columns are the long format
    assert {r["provider"] for r in rows} == {"mezo", "helene"}
    metrics = {r["metric"] for r in rows}
    assert {"loss", "forwards_to_target", "final_loss", "forwards_to_target_mean", "final_loss_mean",
            "forwards_to_mezo_final_rel"} <= metrics
    assert (out / "quadratic.png").stat().st_size > 0 and (out / "mlp.png").stat().st_size > 0
    assert (out / "environment.json").exists()
    text = capsys.readouterr().out
    assert "MeZO" in text and "HELENE" in text and "final loss" in text


def test_first_seed_runs_and_labels_the_later_seeds(tmp_path):
    # --first-seed 2 --seeds 2 runs seeds 2 and 3 (the curves of a plain run with those seeds) and names them so in
    # the CSV, so that runs of seeds 0-1 and 2-3 merge into one 4-seed result
    base = ["--problems", "quadratic", "--optimizers", "mezo", "--budget", "40"]
    assert C.main([*base, "--seeds", "4", "--out", str(tmp_path / "all")]) == 0
    assert C.main([*base, "--seeds", "2", "--first-seed", "2", "--out", str(tmp_path / "late")]) == 0

    def curves(d):
        out = {}
        for r in report.read_csv(tmp_path / d / "convergence.csv"):
            if r["metric"] == "loss":
                out.setdefault(r["name"].split("|")[-1].strip(), []).append(r["value"])
        return out

    everything, late = curves("all"), curves("late")
    assert sorted(late) == ["seed=2", "seed=3"]
    assert all(late[k] == everything[k] for k in late)
    with pytest.raises(SystemExit, match="Invalid --first-seed"):
        C.main([*base, "--first-seed", "-1", "--out", str(tmp_path / "bad")])


def test_cli_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match="Invalid problem"):
        C.main(["--problems", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="Invalid optimizer"):
        C.main(["--optimizers", "sgd", "--out", str(tmp_path)])


def _full_model_logits(transformers, max_length: int):
    """BertForSequenceClassification's logits (head seeded 0) on the first 4 held-out tweets of the ci split (8/8),
    padded to the longest of them; with the labels and the held-out indices."""
    texts, labels = P._tweets()
    _, test_idx = P._split(labels, 8, 8, 0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(P._minilm_dir(), num_labels=2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(P._minilm_dir())
    with torch.no_grad():
        enc = tok([texts[int(i)] for i in test_idx[:4]], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        return model(**enc).logits, labels, test_idx


@pytest.mark.parametrize("trainable", ["head", "ffn"])
def test_minilm_trainable_part_matches_the_full_model(tmp_path, monkeypatch, trainable):
    """The cached-feature forward of the trainable part equals BertForSequenceClassification's logits."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("ZO_OPTIM_CACHE", str(tmp_path))
    monkeypatch.setitem(P._MINILM_SIZES, "ci", (8, 8))
    inst = P.minilm("ci", seed=0, trainable=trainable)
    n_trainable = sum(p.numel() for p in inst.params)
    assert (1_000_000 < n_trainable < 2_000_000) if trainable == "ffn" else (100_000 < n_trainable < 200_000)
    expected, labels, test_idx = _full_model_logits(transformers, max_length=64)
    with torch.no_grad():
        got = inst.extras["logits"](inst.extras["test_x"][:4])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert sum(labels[int(i)] for i in test_idx) == 4  # class-balanced split


def test_encoder_trainable_part_matches_the_full_model(tmp_path, monkeypatch):
    """The cached-prefix, [CLS]-only forward of layer 5 + head equals BertForSequenceClassification's logits."""
    transformers = pytest.importorskip("transformers")
    from zo_optim.bench import encoder as E

    monkeypatch.setenv("ZO_OPTIM_CACHE", str(tmp_path))
    monkeypatch.setitem(E.SIZES, "ci", (8, 8))
    inst = P.build("encoder", "ci", seed=0)
    assert 1_900_000 < sum(p.numel() for p in inst.params) < 1_950_000  # layer 5 (1.78 M) + pooler/classifier
    blocks = inst.extras["blocks"]
    assert sorted(n for names in blocks.values() for n in names) == sorted(inst.names)  # a partition
    assert [len(blocks[k]) for k in ("attention", "ffn", "head")] == [10, 6, 4]
    # padding=True (to the longest of these 4), not the cache's max_length padding: masking must make it equal
    expected, _, _ = _full_model_logits(transformers, max_length=E.MAX_LEN)
    with torch.no_grad():
        te = inst.extras["data"]["test"]
        got = inst.extras["logits"](te["h"][:4], te["mask"][:4])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert 0.0 <= inst.evaluate() <= 1.0


def test_encoder_ci_run_with_block_probes_counts_forwards(tmp_path, monkeypatch):
    """The CI size of the encoder problem runs in seconds, for MeZO and its block-probe, sparse, low-rank (LOZO,
    SubZero) and anchor-decay variants and HELENE with its bias correction."""
    pytest.importorskip("transformers")
    from zo_optim.bench import encoder as E

    monkeypatch.setenv("ZO_OPTIM_CACHE", str(tmp_path))
    monkeypatch.setitem(E.SIZES, "ci", (32, 32))
    spec = P.PROBLEMS["encoder"]
    assert C.configs("encoder", "mezo+blocks", False, False) == [
        {"lr": recommended_lr("mezo", "convergence/encoder"), "block_probes": True}]
    assert C.configs("encoder", "mezo+sparse", False, False)[0]["sparse_density"] == 0.25
    assert C.configs("encoder", "mezo+lozo", False, False)[0]["lowrank_rank"] == 8
    assert C.configs("encoder", "mezo+subzero", False, False)[0]["lowrank_kind"] == "subzero"
    assert C.configs("encoder", "mezo+anchor", False, False)[0]["anchor_decay"] == 3.0
    assert C.configs("encoder", "zoadam+fwd16+anchor", False, False) == [
        {"lr": recommended_lr("zoadam", "convergence/encoder"), "estimator": "forward", "num_queries": 16,
         "anchor_decay": 4.0}]
    for name in ("mezo", "mezo+blocks", "mezo+sparse", "mezo+lozo", "mezo+subzero", "helene+bc", "mezo+anchor"):
        kwargs = C.configs("encoder", name, False, False)[0]
        r = C.run_one(spec, "ci", name, kwargs, 0, C.zo_optim_factory, budget=40)
        assert r.forwards[-1] == 40 and r.steps == 20 and not r.diverged
    for name in ("mezo+decay/2", "zoadam+fwd8+decay/3"):  # issue 24's winning entries, at the CI size
        kwargs = C.configs("encoder", name, False, False)[0]
        r = C.run_one(spec, "ci", name, kwargs, 0, C.zo_optim_factory, budget=60)
        assert r.forwards[-1] == (30 if name.endswith("/2") else 27) and not r.diverged  # ⌈20 / 9⌉ = 3 steps of 9
    groups = C._param_groups(P.build("encoder", "ci", seed=0))
    assert [len(g["params"]) for g in groups] == [10, 6, 4]
    quad = P.build("quadratic", "ci", seed=0)  # no blocks declared: one block per tensor
    assert [g["params"][0] is p for g, p in zip(C._param_groups(quad), quad.params, strict=True)] == [True] * 4


def test_decay_variants_run_their_budget_and_decay_the_lr_to_zero_over_it():
    """``+decay``: the optimizer gets lr_decay_steps = the run's steps once the first step has counted its forwards;
    ``/2``: half the budget. The lr of each step is read back from the optimizer's own schedule, and equals a run
    that a torch LambdaLR drives over the same steps (so the bench measures the documented schedule)."""
    spec = P.PROBLEMS["quadratic"]
    built = []

    def keep(params, names, optimizer, kwargs, seed):
        assert "lr_decay" not in kwargs and "budget_fraction" not in kwargs  # run options stay in the bench
        built.append(C.zo_optim_factory(params, names, optimizer, kwargs, seed))
        return built[-1]

    half = C.run_one(spec, "ci", "mezo+decay/2", {"lr": 1e-3, **C.VARIANTS["mezo+decay/2"][1]}, 0, keep, budget=60)
    assert half.forwards[-1] == 30 and half.steps == 15  # half of 60 forwards, 2 per step
    assert [g["lr_decay_steps"] for g in built[-1].param_groups] == [15] * len(built[-1].param_groups)
    fwd = C.run_one(spec, "ci", "zoadam+fwd8+decay", {"lr": 1e-3, **C.VARIANTS["zoadam+fwd8+decay"][1]}, 0, keep,
                    budget=60)
    assert fwd.steps == 7 and built[-1].param_groups[0]["lr_decay_steps"] == 7  # ⌈60 / 9⌉: the last step's lr > 0

    def lambda_lr(params, names, optimizer, kwargs, seed):
        opt = C.zo_optim_factory(params, names, optimizer, kwargs, seed)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / 15))

        class Stepped:
            param_groups = opt.param_groups

            def step(self, closure):
                loss = opt.step(closure)
                sched.step()
                return loss

        return Stepped()

    driven = C.run_one(spec, "ci", "mezo", {"lr": 1e-3}, 0, lambda_lr, budget=30)
    assert driven.values == half.values and driven.values[-1] != C.run_one(
        spec, "ci", "mezo", {"lr": 1e-3}, 0, C.zo_optim_factory, budget=30).values[-1]
