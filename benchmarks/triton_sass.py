"""Thin runner of ``zo-optim bench sass`` (the code lives in ``zo_optim.bench.sass``).

    PYTHONPATH=src python benchmarks/triton_sass.py            # every kernel variant: regs, spills, layouts
    PYTHONPATH=src python benchmarks/triton_sass.py --cost     # SASS instructions per Philox counter
"""

import sys

from zo_optim.bench.sass import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
