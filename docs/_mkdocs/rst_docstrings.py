"""Griffe extension: the reST-isms of zo-optim's docstrings, as Markdown for mkdocstrings.

The docstrings are written for ``help()`` and Sphinx-like readers: ``.. math::`` blocks,
``double backticks``, ``:role:`target``` cross references, reST simple tables, ``::`` literal
blocks and ``Args (note):`` section titles. mkdocstrings renders docstrings as Markdown (Google
sections), so this rewrites each docstring's text before it is parsed:

* ``.. math::`` + indented block -> ``$$ ... $$`` (``pymdownx.arithmatex``, rendered by MathJax);
* ````x```` -> ```x```; ``:func:`x``` (any role, also ``~x``) -> ```x```;
* reST simple tables (``====  ====``) -> Markdown tables;
* a paragraph ending in ``::`` -> ``:`` (the indented block after it stays a code block);
* ``Args (common to every subclass):`` -> ``Common to every subclass:``, then a Google ``Args:`` section.

Nothing in the package imports this; ``mkdocs.yml`` names it under the Python handler's
``extensions``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const|ref|term):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+?)``")
_TABLE_RULE = re.compile(r"^\s*=+(?: +=+)+\s*$")
_SECTION_NOTE = re.compile(r"^(\s*)(Args|Arguments|Parameters|Returns|Raises|Attributes) \((.+)\):\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            base = _indent(line)
            i += 1
            body: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            body = [b for b in body if b.strip()]
            strip = min((_indent(b) for b in body), default=0)
            pad = " " * base
            out += [f"{pad}$$", *(pad + b[strip:] for b in body), f"{pad}$$", ""]
            continue
        out.append(line)
        i += 1
    return out


def _simple_tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _TABLE_RULE.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        rule = lines[i]
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]
        rows: list[list[str]] = []
        header_rows = 0
        j = i + 1
        while j < len(lines):
            if _TABLE_RULE.match(lines[j]):
                if header_rows == 0 and rows:
                    header_rows = len(rows)
                    j += 1
                    continue
                break
            if lines[j].strip():
                cells = []
                for k, (a, _) in enumerate(spans):
                    b = spans[k + 1][0] if k + 1 < len(spans) else None
                    cells.append(lines[j][a:b].strip())
                rows.append(cells)
            j += 1
        if not rows:
            out.append(rule)
            i += 1
            continue
        header_rows = header_rows or 1
        pad = " " * _indent(rule)
        header = [" ".join(r[k] for r in rows[:header_rows]).strip() for k in range(len(spans))]
        out.append(pad + "| " + " | ".join(header) + " |")
        out.append(pad + "|" + "---|" * len(spans))
        out += [pad + "| " + " | ".join(c.replace("|", r"\|") for c in r) + " |" for r in rows[header_rows:]]
        i = j + 1
    return out


def rst_to_markdown(text: str) -> str:
    """The Markdown that mkdocstrings renders for one docstring's reST-ish ``text``."""
    lines = _simple_tables(_math_blocks(text.splitlines()))
    out: list[str] = []
    in_math = False
    for line in lines:
        if line.strip() == "$$":
            in_math = not in_math
            out.append(line)
            continue
        if in_math:
            out.append(line)
            continue
        m = _SECTION_NOTE.match(line)
        if m:
            pad, section, note = m.groups()
            out += [f"{pad}{note[:1].upper()}{note[1:]}:", "", f"{pad}{section}:"]
            continue
        line = _ROLE.sub(r"`\1`", line)
        line = _LITERAL.sub(r"`\1`", line)
        if line.endswith("::") and not line.strip().startswith(".."):
            line = line[:-1]
        out.append(line)
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`rst_to_markdown`."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
