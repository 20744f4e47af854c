"""Benchmark output shared by every ``zo-optim bench`` command (docs: benchmarks.md, "Output").

* :func:`environment` — who measured what: a human device name, the package
  versions, a UTC timestamp, and a details dict written beside the CSV.
* :class:`Row` / :func:`write_csv` / :func:`read_csv` — results in long format, one
  measurement per line, columns :data:`COLUMNS` exactly
  (``name, provider, metric, unit, x, value, device, version, timestamp``), so runs
  from different machines and days concatenate into one table.
* :func:`format_table` — a plain-text table for the terminal.
* :func:`plot_lines` / :func:`plot_grouped_bars` — small PNGs (matplotlib, Agg
  backend, imported only when a plot is drawn).

Nothing here imports triton or numba: their versions come from package metadata,
so recording the environment never switches Triton's interpreter mode.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COLUMNS",
    "Environment",
    "Row",
    "cpu_name",
    "device_name",
    "environment",
    "format_table",
    "package_versions",
    "plot_grouped_bars",
    "plot_lines",
    "read_csv",
    "version_string",
    "write_csv",
    "write_environment",
]

COLUMNS = ("name", "provider", "metric", "unit", "x", "value", "device", "version", "timestamp")

_RECORDED_ENV = ("TRITON_INTERPRET", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
_VERSIONED_PACKAGES = ("zo-optim", "torch", "triton", "numba", "transformers", "numpy")


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (or :mod:`platform`) plus the cores this process may use."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return f"{model} ({cores} cores, {torch.get_num_threads()} torch threads)"


def device_name(device: torch.device | str | None = None) -> str:
    """A human name for ``device``: the GPU's marketing name, or the CPU model and core count."""
    dev = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return cpu_name()
    return str(dev)


def package_versions() -> dict[str, str]:
    """Installed versions of zo-optim and the libraries that decide its speed (absent ones omitted)."""
    out: dict[str, str] = {}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "zo-optim" not in out:  # running from a source tree (PYTHONPATH=src) without an install
        from zo_optim import __version__

        out["zo-optim"] = __version__
    return out


def version_string(versions: Mapping[str, str] | None = None) -> str:
    """``zo_optim=0.1.0 torch=2.x triton=3.x numba=0.x``: the CSV's ``version`` column."""
    versions = package_versions() if versions is None else versions
    keys = ("zo-optim", "torch", "triton", "numba")
    return " ".join(f"{k.replace('-', '_')}={versions[k]}" for k in keys if k in versions)


@dataclass(frozen=True)
class Environment:
    """Where and when a benchmark ran; ``device``/``version``/``timestamp`` fill the CSV columns."""

    device: str
    version: str
    timestamp: str
    details: dict[str, Any] = field(default_factory=dict)


def environment(device: torch.device | str | None = None, argv: Sequence[str] | None = None) -> Environment:
    """Record the environment of a run on ``device`` (default: CUDA if present, else CPU)."""
    dev = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    versions = package_versions()
    details: dict[str, Any] = {
        "device": device_name(dev),
        "device_type": dev.type,
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "argv": list(sys.argv if argv is None else argv),
        "env": {k: os.environ[k] for k in _RECORDED_ENV if k in os.environ},
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        details.update(
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
    stamp = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return Environment(device=device_name(dev), version=version_string(versions), timestamp=stamp, details=details)


def write_environment(path: str | os.PathLike, env: Environment, **extra: Any) -> Path:
    """Write ``env`` (plus any ``extra`` settings, e.g. the benchmark's arguments) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = asdict(env) | {"settings": extra} if extra else asdict(env)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Row:
    """One measurement. ``x`` is the independent variable (a size, a step count, a model/dtype label)."""

    name: str
    provider: str
    metric: str
    unit: str
    x: float | int | str
    value: float


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds; NaN runs (never reached, failed) are left out.

    All-NaN gives (nan, nan); an infinite run makes the mean inf (or the common value) and the std nan.
    """
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    if any(math.isinf(x) for x in xs):
        return xs[0] if all(x == xs[0] for x in xs) else math.inf, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def write_csv(path: str | os.PathLike, rows: Iterable[Row], env: Environment, *, append: bool = False) -> Path:
    """Write ``rows`` in long format (:data:`COLUMNS`); with ``append`` add to an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and path.exists() and path.stat().st_size > 0)
    with open(path, "w" if new else "a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([r.name, r.provider, r.metric, r.unit, _cell(r.x), _cell(float(r.value)),
                             env.device, env.version, env.timestamp])
    return path


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a long-format CSV back; ``value`` becomes a float, ``x`` a number when it parses as one."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the long format {list(COLUMNS)}")
        rows = []
        for rec in reader:
            rec["value"] = float(rec["value"])
            try:
                rec["x"] = float(rec["x"]) if any(c in rec["x"] for c in ".eEn") else int(rec["x"])
            except ValueError:
                pass
            rows.append(rec)
    return rows


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 10**digits or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits - 1}f}"
    return str(value)


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 4, title: str | None = None
) -> str:
    """A plain-text table; floats get ``digits`` significant digits, text is left- and numbers right-aligned."""
    rows = [list(r) for r in rows]
    body = [[_fmt(v, digits) for v in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    out = [title] if title else []
    out += [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_lines(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """One line per ``label -> (xs, ys)``; optional ``bands`` (label -> (low, high)) shade a spread,
    ``styles`` (label -> matplotlib line keywords, e.g. ``color``, ``linestyle``) set a line's look."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        kw = {"marker": "." if len(xs) < 30 else None, **((styles or {}).get(label) or {})}
        (line,) = ax.plot(list(xs), list(ys), label=label, **kw)
        if bands and label in bands:
            low, high = bands[label]
            ax.fill_between(list(xs), list(low), list(high), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_grouped_bars(
    path: str | os.PathLike,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    ylabel: str = "",
    hline: float | None = None,
    hline_label: str = "",
) -> Path:
    """Bars per group (x axis) and series (colour); NaN values leave a gap. ``hline`` draws a reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 3), 4.2), dpi=110)
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (label, values) in enumerate(series.items()):
        xs = [g + (k - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in values], width=width, label=label)
    if hline is not None:
        ax.axhline(hline, color="k", linestyle="--", linewidth=1, label=hline_label or None)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
