"""``zo-optim demo`` end to end on a tiny budget (the full demo is not run in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
from zo_optim import cli
from zo_optim.apps import assets, common, demo
from zo_optim.optim.registry import OPTIMIZERS, recommended_lr

# --no-memory-probe: the one-step probes start four interpreters each run; test_memory_probe_line runs them once.
TINY = ["--steps", "4", "--batch-size", "4", "--train-examples", "8", "--eval-examples", "8", "--max-len", "24",
        "--no-progress", "--no-memory-probe"]


@pytest.fixture(autouse=True)
def _keep_process_settings(monkeypatch):
    """The demo switches HF offline and pins numba to one thread for the whole process; not for other tests."""
    for key in assets.offline_env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(demo, "serial_numba", lambda: None)


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "out"
    assert demo.main([*TINY, "--out", str(out), *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    png = out / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "losses.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == 1 + summary["steps"]
    return summary


def test_smoke_head(tmp_path, capsys):
    summary = _run(tmp_path, "--optimizer", "mezo", "--seed", "3")
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["steps"] == 4 and summary["steps_per_s"] > 0 and summary["peak_rss_mb"] > 0
    assert summary["trainable_params"] == 384 * 2 + 2 and summary["optimizer"] == "MeZO"
    assert summary["eval_examples"] == 8 and summary["train_examples"] == 8
    assert summary["lr"] == recommended_lr("mezo", "demo/head")
    text = capsys.readouterr().out
    assert "held-out accuracy before" in text and "steps/s" in text and str(tmp_path / "out") in text
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the demo switched the HF libraries offline


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("2", "2")])
def test_serial_numba_sets_the_variable_before_numba_loads(preset, expected):
    code = "import os, sys; from zo_optim.apps import common; common.serial_numba(); "
    code += "assert 'numba' not in sys.modules; print(os.environ['NUMBA_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    if preset is not None:
        env["NUMBA_NUM_THREADS"] = preset
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_runs(tmp_path, name):
    summary = _run(tmp_path, "--optimizer", name, "--steps", "2")
    assert summary["optimizer"] == OPTIMIZERS[name].__name__


@pytest.mark.parametrize(("mode", "k", "n_params"), [("last-k", 1, 1_774_464 + 770), ("all", 1, 22_565_376 + 770)])
def test_smoke_other_train_modes(tmp_path, mode, k, n_params):
    summary = _run(tmp_path, "--train", mode, "--k", str(k), "--steps", "2", "--lr", "1e-6")
    assert summary["trainable_params"] == n_params
    assert summary["train"] == mode


def test_last_k_takes_the_registrys_settings_and_the_schedule_flag(tmp_path):
    """--train last-k: ZOAdam gets the registry's q = 8 forward differences (9 forwards a step) and the lr decayed to
    0 over the run; --lr keeps those options; --lr-schedule constant turns the decay off."""
    summary = _run(tmp_path, "--train", "last-k", "--optimizer", "zoadam", "--steps", "2")
    assert summary["options"] == {"estimator": "forward", "num_queries": 8}
    assert summary["lr_schedule"] == "linear decay" and summary["lr"] == recommended_lr("zoadam", "demo/last-k")
    assert summary["forwards"] == 2 * 9
    summary = _run(tmp_path, "--train", "last-k", "--optimizer", "zoadam", "--steps", "2", "--lr", "1e-4",
                   "--lr-schedule", "constant")
    assert summary["lr"] == 1e-4 and summary["lr_schedule"] == "constant" and summary["options"]["num_queries"] == 8
    summary = _run(tmp_path, "--steps", "2", "--lr-schedule", "linear")  # head: constant unless asked
    assert summary["lr_schedule"] == "linear decay" and summary["options"] == {}


def _tiny_last_layer():
    model = assets.load_minilm_classifier(seed=0)
    tok = assets.load_minilm_tokenizer()
    start = common.select_trainable(model, "last-k", 1)
    texts, labels = ["great crew, thanks!", "delayed 3 hours", "meh", "love it"], [1, 0, 0, 1]
    return model, common.encode_cached(model, tok, texts, labels, start, 16, torch.device("cpu"), "", False), start


@pytest.mark.parametrize(("kwargs", "per_step"), [({}, 2), ({"estimator": "forward", "num_queries": 8}, 9)])
def test_default_steps_spend_the_forward_budget_and_the_decay_ends_with_the_run(kwargs, per_step):
    """Without --steps a run spends the forward budget (its forwards per step counted on the first step, whatever the
    optimizer), and with the decay T is set after that first step: the same weights, bit for bit, as a run told its
    steps up front with lr_decay_steps (equal to torch's LambdaLR: tests/test_lr_decay.py)."""
    import zo_optim

    steps = -(-37 // per_step)
    runs = []
    for up_front in (False, True):
        model, cached, start = _tiny_last_layer()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = zo_optim.ZOAdam(params, lr=1e-3, seed=0, backend="reference", lr_decay_steps=steps if up_front else 0,
                              **kwargs)
        if up_front:
            demo.train_loop(model, opt, cached, start, steps, 2, 0, torch.device("cpu"), progress=False)
        else:
            losses, forwards = demo.train_loop(model, opt, cached, start, None, 2, 0, torch.device("cpu"),
                                               progress=False, forwards=37, decay=True)
            assert len(losses) == steps and forwards == per_step * steps
            assert all(g["lr_decay_steps"] == steps for g in opt.param_groups)
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    fresh = [p for p in _tiny_last_layer()[0].parameters() if p.requires_grad]
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], fresh, strict=True))  # it trained


def test_smoke_lora_through_zotrainer(tmp_path, capsys):
    pytest.importorskip("peft")
    summary = _run(tmp_path, "--train", "lora", "--steps", "2")
    # rank-8 LoRA on query and value of 6 layers (6 * 2 * 2 * 384 * 8) + the 2-class head (384 * 2 + 2)
    assert summary["trainable_params"] == 6 * 2 * 2 * 384 * 8 + 770
    assert summary["train"] == "lora" and summary["lr"] == recommended_lr("mezo", "demo/lora")
    assert summary["eval_examples"] == 8 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert "MeZO (lora, ZOTrainer)" not in capsys.readouterr().out  # --no-progress: no bar


def test_memory_probe_line(tmp_path, capsys):
    """The line a newcomer reads compares one step that trains the WHOLE model (what ZO is for), labelled as
    such with its parameter count, and gives the run's own (head) figures beside it."""
    out = tmp_path / "out"
    argv = [a for a in TINY if a != "--no-memory-probe"]
    assert demo.main([*argv, "--steps", "1", "--out", str(out)]) == 0
    peaks = json.loads((out / "summary.json").read_text())["one_step_peak_mb"]
    assert set(peaks) == {"whole_model", "this_run"}
    for pair in peaks.values():
        assert set(pair) == {"zo", "backprop"} and all(v["peak_rss_mb"] > 0 for v in pair.values())
    n_all = sum(p.numel() for p in assets.load_minilm_classifier(num_labels=2).parameters())
    assert peaks["whole_model"]["zo"]["trainable_params"] == n_all and n_all > 20e6  # MiniLM-L6: 22.7M
    assert peaks["this_run"]["zo"]["trainable_params"] == 384 * 2 + 2
    text = capsys.readouterr().out
    whole = f"one step training the whole model ({n_all / 1e6:.1f}M parameters, batch 4, fresh process each, "
    assert whole + "process RSS high-water mark): MeZO" in text
    assert "this run's head (770 parameters), the same probe: MeZO" in text
    assert text.count("vs backprop + AdamW") == 2


def test_probe_reports_its_own_peak_not_its_parents():
    """Linux keeps ru_maxrss across fork+exec; the probe must not inherit a bigger parent's peak."""
    ballast = b"\x01" * (600 * 2**20)  # written pages are resident (calloc'd zeros would not be)
    parent = common.peak_rss_mb()
    code = "from zo_optim.apps.common import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 timeout=120).stdout)
    del ballast
    assert child < parent - 300, (child, parent)


def test_training_changes_only_trainable_params_and_cache_is_exact():
    """The cached frozen prefix gives the same logits as the full model, before and after a step."""
    model = assets.load_minilm_classifier(seed=0)
    tok = assets.load_minilm_tokenizer()
    texts, labels = ["great crew, thanks!", "delayed 3 hours", "meh", "love it"], [1, 0, 0, 1]
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("encoder.encoder.layer.5")
                     and not n.startswith("head")}
    start = common.select_trainable(model, "last-k", 1)
    assert start == 5
    cached = common.encode_cached(model, tok, texts, labels, start, 32, torch.device("cpu"), "", False)
    import zo_optim

    opt = zo_optim.MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-3, seed=0, backend="reference")
    demo.train_loop(model, opt, cached, start, 2, 2, 0, torch.device("cpu"), progress=False)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    enc = assets.encode(tok, texts, 32)
    x, mask, _ = cached.batch(torch.arange(4), torch.device("cpu"))
    with torch.no_grad():
        # the cached prefix is the same ops on the same padded batch in the same process as the full forward
        # (deterministic CPU kernels): equal bit for bit, so a stale or perturbed cache cannot hide in a tolerance
        assert torch.equal(demo._logits(model, x, mask, start), model(**enc))


def test_cli_dispatches_demo(tmp_path):
    assert cli.main(["demo", *TINY, "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "summary.json").is_file()


@pytest.mark.parametrize(("argv", "match"), [
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["--steps", "0"], "--steps: must be a positive integer, got 0"),
    (["--steps", "-3"], "--steps: must be a positive integer, got -3"),
    (["--lr", "-1"], "--lr: must be a positive number"),
    (["--train", "last-k", "--k", "7"], "--k: invalid value 7 .*6 layers"),
    (["--train", "middle"], "invalid choice: 'middle'"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


def test_select_trainable_checks_k_against_the_model():
    model = assets.load_minilm_classifier()
    with pytest.raises(ValueError, match=r"Invalid k: 9 \(the encoder has 6 layers"):
        common.select_trainable(model, "last-k", 9)
    with pytest.raises(ValueError, match="Invalid train mode"):
        common.select_trainable(model, "some", 1)


def test_bad_device_is_an_error_not_a_traceback(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert demo.main([*TINY, "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_backend_that_cannot_run_is_an_error_before_any_work(tmp_path, capsys, monkeypatch):
    # e.g. --backend triton on a CPU-only machine without TRITON_INTERPRET: refused up front, exit 2
    def refuse(name, device, dtypes=()):
        raise RuntimeError("backend 'triton' runs CPU tensors only in Triton's interpreter")

    monkeypatch.setattr(demo.ops, "resolve_backend", refuse)
    monkeypatch.setattr(demo.assets, "load_minilm_classifier", lambda *a, **k: pytest.fail("model loaded"))
    assert demo.main([*TINY, "--backend", "triton", "--out", str(tmp_path)]) == 2
    assert "--backend triton: backend 'triton' runs CPU tensors only" in capsys.readouterr().err


def test_optimizer_not_in_the_registry():
    from zo_optim.optim.registry import optimizer_class

    with pytest.raises(ValueError, match=r"Invalid optimizer: 'sgd' \(choose one of helene, hiso, hizoo, mezo, zoadam"):
        optimizer_class("sgd")


def test_memory_probe_uses_the_runs_backend(tmp_path, monkeypatch):
    """The printed one-step peak is the backend's own: the zo probe runs with --backend (numba's runtime is
    part of what the cpu backend costs; chunked has none)."""
    from zo_optim.apps import step_memory

    calls = []
    monkeypatch.setattr(step_memory, "measure_in_fresh_process",
                        lambda method, train, **kw: calls.append((method, train, kw)) or {"peak_rss_mb": 1.0})
    argv = [a for a in TINY if a != "--no-memory-probe"]
    assert demo.main([*argv, "--steps", "1", "--backend", "chunked", "--out", str(tmp_path)]) == 0
    # the whole-model pair, then the run's own (head) pair
    assert [(m, t, kw.get("backend")) for m, t, kw in calls] == [
        ("zo", "all", "chunked"), ("backprop", "all", None), ("zo", "head", "chunked"), ("backprop", "head", None)]
    # and the probe really runs on it: no numba in a chunked zo step's process
    code = ("import sys; from zo_optim.apps import step_memory; "
            "step_memory.main(['--method', 'zo', '--batch-size', '2', '--max-len', '8', '--backend', 'chunked']); "
            "print('numba' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert res.stdout.strip().splitlines()[-1] == "False", res.stdout
