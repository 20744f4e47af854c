"""The docs site: ``mkdocs build --strict`` (broken links, missing references and griffe warnings
fail it), the API pages with their rendered-math markup, and nothing loaded from another host."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_mkdocs"))
hooks = importlib.import_module("hooks")
rst = importlib.import_module("rst_docstrings")
sys.path.pop(0)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason='needs the "docs" extra')


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    assert "WARNING" not in res.stderr, res.stderr[-6000:]
    return out


def test_pages_built(site: Path) -> None:
    pages = ("index", "optimizers", "rng", "backends", "benchmarks", "convergence", "demo", "extending", "changelog")
    for page in pages:
        path = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert path.is_file(), page
    assert "Keep a Changelog" in (site / "changelog" / "index.html").read_text()  # CHANGELOG.md, included


def test_api_reference(site: Path) -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    modules = hooks.api_modules(nav)
    assert {"zo_optim.optim", "zo_optim.ops", "zo_optim.rng"} <= set(modules)
    for module in modules:
        assert (site / "api" / module / "index.html").is_file(), module
    page = (site / "api" / "zo_optim.optim" / "index.html").read_text()
    for cls in ("MeZO", "ZOAdam", "HiZOO", "HELENE", "HiSo", "ZOOptimizer", "NonFiniteLossError"):
        assert f'id="zo_optim.optim.{cls}"' in page, cls
    # each optimizer's algorithm box became display math for MathJax, no reST left over
    assert page.count('<div class="arithmatex">') >= 5
    assert r"\begin{aligned}" in page and ".. math::" not in page and ":meth:`" not in page
    text = re.sub(r"<[^>]+>", "", page)
    assert "``" not in text.replace(r"\text{ (``", "")  # double backticks only inside LaTeX \text{}


def test_offline_math(site: Path) -> None:
    mathjax = site / hooks.MATHJAX_DEST / hooks.MATHJAX_FILE
    assert mathjax.is_file() and mathjax.stat().st_size > 1_000_000
    for html in site.rglob("*.html"):
        s = html.read_text()
        remote = re.findall(r'<(?:script|link|img)[^>]*(?:src|href)="(?:https?:)?//[^"]*"', s)
        assert not remote, (html, remote)
        assert "fonts.googleapis" not in s, html


def test_rst_to_markdown() -> None:
    doc = "\n".join([
        "Title with ``code`` and :meth:`~zo_optim.MeZO.step`.",
        "",
        ".. math::",
        r"    a = b \\",
        r"    c",
        "",
        "=====  =====",
        "a      b",
        "=====  =====",
        "1      2",
        "=====  =====",
        "",
        "Args (common to all):",
        "    x: the x.",
        "",
        "Example::",
    ])
    md = rst.rst_to_markdown(doc).splitlines()
    assert md[0] == "Title with `code` and `zo_optim.MeZO.step`."
    assert md[2:6] == ["$$", r"a = b \\", "c", "$$"]
    assert "| a | b |" in md and "| 1 | 2 |" in md
    i = md.index("Common to all:")
    assert md[i + 2] == "Args:"
    assert md[-1] == "Example:"
