"""Examples are code that runs: every ```` ```python ```` block of README.md and docs/*.md.

Convention (also in docs/index.md's source and CHANGELOG):

* ``<!-- illustrative -->`` on the line before a block: it shows a shape of code and is not run
  (it needs a real model, a cluster, a download...). Use it sparingly.
* ``<!-- snippet-setup: CODE -->`` on the line before a block: ``CODE`` runs first, unseen by
  readers (e.g. a scheduler the text assumes exists).
* Every other block runs, in file order, in one namespace per file, seeded with ``CONTEXT``
  below: ``model`` (a tiny module whose ``model(**batch)`` returns an object with ``.loss``),
  ``batch``, ``micro_batches`` and ``make_closure(micro_batch)``, the names that the docs'
  examples assume a reader already has (and `torch`, `zo_optim` imported).

It also checks that ``.ci/run`` runs exactly the README's test command.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import zo_optim

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)
ILLUSTRATIVE = "<!-- illustrative -->"
SETUP = re.compile(r"<!-- snippet-setup: (.*?) -->")


class TinyLM(torch.nn.Module):
    """Stands in for a Hugging Face model: ``model(**batch).loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> types.SimpleNamespace:
        logits = self.head(self.emb(input_ids))
        return types.SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def context() -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyLM()

    def make_batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 32, (2, 6))
        return {"input_ids": ids, "labels": ids}

    def make_closure(micro_batch: dict[str, torch.Tensor]):
        return lambda: model(**micro_batch).loss

    return {"__name__": "__snippet__", "torch": torch, "zo_optim": zo_optim, "model": model, "batch": make_batch(),
            "micro_batches": [make_batch() for _ in range(2)], "make_closure": make_closure}


def blocks(path: Path) -> list[tuple[int, str, str | None, bool]]:
    """(line, code, setup, illustrative) of each python block of ``path``."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        setup = SETUP.fullmatch(before)
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), setup.group(1) if setup else None,
                    before == ILLUSTRATIVE))
    return out


def test_every_file_parses() -> None:
    assert FILES[0].name == "README.md" and len(FILES) > 1
    assert sum(len(blocks(f)) for f in FILES) >= 3


@pytest.mark.parametrize("path", [f for f in FILES if blocks(f)], ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(path: Path) -> None:
    todo = blocks(path)
    ns = context()
    for line, code, setup, illustrative in todo:
        if illustrative:
            compile(code, f"{path.name}:{line}", "exec")  # still valid Python
            continue
        try:
            if setup:
                exec(compile(setup, f"{path.name}:{line - 1} (snippet-setup)", "exec"), ns)
            exec(compile(code, f"{path.name}:{line}", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"{path.relative_to(ROOT)}:{line}: the python block does not run "
                                 f"(mark it {ILLUSTRATIVE} if it is not meant to): {exc!r}") from exc


def test_ci_runs_the_readme_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [m.group(1).strip() for m in re.finditer(r"^```bash\n(.*?)^```", readme, re.M | re.S)]
    test_command = next(c for c in commands if "[test]" in c)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == test_command
