"""``zo-optim bench sass``: compile the Triton kernels for sm_90 without a GPU and report what the
compiler made of them.

    zo-optim bench sass            # every kernel variant: regs, spills, layouts
    zo-optim bench sass --cost     # SASS instructions per Philox counter

Triton compiles to PTX and (with the bundled ptxas) to a cubin on a machine without
CUDA; the bundled nvdisasm/cuobjdump then show the SASS and the resource usage. This
is how the kernels were checked while no GPU was available: no layout conversions
through shared memory on the hot path, 128-bit (float32) / 64-bit (16-bit dtypes)
accesses on the unmasked path, registers per thread (occupancy), no spills.
It measures nothing at run time: timings need a GPU (``zo-optim bench kernels``).

Triton must not be in interpreter mode (``TRITON_INTERPRET=1`` makes ``@triton.jit`` build
interpreted functions, which cannot be compiled): this command clears the variable before it
imports Triton, and refuses to run in a process that already imported Triton interpreted.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

INT_ARGS = {"seed_lo", "seed_hi", "query", "rounding_slot", "restore_query"}
PTR_ARGS = {"slot_tab": "*i64", "blk_tab": "*i64", "coeffs": "*fp32", "precond_coeffs": "*fp32",
            "hessian_coeffs": "*fp32"}


def _load() -> SimpleNamespace:
    """Import Triton (compiled mode) and the kernels; build the RNG probe kernels."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("zo-optim bench sass: Triton was already imported in interpreter mode "
                           "(TRITON_INTERPRET=1); run it in its own process without that variable")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise RuntimeError(f'zo-optim bench sass needs Triton: pip install "zo-optim[triton]" ({exc})') from exc

    from ..ops.triton import _rng, kernels, launch

    @triton.jit
    def _gaussian_probe(out, k0, k1, tid, q, BLOCK: tl.constexpr):
        i0 = tl.program_id(0) * BLOCK
        z = _rng.gaussian_block(i0, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True),
                                tid.to(tl.uint32), q.to(tl.uint32), BLOCK)
        tl.store(out + i0 + tl.arange(0, BLOCK), z)

    @triton.jit
    def _words_probe(out, k0, k1, tid, q, BLOCK: tl.constexpr):
        i0 = tl.program_id(0) * BLOCK
        w = _rng.rounding_block(i0, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True),
                                tid.to(tl.uint32), q.to(tl.uint32), BLOCK)
        tl.store(out + i0 + tl.arange(0, BLOCK), w)

    return SimpleNamespace(triton=triton, tl=tl, ASTSource=ASTSource, target=GPUTarget("cuda", 90, 32),
                           bin=Path(triton.__file__).parent / "backends" / "nvidia" / "bin",
                           kernels=kernels, launch=launch, gaussian_probe=_gaussian_probe, words_probe=_words_probe)


def compile_sm90(t: SimpleNamespace, fn: Any, constexprs: dict, num_warps: int, signature: dict | None = None) -> Any:
    sig = signature or {
        name: "constexpr" if name in constexprs else PTR_ARGS.get(name, "i32" if name in INT_ARGS else "fp32")
        for name in fn.arg_names
    }
    src = t.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return t.triton.compile(src, target=t.target, options=dict(num_warps=num_warps, enable_fp_fusion=False))


def sass_of(t: SimpleNamespace, compiled: Any) -> tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(t.bin / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([str(t.bin / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    return sass, res


def describe(t: SimpleNamespace, compiled: Any) -> str:
    _, res = sass_of(t, compiled)
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res)
    regs, shared, local = m.groups() if m else ("?", "?", "?")
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    vec = collections.Counter(re.findall(r"(?:ld|st)\.global\.v\d\.b32", ptx))
    return (f"regs {regs:>3}  shared {shared:>4} B  local {local} B  convert_layout {ttgir.count('convert_layout'):>2}"
            f"  vector accesses {dict(vec)}")


def variants(t: SimpleNamespace):
    tl, kernels, launch = t.tl, t.kernels, t.launch
    f32, bf16, f16 = tl.float32, tl.bfloat16, tl.float16
    for dtype, rad in itertools.product((f32, bf16, f16), (False, True)):
        common = dict(DTYPE=dtype, RADEMACHER=rad, STOCHASTIC=dtype != f32, ALIGNED=True, BLOCK=launch.DEFAULT_BLOCK)
        yield "perturb", kernels.perturb_kernel, dict(common, NCOL=4, HAS_PRECOND=True)
        yield "sgd+momentum", kernels.sgd_kernel, dict(common, NCOL=4, HAS_WD=True, HAS_MOMENTUM=True,
                                                         HAS_RESTORE=True, RESTORE_IN_Q=True, NUM_Q=1)
        yield "adamw q=2", kernels.adamw_kernel, dict(common, NCOL=5, HAS_RESTORE=True, RESTORE_IN_Q=True, NUM_Q=2)
        yield "hizoo", kernels.precond_kernel, dict(common, NCOL=4, HAS_WD=True, UPDATE=True, HIZOO=True,
                                                    HAS_RESTORE=True, RESTORE_IN_Q=True, NUM_Q=1)
        yield "hiso q=5", kernels.precond_kernel, dict(common, NCOL=4, HAS_WD=False, UPDATE=True, HIZOO=False,
                                                       HAS_RESTORE=True, RESTORE_IN_Q=False, NUM_Q=5)
        yield "helene", kernels.helene_kernel, dict(common, NCOL=6, UPDATE=True, GNB=True, HAS_RESTORE=True,
                                                    RESTORE_IN_Q=True, NUM_Q=1)
    yield "perturb unaligned", kernels.perturb_kernel, dict(DTYPE=bf16, RADEMACHER=False, STOCHASTIC=False,
                                                            ALIGNED=False, BLOCK=launch.DEFAULT_BLOCK, NCOL=4,
                                                            HAS_PRECOND=False)


def _fast_path_count(sass: str) -> tuple[int, collections.Counter]:
    """Instructions up to the first EXIT, minus the out-of-range branches of sinf/cosf
    (Payne-Hanek reduction for |x| > 105615, never taken for phi in [0, 2 pi))."""
    lines = sass.splitlines()
    is_ins = [bool(re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+", line)) for line in lines]
    end = next(i for i, line in enumerate(lines) if is_ins[i] and re.search(r"\*/\s+EXIT", line))
    skipped: set[int] = set()
    for i, line in enumerate(lines[: end + 1]):
        m = re.search(r"BSSY B0, `\((\.L_x_\d+)\)", line)
        if not m:
            continue
        # The slow part of a BSSY region: from the last branch to some label X inside the
        # region up to X, where that span holds the table loads (LDG) of the slow path.
        stop = next(j for j in range(i, end) if lines[j].startswith(m.group(1) + ":"))
        labels = {lines[j].split(":")[0]: j for j in range(i, stop) if lines[j].startswith(".L_x_")}
        best: range = range(0)
        for label, at in labels.items():
            branches = [j for j in range(i, at) if f"`({label})" in lines[j]]
            span = range(branches[-1] + 1, at) if branches else range(0)
            if any("LDG" in lines[j] for j in span) and len(span) > len(best):
                best = span
        skipped.update(best)
    ops = collections.Counter()
    for i in range(end + 1):
        if is_ins[i] and i not in skipped:
            text = re.sub(r"^\s+/\*[0-9a-f]+\*/\s+", "", lines[i]).strip()
            ops[re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]] += 1
    return sum(ops.values()), ops


def cost(t: SimpleNamespace) -> None:
    sig = {"out": "*fp32", "k0": "i32", "k1": "i32", "tid": "i32", "q": "i32", "BLOCK": "constexpr"}
    for name, fn, out in (("Gaussian z (Philox + bm4)", t.gaussian_probe, "*fp32"),
                          ("Philox words only", t.words_probe, "*i32")):
        # One warp, 128 elements: one counter (four elements) per thread.
        compiled = compile_sm90(t, fn, {"BLOCK": 128}, 1, dict(sig, out=out))
        n, ops = _fast_path_count(sass_of(t, compiled)[0])
        print(f"{name}: {n} SASS instructions per thread per counter (4 elements), incl. ~15 of address/store")
        print("   ", ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zo-optim bench sass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", action="store_true", help="instructions per Philox counter instead of the sweep")
    args = parser.parse_args(argv)
    try:
        t = _load()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.cost:
        cost(t)
        return 0
    launch = t.launch
    warps = launch._num_warps(launch.DEFAULT_BLOCK)
    print(f"sm_90, BLOCK {launch.DEFAULT_BLOCK}, {warps} warps, triton {t.triton.__version__}")
    for name, fn, consts in variants(t):
        flags = f"{consts['DTYPE']}{' rademacher' if consts['RADEMACHER'] else ''}"
        print(f"{name:<18} {flags:<16} {describe(t, compile_sm90(t, fn, consts, warps))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
