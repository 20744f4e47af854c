"""One home for benchmark code: ``zo_optim.bench`` (the ``zo-optim bench`` CLI). ``benchmarks/``
holds recorded results, thin runners and the GPU check script only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zo_optim import cli

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_runners_are_thin() -> None:
    runners = sorted(BENCH.glob("*.py"))
    assert runners, "expected the thin runners"
    for path in runners:
        tree = ast.parse(path.read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defs, f"{path.name} defines {[d.name for d in defs]}: benchmark code belongs in zo_optim.bench"
        imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert any(m and m.startswith("zo_optim.bench.") for m in imports), path.name


def test_every_bench_module_with_main_is_a_command() -> None:
    commands = {module for module, _ in cli.COMMANDS.values()}
    for path in (ROOT / "src" / "zo_optim" / "bench").glob("*.py"):
        if "\ndef main(" in path.read_text():
            assert f"zo_optim.bench.{path.stem}" in commands, path.name


def test_bench_docs_list_every_bench_command() -> None:
    """benchmarks/README.md, the bench package's docstring and docs/benchmarks.md name every ``zo-optim bench``
    command (they listed 3-4 of 9 once, and missed the two federated ones added later)."""
    names = [name.split(" ", 1)[1] for name in cli.COMMANDS if name.startswith("bench ")]
    pages = (BENCH / "README.md", ROOT / "src" / "zo_optim" / "bench" / "__init__.py", ROOT / "docs" / "benchmarks.md")
    for path in pages:
        text = path.read_text()
        missing = [n for n in names if f"`{n}`" not in text and f"bench {n}" not in text]
        assert not missing, (path.name, missing)


def test_readme_describes_the_layout() -> None:
    text = (BENCH / "README.md").read_text()
    for needed in ("zo_optim.bench", "results/", "gpu_check.sh", "thin runner"):
        assert needed in text, needed


@pytest.mark.slow
def test_bench_sass_cost_compiles_offline() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1"}  # the command clears it
    res = subprocess.run([sys.executable, "-m", "zo_optim.cli", "bench", "sass", "--cost"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SASS instructions per thread per counter" in res.stdout


def test_usage_lists_every_command_in_one_aligned_column(capsys):
    from zo_optim import cli

    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    rows = text.split("commands:\n", 1)[1].splitlines()
    assert len(rows) == len(cli.COMMANDS)
    columns = set()
    for row, (name, (_, help_)) in zip(rows, cli.COMMANDS.items(), strict=True):
        assert row.startswith(f"  {name} ") and row.endswith(help_)
        columns.add(row.index(help_))
    assert len(columns) == 1  # every description starts in the same column
