"""Benchmarks: the long-format report, the parameter lists, the faithful MeZO loop, and
smoke runs of ``zo-optim bench kernels`` / ``bench step`` in a tiny configuration.

No timing is asserted here (performance lives in the benchmarks themselves); only that
the commands run, write what they promise, and compute finite ratios.
"""

from __future__ import annotations

import math

import pytest
import torch

from backend_checks import backend_runs
from zo_optim.bench import kernels, report, shapes, step
from zo_optim.bench.baselines import MezoLoop

# ----------------------------------------------------------------------------- report


def test_csv_long_format_roundtrip(tmp_path):
    env = report.environment("cpu")
    assert env.device and "torch=" in env.version and "zo_optim=" in env.version and env.timestamp.endswith("Z")
    rows = [report.Row("perturb", "cpu", "time", "ms", "opt-125m:fp32", 1.5),
            report.Row("loss", "MeZO", "loss", "nats", 100, float("nan"))]
    path = report.write_csv(tmp_path / "r.csv", rows, env)
    report.write_csv(path, rows[:1], env, append=True)
    header = path.read_text().splitlines()[0]
    assert header == ",".join(report.COLUMNS)
    back = report.read_csv(path)
    assert [r["name"] for r in back] == ["perturb", "loss", "perturb"]
    assert back[0]["value"] == 1.5 and back[1]["x"] == 100 and math.isnan(back[1]["value"])
    assert back[0]["device"] == env.device and back[0]["version"] == env.version


def test_read_csv_refuses_other_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="long format"):
        report.read_csv(tmp_path / "bad.csv")


def test_format_table_aligns_and_formats():
    text = report.format_table(["op", "ms"], [["perturb", 1.23456], ["step", 1234567.0]], title="T")
    lines = text.splitlines()
    assert lines[0] == "T" and lines[1].startswith("op")
    assert "1.235" in text and "1.235e+06" in text
    assert len({len(line) for line in lines[3:]}) == 1  # numbers right-aligned to one width


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("model", "numel"), [("minilm", 22_713_986), ("opt-125m", 125_239_296),
                                              ("opt-350m", 331_196_416), ("opt-1.3b", 1_315_758_080)])
def test_param_lists_match_the_public_models(model, numel):
    plist = shapes.param_list(model)
    assert plist.numel == numel  # the hub models' parameter counts, tied weights once
    assert len(plist.names) == len(set(plist.names)) == len(plist.shapes)
    assert not any(n.startswith("lm_head") for n in plist.names)  # tied to embed_tokens


def test_opt_350m_has_the_embedding_projections():
    names = shapes.param_list("opt-350m").names
    assert "model.decoder.project_in.weight" in names and "model.decoder.project_out.weight" in names
    assert shapes.param_list("opt-350m").shapes[0] == (50272, 512)


def test_materialize_gives_random_tensors_of_the_shapes():
    plist = shapes.param_list("tiny")
    ts = plist.materialize(torch.bfloat16)
    assert [tuple(t.shape) for t in ts] == list(plist.shapes) and all(t.dtype == torch.bfloat16 for t in ts)
    assert all(t.abs().sum() > 0 for t in ts)
    assert plist.bytes(torch.bfloat16) == 2 * plist.numel


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="Invalid model"):
        shapes.parse_models("opt-125m,gpt-5")


# ----------------------------------------------------------------------------- the MeZO loop


def _tensors(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).mul_(0.05).to(dtype) for s in [(7, 5), (33,), (4, 3, 2)]]


def test_mezo_loop_perturb_is_manual_seed_then_normal_per_tensor():
    params = _tensors()
    start = [p.clone() for p in params]
    loop = MezoLoop(params, zo_eps=1e-3)
    loop.perturb(seed=42, scaling_factor=-2)
    torch.manual_seed(42)  # MeZO re-seeds the global generator every pass, then draws tensor by tensor
    for p, p0 in zip(loop.params, start, strict=True):
        z = torch.normal(mean=0, std=1, size=p0.size(), dtype=p0.dtype)
        assert torch.equal(p, p0 + (-2) * z * 1e-3)


def test_mezo_loop_four_passes_restore_then_update_is_minus_lr_g_z():
    params = _tensors(1)
    start = [p.clone() for p in params]
    loop = MezoLoop(params, lr=1e-2, zo_eps=1e-3)
    loop.perturb(7, 1)
    loop.perturb(7, -2)
    loop.perturb(7, 1)
    for p, p0 in zip(loop.params, start, strict=True):
        # Not bit-exact (each pass rounds), but within a few float32 ulp of |θ| < 0.3.
        torch.testing.assert_close(p, p0, atol=1e-7, rtol=0)
    loop.update(7, projected_grad=0.5)
    for p, p0, z in zip(loop.params, start, loop.directions(7), strict=True):
        torch.testing.assert_close(p, p0 - 1e-2 * 0.5 * z, atol=1e-6, rtol=0)


def test_mezo_loop_step_passes_equal_the_separate_passes():
    a, b = _tensors(2), _tensors(2)
    la, lb = MezoLoop(a, lr=1e-3), MezoLoop(b, lr=1e-3)
    la.step_passes(5, 0.25)
    for s in (1, -2, 1):
        lb.perturb(5, s)
    lb.update(5, 0.25)
    for pa, pb in zip(la.params, lb.params, strict=True):
        assert torch.equal(pa, pb)


def test_mezo_loop_weight_decay_skips_bias_and_layer_norm():
    w = torch.nn.Parameter(torch.full((3, 3), 0.5))
    bias = torch.nn.Parameter(torch.full((3,), 0.5))
    ln = torch.nn.Parameter(torch.full((3,), 0.5))
    frozen = torch.nn.Parameter(torch.full((3,), 0.5), requires_grad=False)
    loop = MezoLoop([("fc.weight", w), ("fc.bias", bias), ("self_attn_layer_norm.weight", ln), ("f", frozen)],
                    lr=0.1, weight_decay=0.5)
    assert len(loop.params) == 3
    loop.update(0, projected_grad=0.0)
    torch.testing.assert_close(w.data, torch.full((3, 3), 0.5 * (1 - 0.1 * 0.5)))
    assert torch.equal(bias.data, torch.full((3,), 0.5)) and torch.equal(ln.data, torch.full((3,), 0.5))


def test_mezo_loop_step_estimates_the_directional_derivative():
    # L(θ) = Σ c·θ is linear, so (L(θ+εz) − L(θ−εz)) / 2ε = Σ c·z up to rounding.
    params = _tensors(3, torch.float64)
    c = [torch.randn_like(p) for p in params]
    loop = MezoLoop(params, lr=0.0, zo_eps=1e-3, seed=11)
    calls = []

    def closure():
        calls.append(1)
        return sum((ci * p).sum() for ci, p in zip(c, loop.params, strict=True))

    start = [p.clone() for p in params]
    loop.step(closure)
    assert len(calls) == 2
    expected = sum((ci * z).sum() for ci, z in zip(c, loop.directions(loop.zo_random_seed), strict=True))
    assert loop.projected_grad == pytest.approx(float(expected), rel=1e-6)
    for p, p0 in zip(loop.params, start, strict=True):
        torch.testing.assert_close(p, p0)  # lr = 0: the 4 passes return to θ


def test_mezo_loop_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="zo_eps"):
        MezoLoop(_tensors(), zo_eps=0.0)
    with pytest.raises(ValueError, match="learning rate"):
        MezoLoop(_tensors(), lr=-1.0)


# ----------------------------------------------------------------------------- kernels


def test_pass_bytes_count_params_and_state():
    n, b = 1000, 2
    assert kernels.pass_bytes("perturb", n, b, "cpu") == 2 * n * b
    assert kernels.pass_bytes("adamw", n, b, "triton") == 2 * n * b + 16 * n
    assert kernels.pass_bytes("hiso", n, b, "triton") == 2 * n * b + 8 * n
    assert kernels.pass_bytes("step", n, b, "cpu") == 3 * 2 * n * b
    assert kernels.pass_bytes("step", n, b, "mezo-loop") == 4 * 2 * n * b


def _result(op, provider, ms, model="minilm", dtype="fp32", numel=1_000_000, itemsize=4):
    return kernels.Result(model, dtype, op, provider, ms, ms, kernels.pass_bytes(op, numel, itemsize, provider)
                          if op != kernels.COPY else 2 * numel * itemsize)


def test_targets_are_judged_on_what_was_measured():
    cpu = torch.device("cpu")
    res = [_result(kernels.COPY, "torch", 1.0), _result("step", "mezo-loop", 3.0), _result("step", "cpu", 1.5)]
    checks, missing = kernels.check_targets(res, cpu)
    assert [c.met for c in checks] == [True] and checks[0].value == pytest.approx(2.0)
    assert len(missing) == 2  # the GPU targets were not measured on CPU
    res[-1] = _result("step", "cpu", 2.5)
    assert [c.met for c in kernels.check_targets(res, cpu)[0]] == [False]

    gpu = torch.device("cuda")  # only the label: nothing runs
    res = [_result(kernels.COPY, "torch", 1.0, "opt-1.3b", "bf16", itemsize=2),
           _result("perturb", "triton", 1.05, "opt-1.3b", "bf16", itemsize=2),
           _result("sgd", "triton", 1.3, "opt-1.3b", "bf16", itemsize=2)]
    checks, missing = kernels.check_targets(res, gpu)
    assert [(c.target.split()[1], c.met) for c in checks] == [("perturb", True), ("fused", False)]
    assert checks[1].value == pytest.approx(1.3)


def test_bench_kernels_smoke(tmp_path, capsys):
    out = tmp_path / "k"
    rc = kernels.main(["--models", "tiny", "--dtypes", "fp32", "--ops", "all", "--repeat", "1", "--warmup", "0",
                       "--threads", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Issue 2 targets" in text and "skip triton" in text  # triton on CPU only when asked for by name
    rows = report.read_csv(out / "kernels.csv")
    assert (out / "kernels.csv").read_text().splitlines()[0] == ",".join(report.COLUMNS)
    providers = {r["provider"] for r in rows if not r["name"].startswith("target:")}
    fast = {"cpu"} if backend_runs("cpu") else set()  # absent numba may reduce the check, a broken backend fails
    expected = {"torch", "mezo-loop", "reference", "chunked"} | fast
    assert providers == expected
    for provider in expected - {"torch"}:
        ops_run = {r["name"] for r in rows if r["provider"] == provider and r["metric"] == "time"}
        assert ops_run == ({"perturb", "sgd", "step"} if provider == "mezo-loop" else set(kernels.ALL_OPS))
    ratios = [r for r in rows if r["metric"] in ("fraction_of_copy", "speedup_vs_mezo_loop", "bandwidth")]
    assert ratios and all(math.isfinite(r["value"]) and r["value"] > 0 for r in ratios)
    assert {r["name"] for r in rows if r["metric"] == "speedup_vs_mezo_loop"} == {"perturb", "sgd", "step"}
    assert (out / "kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "kernels_env.json").exists()


def test_bench_kernels_refuses_unknown_provider(tmp_path):
    with pytest.raises(SystemExit, match="invalid provider"):
        kernels.main(["--models", "tiny", "--providers", "cuda-magic", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- step


def test_bench_step_smoke(tmp_path, capsys):
    import zo_optim

    out = tmp_path / "s"
    rc = step.main(["--model", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0",
                    "--threads", "1", "--out", str(out)])
    assert rc == 0
    assert "Issue 3 target" in capsys.readouterr().out
    rows = report.read_csv(out / "step.csv")
    by = {(r["provider"], r["metric"]): r["value"] for r in rows}
    providers = {"mezo-loop"} | ({"zo-optim"} if hasattr(zo_optim, "MeZO") else set())
    assert {p for p, _ in by if p != "inference"} == providers
    assert all(by[(p, "forwards_per_step")] == 2 for p in providers)  # central estimator: 2 forwards
    for p in providers:
        for metric in ("time", "forward_time", "overhead", "overhead_fraction", "peak_memory_vs_inference"):
            assert math.isfinite(by[(p, metric)])
        assert by[(p, "time")] > 0 and by[(p, "peak_memory_vs_inference")] > 0
        assert by[(p, "overhead")] == pytest.approx(by[(p, "time")] - by[(p, "forward_time")])
    assert by[("inference", "peak_memory")] > 0
    assert (out / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
