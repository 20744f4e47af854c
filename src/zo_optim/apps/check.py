"""``zo-optim check``: the self-checks of every available backend on every visible device, as a table.

The first thing to run on a new machine, and what to attach to a bug report. For each device (the CPU
and every CUDA device torch sees) and each backend that can run there (:func:`zo_optim.ops.available_backends`),
it runs the checks of :mod:`zo_optim.ops.selfcheck` (the ones the Triton backend runs on its first use, here
uncached and for every backend): the Philox known answers, Rademacher z bit for bit and Gaussian z within
the contract's 1e-6 (row dtype ``-``), then per dtype one perturb and one fused restore+update against the
reference. Each dtype row also times the backend's perturb pass against ``dst.copy_(src)`` over the same
bytes on that device (CUDA events on a GPU; a quick figure, not ``zo-optim bench kernels``).

Exit status: 0 when every check passed, 1 when one failed (the failures are listed under the table), 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys
from collections.abc import Sequence

import torch

from .. import __version__, ops, rng
from ..bench.timing import time_fn
from ..ops import selfcheck

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-optim check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Attach the whole output to a bug report.")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices (default: cpu and every CUDA device torch sees)")
    p.add_argument("--backends", default=",".join(ops.BACKENDS[1:]),
                   help="comma-separated backends to check where available (default: all)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (default: %(default)s)")
    p.add_argument("--numel", type=int, default=None,
                   help="elements of the bandwidth pass (default: 2**24 for triton on CUDA, 2**14 for triton "
                   "interpreted, else 2**20)")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the perturb-vs-copy timing")
    return p


def _split(text: str, choices: Sequence[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in choices]
    if bad or not items:
        raise SystemExit(f"zo-optim check: Invalid {what}: {text!r} (choose from {', '.join(choices)})")
    return items


def _versions() -> list[str]:
    lines = [f"zo-optim {__version__}, RNG contract {rng.RNG_VERSION}",
             f"python {platform.python_version()} on {platform.platform()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for name in ("triton", "numba", "numpy"):
        try:
            lines.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            lines.append(f"{name} not installed")
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        prop = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i} {prop.name}, capability {prop.major}.{prop.minor}, "
                     f"{prop.total_memory / 2**30:.1f} GiB, {prop.multi_processor_count} SMs")
    return lines


def _devices(text: str | None) -> list[torch.device]:
    if text is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(n)]
    try:
        return [torch.device(x.strip()) for x in text.split(",") if x.strip()]
    except RuntimeError as exc:
        raise SystemExit(f"zo-optim check: Invalid devices: {text!r} ({exc})") from exc


def _interpreted(backend: str, device: torch.device) -> bool:
    return backend == "triton" and device.type == "cpu"


def _default_numel(backend: str, device: torch.device) -> int:
    if _interpreted(backend, device):
        return 1 << 14
    if backend in ("chunked", "reference"):
        # ~300 small torch ops per 2**16 elements: launch-bound on a GPU, a second or more per pass at 2**24
        return 1 << 20
    return 1 << 24 if device.type == "cuda" else 1 << 20


@torch.no_grad()
def bandwidth(backend: str, device: torch.device, dtype: torch.dtype, numel: int) -> tuple[float, float]:
    """(perturb GB/s, copy GB/s) over ``numel`` elements of ``dtype``: read + write of the tensor each."""
    mod = ops.load_backend(backend)
    theta = torch.randn(numel, device=device).to(dtype)
    src, dst = theta.clone(), torch.empty_like(theta)
    warmup, repeat = (2, 10) if device.type == "cuda" else (1, 3)
    # ±scale alternately, so the weights stay bounded over the repeats
    perturb = time_fn(lambda i: mod.perturb_([theta], [0], 7, 1e-3 * (-1) ** i), device, warmup=warmup, repeat=repeat)
    copy = time_fn(lambda i: dst.copy_(src), device, warmup=warmup, repeat=repeat)
    nbytes = 2 * numel * theta.element_size()
    return nbytes / perturb.median / 1e6, nbytes / copy.median / 1e6


def _row(backend: str, device: torch.device, dtype: str, checks: list[selfcheck.Check], bw: str) -> list[str]:
    failed = [c.name for c in checks if not c.passed]
    worst = max((c.max_err for c in checks), default=0.0)
    result = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
    return [backend, str(device), dtype, f"{sum(c.passed for c in checks)}/{len(checks)}", f"{worst:.3g}", result, bw]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backends = _split(args.backends, ops.BACKENDS[1:], "backends")
    dtypes = _split(args.dtypes, list(DTYPES), "dtypes")
    devices = _devices(args.devices)
    print("\n".join(_versions()))
    print()
    header = ["backend", "device", "dtype", "checks", "max err", "result", "perturb / copy GB/s"]
    rows: list[list[str]] = []
    failures: list[selfcheck.Check] = []
    skipped: list[str] = []
    for device in devices:
        here = ops.available_backends(device)
        for backend in backends:
            if backend not in here:
                skipped.append(f"{backend} on {device}: not available here (see docs/backends.md)")
                continue
            checks = selfcheck.run_checks(backend, device)
            failures += [c for c in checks if not c.passed]
            rows.append(_row(backend, device, "-", checks, ""))
            checks = selfcheck.run_checks(backend, device, shards=True)  # shards of sharded tensors (FSDP2)
            failures += [c for c in checks if not c.passed]
            rows.append(_row(backend, device, "shards", checks, ""))
            for name in dtypes:
                dtype = DTYPES[name]
                checks = selfcheck.run_checks(backend, device, dtype)
                failures += [c for c in checks if not c.passed]
                bw = ""
                if not args.no_bandwidth:
                    numel = args.numel or _default_numel(backend, device)
                    try:
                        got, copy = bandwidth(backend, device, dtype, numel)
                        bw = f"{got:.3g} / {copy:.3g} ({100 * got / copy:.2g}%)"
                        bw += " interpreter" if _interpreted(backend, device) else ""
                    except Exception as exc:  # a crash of the pass is reported, the other rows still run
                        bw = f"error: {type(exc).__name__}"
                        failures.append(selfcheck.Check(backend, str(device), name, "bandwidth pass", float("inf"),
                                                        "-", False, f"{type(exc).__name__}: {exc}"))
                rows.append(_row(backend, device, name, checks, bw))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for line in skipped:
        print(f"skipped: {line}")
    if failures:
        print(f"\n{len(failures)} check(s) FAILED:")
        for c in failures:
            print(f"  {c.line()}")
        print("\nA failing backend's results would not follow the RNG contract on that device (the Triton backend "
              "checks itself on first use: backend='auto' then falls back to 'chunked', backend='triton' refuses "
              "to run). Please attach this whole output to a bug report.")
        return 1
    print(f"\nall {len(rows)} rows passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
