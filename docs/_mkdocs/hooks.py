"""MkDocs hooks for the zo-optim docs site (named under ``hooks:`` in ``mkdocs.yml``).

* API pages: every nav entry ``api/<module>.md`` (e.g. ``api/zo_optim.rng.md``) without a file
  of that name becomes a generated page ``# <module>`` + ``::: <module>`` (mkdocstrings). Adding
  a module to the API reference is one nav line.
* Math offline: MathJax 3 (``tex-svg-full.js``, fonts as SVG paths inside the one file) is copied
  from the ``django-static-mathjax`` package (extra ``docs``) into ``assets/mathjax/`` of the built
  site; ``docs/javascripts/mathjax.js`` configures it for ``pymdownx.arithmatex`` (generic).
  No page loads anything from another host.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

API_PAGE = re.compile(r"^api/(?P<module>[A-Za-z_][\w.]*)\.md$")
MATHJAX_FILE = "tex-svg-full.js"
MATHJAX_DEST = "assets/mathjax"


def _nav_paths(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_paths(v)]
    if isinstance(nav, list):
        return [p for v in nav for p in _nav_paths(v)]
    return []


def api_modules(nav: Any) -> list[str]:
    """The modules named by ``api/<module>.md`` entries of the nav, in order."""
    return [m.group("module") for p in _nav_paths(nav) if (m := API_PAGE.match(p))]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for module in api_modules(config.nav):
        uri = f"api/{module}.md"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=f"# `{module}`\n\n::: {module}\n"))
    return files


def mathjax_source() -> Path:
    try:
        import mathjax  # the django-static-mathjax distribution's package
    except ImportError as exc:
        raise PluginError('MathJax is missing: pip install "zo-optim[docs]" (django-static-mathjax)') from exc
    src = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / MATHJAX_FILE
    if not src.is_file():
        raise PluginError(f"MathJax file not found: {src}")
    return src


def on_post_build(config: MkDocsConfig) -> None:
    dest = Path(config.site_dir) / MATHJAX_DEST
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(mathjax_source(), dest / MATHJAX_FILE)
