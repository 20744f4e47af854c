#!/usr/bin/env bash
# The GPU check of zo-optim: one script, run from anywhere on a CUDA machine, about 14 minutes at most
# (stage limits 120 + 200 + 140 + 110 + 150 + 120 s).
#
#   bash benchmarks/gpu_check.sh                  # results under benchmarks/results/<date>-<device>/
#   bash benchmarks/gpu_check.sh --print-commands # the commands it would run, one a line; checks nothing
#
# 1. Installs only what is missing (torch, triton, transformers, accelerate, pytest, hypothesis, numpy) with pip,
#    never replacing the machine's CUDA torch; zo-optim itself runs from this checkout (PYTHONPATH=src).
# 2. zo-optim check first: every backend's self-check (Philox known answers, z, one perturb and one fused update per
#    dtype against the reference) on every device, with a perturb-vs-copy GB/s figure per row (check.txt); then
#    tests/test_triton_backend.py COMPILED on CUDA (ZO_OPTIM_TRITON_DEVICE=cuda: no interpreter) against
#    the reference: Philox/Rademacher/rounding words bitwise, Gaussian z within 1e-6, bf16/fp16 rounding exact;
#    and tests/test_ops_sharding.py: the kernels on shards of sharded (FSDP2) tensors at unaligned offsets.
# 3. zo-optim bench kernels on the OPT-1.3b parameter list, fp32 and bf16, with the measured copy bandwidth
#    (the roofline, dst.copy_(src) timed in the same run); zo-optim bench step on OPT-1.3b bf16, batch 16x128,
#    random weights from the config. Both time with CUDA events after warm-up, medians of repeats
#    (zo_optim.bench.timing), and check the targets: perturb >= 90% of copy, fused restore+update <= 1.2x
#    its byte floor, optimizer overhead <= 5% of the step. Last, zo-optim bench memory (BERT-large and OPT-350m
#    from their configs, batch 8x64): MeZO through ZOTrainer vs inference vs AdamW on the CUDA allocator's peak
#    (targets zo <= 1.05x inference, <= 1/3 AdamW).
#    With 2+ GPUs: ZOTrainer through the Trainer's own FSDP2 path (fsdp_version 2) against the replicated run,
#    bit-identical weights (tests/hf_scripts/fsdp_train.py --gpu-check); skipped, and said so, on one GPU.
# 4. Writes env.txt (device, driver, clocks, versions, commit), the test log, the benches' CSV/PNG/env JSON
#    and printed tables, and summary.txt (stage exit codes, wall times, targets) to the results folder.
#
# Exit codes: 0 every stage ran and the tests passed (targets are reported in summary.txt, met or not);
#             1 a stage failed (tests, a bench, a stage's time limit); 3 no CUDA GPU: nothing to check, nothing
#             written; 4 a needed package is missing and could not be installed; 2 bad arguments.
# Environment: RESULTS_DIR overrides the results folder; PYTHON the interpreter (default python3).
# It leaves the card's settings alone (no clocks, power or mode changes) and measures the card as found.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
KERNELS_ARGS=(--models opt-1.3b --dtypes fp32,bf16 --ops sgd --providers mezo-loop,triton --warmup 3 --repeat 20)
STEP_ARGS=(--model opt-1.3b --dtype bf16 --batch 16 --seq 128 --backend triton --warmup 2 --steps 10)
MEMORY_ARGS=(--models bert-large opt-350m --batch-size 8 --max-len 64 --steps 2)
PYTEST_ARGS=(tests/test_triton_backend.py tests/test_ops_sharding.py -q -p no:cacheprovider)
CHECK_ARGS=(--dtypes float32,bfloat16,float16)

if [[ $# -gt 0 ]]; then
  case "$1" in
    --print-commands)
      echo "zo-optim check ${CHECK_ARGS[*]}"
      echo "ZO_OPTIM_TRITON_DEVICE=cuda $PY -m pytest ${PYTEST_ARGS[*]}"
      echo "zo-optim bench kernels ${KERNELS_ARGS[*]} --out RESULTS_DIR"
      echo "zo-optim bench step ${STEP_ARGS[*]} --out RESULTS_DIR"
      echo "zo-optim bench memory ${MEMORY_ARGS[*]} --out RESULTS_DIR/memory"
      echo "$PY tests/hf_scripts/fsdp_train.py RESULTS_DIR/fsdp2_trainer --gpu-check"
      exit 0 ;;
    -h|--help) sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
fi

# --------------------------------------------------------------------------- is there a CUDA GPU?
has_cuda() {
  "$PY" - <<'EOF' 2>/dev/null
import sys
try:
    import torch
except ImportError:
    sys.exit(2)
sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)
EOF
}
has_cuda; cuda=$?
if [[ $cuda -eq 2 ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi sees a GPU but torch is missing: installing torch"
  "$PY" -m pip install -q torch || { echo "gpu_check: could not install torch" >&2; exit 4; }
  has_cuda; cuda=$?
fi
if [[ $cuda -ne 0 ]]; then
  echo "gpu_check: no CUDA GPU: nothing to check (torch sees no CUDA device; run this on a CUDA machine). Exit 3."
  exit 3
fi

# --------------------------------------------------------------------------- what it needs
missing=()
for mod in torch triton transformers accelerate numpy pytest hypothesis; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "gpu_check: installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}" || {
    echo "gpu_check: missing ${missing[*]} and pip could not install them (offline? carry wheels)" >&2; exit 4; }
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
ZO=("$PY" -m zo_optim.cli)
plot=()
"$PY" -c "import matplotlib" 2>/dev/null || plot=(--no-plot)

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
OUT_DIR="${RESULTS_DIR:-$ROOT/benchmarks/results/$(date -u +%Y-%m-%d)-$slug}"
mkdir -p "$OUT_DIR" || exit 1
echo "gpu_check: $device -> $OUT_DIR"

{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $device"
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "host: $(uname -srm)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu --format=csv 2>/dev/null \
    || echo "nvidia-smi: unavailable"
  "$PY" - <<'EOF'
import importlib.metadata as md
import platform

import torch

print(f"python: {platform.python_version()}")
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda})")
p = torch.cuda.get_device_properties(0)
print(f"capability: {p.major}.{p.minor}, SMs: {p.multi_processor_count}, memory: {p.total_memory / 2**30:.1f} GiB")
for name in ("triton", "transformers", "numpy", "numba", "pytest", "hypothesis"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import zo_optim

print(f"zo_optim: {zo_optim.__version__} ({zo_optim.__file__})")
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# --------------------------------------------------------------------------- stages
summary="$OUT_DIR/summary.txt"
: > "$summary"
status=0
stage() {  # stage NAME LIMIT_S LOG command...
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc, $((SECONDS - t0)) s$([[ $rc -eq 124 ]] && echo ' (time limit)')" | tee -a "$summary"
  [[ $rc -eq 0 ]] || status=1
}

cd "$ROOT" || exit 1
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)  # kernels compile in parallel
# first: the self-checks a user runs on a new machine (a failure here names the check; the tests below give detail)
stage "zo-optim check (every backend, every device)" 120 "$OUT_DIR/check.txt" "${ZO[@]}" check "${CHECK_ARGS[@]}"
stage "triton tests (compiled, CUDA)" 200 "$OUT_DIR/triton_tests.txt" \
  env ZO_OPTIM_TRITON_DEVICE=cuda "$PY" -m pytest "${PYTEST_ARGS[@]}" "${xdist[@]}"
stage "bench kernels (OPT-1.3b fp32+bf16)" 140 "$OUT_DIR/kernels.txt" \
  "${ZO[@]}" bench kernels "${KERNELS_ARGS[@]}" "${plot[@]}" --out "$OUT_DIR"
stage "bench step (OPT-1.3b bf16 16x128)" 110 "$OUT_DIR/step.txt" \
  "${ZO[@]}" bench step "${STEP_ARGS[@]}" "${plot[@]}" --out "$OUT_DIR"
# last: issue 11's memory targets on the CUDA allocator (six fresh processes, random weights from configs)
stage "bench memory (BERT-large, OPT-350m; 8x64)" 150 "$OUT_DIR/memory.txt" \
  "${ZO[@]}" bench memory "${MEMORY_ARGS[@]}" --out "$OUT_DIR/memory"
# issue 21: ZOTrainer through the Trainer's own FSDP2 path (fsdp_version 2; accelerate shards only on accelerators)
# vs the replicated run, bit-identical; FSDP over nccl needs one GPU per rank
if [[ $("$PY" -c "import torch; print(torch.cuda.device_count())") -ge 2 ]]; then
  stage "FSDP2 Trainer (2 GPUs, tiny GPT-2)" 120 "$OUT_DIR/fsdp2_trainer.txt" \
    "$PY" tests/hf_scripts/fsdp_train.py "$OUT_DIR/fsdp2_trainer" --gpu-check
else
  echo "FSDP2 Trainer: skipped (needs 2 CUDA GPUs)" | tee -a "$summary"
fi

{
  echo
  echo "targets (from the benches' CSV):"
  grep -h '^target:' "$OUT_DIR"/kernels.csv "$OUT_DIR"/step.csv "$OUT_DIR"/memory/memory.csv 2>/dev/null \
    | cut -d, -f1,2,5,6 \
    | sed -e 's/,1\.0$/ MET/' -e 's/,0\.0$/ NOT MET/' || true
  grep -hE '\[(MET|NOT MET|--)\]' "$OUT_DIR"/kernels.txt "$OUT_DIR"/step.txt 2>/dev/null || true
} >> "$summary"
echo "=== summary ($summary)"
cat "$summary"
exit $status
