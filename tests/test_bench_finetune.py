"""``zo-optim bench finetune`` at its CI size (issue 11 item 7): real Trainer runs in fresh processes."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from zo_optim import cli
from zo_optim.bench import finetune, finetune_clm, report
from zo_optim.optim.registry import recommended_lr


@pytest.mark.slow
def test_bench_finetune_ci_size(tmp_path, capsys):
    assert cli.main(["bench", "finetune", "--modes", "lora", "--optimizers", "mezo", "--steps", "2",
                     "--train-examples", "16", "--eval-examples", "16", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(tmp_path / "finetune.csv")
    names = {r["name"] for r in rows}
    assert names == {f"lora/mezo/lr={recommended_lr('mezo', 'finetune/lora'):g}", "lora/adamw/lr=0.001"}
    metrics = {(r["name"], r["metric"]): r["value"] for r in rows}
    for name in names:
        assert 0.0 <= metrics[(name, "final_accuracy")] <= 1.0
        # every worker's peak is at least its own inference peak (high-water marks of one fresh process)
        assert metrics[(name, "peak_memory")] >= metrics[(name, "inference_peak_memory")] > 50
    assert (tmp_path / "env.json").is_file() and (tmp_path / "finetune_forwards.png").is_file()
    assert "peak/AdamW" in capsys.readouterr().out
    # --replot redraws the PNGs from the CSV alone; its curves are the final accuracies' seeds' means
    curves = finetune.curves_from_csv(tmp_path / "finetune.csv")
    assert set(curves) == names
    assert all(v[2][-1] == pytest.approx(metrics[(k, "final_accuracy")]) for k, v in curves.items())
    (tmp_path / "finetune_forwards.png").unlink()
    assert cli.main(["bench", "finetune", "--replot", str(tmp_path)]) == 0
    assert (tmp_path / "finetune_forwards.png").is_file()


def test_bench_trainer_overhead_ci_size(capsys):
    """Both paths run the same steps; the ratio line is printed (its value is a measurement, not asserted)."""
    assert cli.main(["bench", "trainer-overhead", "--steps", "3", "--warmup", "1", "--batch-size", "2",
                     "--max-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "raw opt.step(closure)" in out and "ZOTrainer" in out
    assert __import__("re").search(r"ZOTrainer / raw loop: \d+\.\d{3}x \(target <= 1\.1x\)", out)


def test_bench_finetune_configs_and_lr_override():
    assert finetune._configs(["full"], ["mezo", "helene"], False) == [
        ("full", "mezo", 3e-4), ("full", "helene", 1e-5), ("full", "adamw", 5e-5)]
    got = finetune._configs(["lora"], ["hiso"], True, [1e-4])
    assert [c[2] for c in got[:-1]] == pytest.approx([1e-4, 3e-5, 3e-4]) and got[-1] == ("lora", "adamw", 1e-3)
    with pytest.raises(ValueError, match=r"Invalid --zo-lr: -0\.1"):
        finetune.main(["--zo-lr", "-0.1"])


@pytest.mark.slow
def test_bench_finetune_clm_ci_size(tmp_path, capsys):
    """MiniLM as a causal LM (BertLMHeadModel, decoder tied to the pretrained embeddings) through ZOTrainer and
    Trainer: the held-out loss is recorded before training and at each evaluation, and two AdamW steps lower it
    (labels reach the LM loss: a loss that ignored them would not move)."""
    assert cli.main(["bench", "finetune-clm", "--modes", "lora", "--zo-lr", "1e-2", "--steps", "2",
                     "--eval-every", "1", "--budgets", "1", "2", "--batch-size", "4", "--train-examples", "16",
                     "--eval-examples", "8", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(tmp_path / "finetune_clm.csv")
    loss = {(r["name"], int(r["x"])): r["value"] for r in rows if r["metric"] == "held_out_loss"}
    assert {k[0] for k in loss} == {"lora/mezo/lr=0.01", "lora/adamw/lr=0.001"}
    assert all(k in loss for k in [("lora/mezo/lr=0.01", s) for s in (0, 1, 2)])
    # before training both runs are the same model (same seed: the new head transform's init) on the same data
    assert loss[("lora/mezo/lr=0.01", 0)] == loss[("lora/adamw/lr=0.001", 0)]
    assert loss[("lora/adamw/lr=0.001", 2)] < loss[("lora/adamw/lr=0.001", 0)]
    assert "loss at 2" in capsys.readouterr().out


def test_bench_finetune_clm_configs_and_arguments():
    base = recommended_lr("mezo", "finetune/full")
    got = finetune_clm._configs(["full"], ["mezo"], None)
    assert [c[2] for c in got[:-1]] == pytest.approx([base * m for m in finetune_clm.LR_GRID])
    assert got[-1] == ("full", "adamw", 5e-5)
    with pytest.raises(ValueError, match=r"Invalid --budgets: \[3\]"):
        finetune_clm.main(["--steps", "4", "--eval-every", "2", "--budgets", "3"])
    with pytest.raises(ValueError, match=r"Invalid --zo-lr: 0\.0"):
        finetune_clm.main(["--zo-lr", "0"])
