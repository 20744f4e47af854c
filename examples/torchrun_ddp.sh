#!/usr/bin/env bash
# ZOTrainer under torchrun: every rank measures its shard, one all-reduce per step sums the weighted
# projected gradients, and all ranks apply the same update (bit-identical replicas). On CPU the
# process group is gloo; on GPUs set NPROC to the GPU count.
#   bash examples/torchrun_ddp.sh --smoke          # 2 CPU ranks, 2 steps (CI)
#   NPROC=4 bash examples/torchrun_ddp.sh --lora
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "${NPROC:-2}" --master_port "$port" \
  "$here/hf_trainer_minilm.py" "$@"
