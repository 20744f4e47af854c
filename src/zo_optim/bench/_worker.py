"""The fresh-interpreter worker protocol of the benches: a worker prints one ``ZO_RESULT <json>`` line.

Benches that measure memory or train real models run each configuration in a new interpreter (a clean
peak, no state carried between runs); this module is the one place that writes and reads that line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["emit", "parse", "run_worker"]

PREFIX = "ZO_RESULT "


def emit(result: Mapping[str, Any]) -> None:
    """Print ``result`` as the worker's result line (the parent reads the last one)."""
    print(PREFIX + json.dumps(result), flush=True)


def parse(stdout: str, returncode: int, stderr: str, what: str) -> dict[str, Any]:
    """The last result line of a finished worker; ``RuntimeError`` with its stderr tail if it failed or printed none."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(PREFIX)]
    if returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed:\n{stderr[-3000:]}")
    return json.loads(lines[-1][len(PREFIX):])


def run_worker(module: str, cfg: Mapping[str, Any], what: str, env: Mapping[str, str]) -> dict[str, Any]:
    """``python -m module --worker <cfg as json>`` in a new interpreter with ``env``; its result."""
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(cfg)], capture_output=True,
                          text=True, env=dict(env), check=False)
    return parse(proc.stdout, proc.returncode, proc.stderr, what)
