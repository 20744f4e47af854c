"""``zo-optim bench memory`` at its CI size: real Trainers in real fresh processes, the output checked.

No memory values are asserted against a bound (they are measurements); what is checked is that the
files, columns and phases are there and that the derived numbers (ratios, met flags, net peaks) are
computed from the raw ones the same run wrote.
"""

from __future__ import annotations

import json
import math

import pytest

from backend_checks import backend_runs

pytest.importorskip("transformers")

from zo_optim import cli
from zo_optim.bench import memory, report


@pytest.mark.slow
def test_bench_memory_tiny_end_to_end(tmp_path, capsys):
    assert cli.main(["bench", "memory", "--models", "tiny", "--steps", "2", "--batch-size", "2", "--max-len", "16",
                     "--eval-batch-size", "2", "--eval-examples", "4", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(tmp_path / "memory.csv")
    assert {r["device"] for r in rows} and all(r["x"] == "tiny:2x16" for r in rows)
    by = {(r["provider"], r["metric"]): r["value"] for r in rows if r["name"] == "tiny"}
    n_params = sum(p.numel() for p in memory.build_model("tiny")[0].parameters())
    # only when the zo run uses numba; an absent numba may drop the mark, a broken cpu backend fails here
    floor = ["numba_floor"] if backend_runs("cpu") else []
    expected_phases = {"inference": ["imports", "model", "forward"],
                       "zo": ["imports", "model", "trainer", "backend_import", *floor, "kernels", "train_begin",
                              "step1", "train", "eval"],
                       "adamw": ["imports", "model", "trainer", "train_begin", "step1", "train", "eval"]}
    for method, phases in expected_phases.items():
        assert by[(method, "parameters")] == n_params
        marks = [r for r in rows if r["provider"] == method and r["metric"].startswith("hwm_after:")]
        assert [r["metric"].removeprefix("hwm_after:") for r in marks] == phases
        values = [r["value"] for r in marks]
        assert values == sorted(values), (method, values)  # a high-water mark never goes down
        assert by[(method, "runtime_rss")] == values[0]
        assert by[(method, "peak_rss")] >= values[-1]
        assert by[(method, "peak_rss_net_of_runtime")] == pytest.approx(by[(method, "peak_rss")] - values[0])
        assert by[(method, "peak_memory")] == by[(method, "peak_rss")]  # CPU: the peak is VmHWM
    for ratio, num, den, bound in memory.TARGETS:
        raw = by[(ratio, "peak_ratio")]
        assert raw == pytest.approx(by[(num, "peak_memory")] / by[(den, "peak_memory")])
        net = by[(ratio, "peak_ratio_net_of_runtime")]
        assert math.isnan(net) or net == pytest.approx(
            by[(num, "peak_rss_net_of_runtime")] / by[(den, "peak_rss_net_of_runtime")])
        met = [r["value"] for r in rows if r["name"] == f"target:{ratio} <= {bound:.3g}"]
        assert met == [float(raw <= bound)]
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["settings"]["models"] == ["tiny"] and env["details"]["device_type"] == "cpu"
    out = capsys.readouterr().out
    assert "issue 11 targets" in out and "zo/inference" in out and "zo/adamw" in out


def test_bench_memory_refuses_bad_arguments():
    with pytest.raises(ValueError, match="Invalid model: 'gpt-5'"):
        memory.build_model("gpt-5")
    with pytest.raises(ValueError, match="Invalid --steps: 0"):
        memory.main(["--steps", "0"])
    with pytest.raises(ValueError, match="Invalid --eval-batch-size: -1"):
        memory.main(["--eval-batch-size", "-1"])


def test_make_rows_labels_per_kind():
    causal = memory.make_rows("causal-lm", 100, 3, 5)
    cls = memory.make_rows("seq-cls", 100, 3, 5)
    assert [r["input_ids"] for r in causal] == [r["input_ids"] for r in cls]  # same seed, same ids
    assert all(r["labels"] == r["input_ids"] and len(r["input_ids"]) == 5 for r in causal)
    assert all(r["labels"] in (0, 1) and 5 <= min(r["input_ids"]) and max(r["input_ids"]) < 100 for r in cls)


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_memory_fsdp_tiny_end_to_end(tmp_path, capsys):
    """``--fsdp 2``: 2 gloo ranks per sharded method, the derived numbers computed from the raw ones."""
    from zo_optim.bench import memory_fsdp

    assert cli.main(["bench", "memory", "--models", "tiny", "--fsdp", "2", "--steps", "1", "--batch-size", "2",
                     "--max-len", "16", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(tmp_path / "memory_fsdp.csv")
    by = {(r["provider"], r["metric"]): r["value"] for r in rows if r["name"] == "tiny"}
    for method in memory_fsdp.METHODS:
        assert by[(method, "peak_rss_net_of_runtime")] == pytest.approx(
            by[(method, "peak_rss_per_rank_max")] - by[(method, "runtime_rss")])
    bound = by[("inference", "peak_rss_net_of_runtime")] / 2 + by[("zo-fsdp", "largest_unit_fp32")]
    met = [r["value"] for r in rows if r["name"].startswith("target:zo-fsdp")]
    assert met == [float(by[("zo-fsdp", "peak_rss_net_of_runtime")] <= bound)]
    # the tiny OPT's largest unit is its root (embeddings): vocab x hidden fp32 at least
    model = memory.build_model("tiny")[0]
    assert by[("zo-fsdp", "largest_unit_fp32")] * 2**20 >= 4 * model.model.decoder.embed_tokens.weight.numel()
    assert "issue 21 target" in capsys.readouterr().out


def test_bench_memory_fsdp_refuses_bad_arguments():
    with pytest.raises(ValueError, match="Invalid --fsdp: 1"):
        memory.main(["--fsdp", "1"])
    with pytest.raises(ValueError, match="Invalid --fsdp: 2"):
        memory.main(["--fsdp", "2", "--models", "minilm"])
