"""The package's layering, read from the source with ``ast`` (nothing is imported).

* The library rooms (``zo_optim.rng``, ``.ops``, ``.optim``, ``.federated``, ``.integrations``) import
  only the library and the package root: never an application (``zo_optim.apps``), a bench
  (``zo_optim.bench``) or any other module beside them at the root (the CLI, an app not yet moved).
* No import cycle among the package's modules.
* No module over 500 lines.

Every ``import`` statement counts: top-level, inside functions, under ``if TYPE_CHECKING:``;
relative imports are resolved. ``from pkg import name`` points at ``pkg.name`` where that is a
module, else at ``pkg``. Imports by string (``importlib.import_module`` of a table entry, as the
CLI and the backend table do) are not edges: they run only when asked for and cannot form a cycle
at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "zo_optim"
LIBRARY = ("rng", "ops", "optim", "federated", "integrations")
MAX_LINES = 500


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``src``: dotted name -> file."""
    return {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name`` (at ``path``) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    root = name.split(".")[0]
    found: set[str] = set()

    def target(dotted: str) -> str | None:
        # the longest prefix that is a module of the package (``import a.b.c`` of a package a.b)
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == root or alias.name.startswith(root + "."):
                    found.add(target(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # a package's own name is its anchor for level 1; a plain module's anchor is its parent
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != root and not base.startswith(root + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else target(base))
    found.discard(None)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module, and self-imports.

    Tarjan's algorithm, iterative (no recursion limit on a deep package); each cycle sorted,
    the list sorted.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, ()):
                        found.append(sorted(component))
    return sorted(found)


def in_room(name: str, rooms: tuple[str, ...], package: str = PACKAGE) -> bool:
    return any(name == f"{package}.{r}" or name.startswith(f"{package}.{r}.") for r in rooms)


def layering_violations(graph: dict[str, set[str]], package: str = PACKAGE) -> list[str]:
    """``library module -> imported module`` for each import of the library out of the library."""
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() if in_room(src, LIBRARY, package)
                  for dst in dsts if dst != package and not in_room(dst, LIBRARY, package))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(package_modules())


def test_the_graph_sees_the_package(graph: dict[str, set[str]]) -> None:
    # guards the test itself: a parser that found nothing would pass every check below
    assert {f"{PACKAGE}.{room}" for room in LIBRARY} <= set(graph)
    assert f"{PACKAGE}.optim" in graph[PACKAGE]  # ``from .optim import ...`` in the package root
    assert f"{PACKAGE}.ops" in graph[f"{PACKAGE}.optim.base"]  # ``from .. import ops``


def test_library_never_imports_apps_or_bench(graph: dict[str, set[str]]) -> None:
    bad = layering_violations(graph)
    assert bad == [], "library imports out of the library:\n" + "\n".join(bad)


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_over_500_lines() -> None:
    lines = {name: len(path.read_text().splitlines()) for name, path in package_modules().items()}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


# ---- the checks above can fail: the same functions on small made-up inputs ----

def test_cycle_finder_on_a_synthetic_graph() -> None:
    graph = {
        "a": {"b"}, "b": {"c"}, "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"}, "e": set(),  # a tail, no cycle
        "f": {"f"},  # a module importing itself
        "g": {"h"}, "h": {"g"},  # a pair
        "i": {"x"},  # an edge to a node with no entry
    }
    assert cycles(graph) == [["a", "b", "c"], ["f"], ["g", "h"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    # a long chain closed at the end: one component, no recursion limit
    chain = {f"m{k}": {f"m{k + 1}"} for k in range(5000)}
    chain["m5000"] = {"m0"}
    assert cycles(chain) == [sorted(chain)]


def test_layering_rule_on_a_synthetic_graph() -> None:
    graph = {
        "zo_optim": {"zo_optim.optim"},
        "zo_optim.optim.base": {"zo_optim.ops", "zo_optim"},
        "zo_optim.federated.tweets": {"zo_optim.apps.shared", "zo_optim.rng"},
        "zo_optim.integrations.hf": {"zo_optim.bench.step"},
        "zo_optim.rng": {"zo_optim.demo"},
        "zo_optim.apps.demo": {"zo_optim.optim", "zo_optim.bench.report"},  # apps may import anything
        "zo_optim.opsx": {"zo_optim.bench"},  # not the ops room: a prefix is not a room
    }
    assert layering_violations(graph) == [
        "zo_optim.federated.tweets -> zo_optim.apps.shared",
        "zo_optim.integrations.hf -> zo_optim.bench.step",
        "zo_optim.rng -> zo_optim.demo",
    ]


def test_imports_are_resolved(tmp_path: Path) -> None:
    pkg = tmp_path / "zo_optim"
    files = {
        "__init__.py": "from . import ops\nfrom .optim import X\n",
        "ops/__init__.py": "from .reference import f\n",
        "ops/reference.py": "import zo_optim.rng\n",
        "optim/__init__.py": "from .base import X\n",
        "optim/base.py": ("from .. import ops\n\n"
                          "def later():\n    from ..apps.demo import helper\n    import zo_optim.bench.step as s\n"),
        "rng.py": ("import torch\nfrom typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from zo_optim.optim import base\n"),
        "apps/__init__.py": "",
        "apps/demo.py": "from zo_optim.apps import demo\n",
        "bench/__init__.py": "",
        "bench/step.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(package_modules(tmp_path))
    assert graph["zo_optim"] == {"zo_optim.ops", "zo_optim.optim"}
    assert graph["zo_optim.ops"] == {"zo_optim.ops.reference"}
    assert graph["zo_optim.ops.reference"] == {"zo_optim.rng"}
    assert graph["zo_optim.optim.base"] == {"zo_optim.ops", "zo_optim.apps.demo", "zo_optim.bench.step"}
    assert graph["zo_optim.rng"] == {"zo_optim.optim.base"}
    assert layering_violations(graph) == ["zo_optim.optim.base -> zo_optim.apps.demo",
                                          "zo_optim.optim.base -> zo_optim.bench.step"]
    assert cycles(graph) == [["zo_optim.apps.demo"],
                             ["zo_optim.ops", "zo_optim.ops.reference", "zo_optim.optim.base", "zo_optim.rng"]]
