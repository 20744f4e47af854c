"""Thin runner: a MeZO step's weight passes on CPU, MeZO's 4-pass loop against the numba backend.

The measurement is ``zo-optim bench kernels`` (``zo_optim.bench.kernels``) on the
all-MiniLM-L6-v2 parameter list, fp32 and bf16, ``mezo-loop`` vs ``cpu``, one thread per
library (a shared CPU); extra arguments are passed on (e.g. ``--repeat 9 --out DIR``).

    PYTHONPATH=src python benchmarks/cpu_step_ratio.py [zo-optim bench kernels options]
"""

import sys

from zo_optim.bench.kernels import main

DEFAULTS = ["--models", "minilm", "--dtypes", "fp32,bf16", "--providers", "mezo-loop,cpu", "--threads", "1",
            "--no-plot"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:]))
