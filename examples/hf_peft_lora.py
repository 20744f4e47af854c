"""LoRA through PEFT with ``ZOTrainer``: only the adapters move, the base model stays bit-identical.

    python examples/hf_peft_lora.py            # LoRA on the packaged MiniLM, tweet sentiment
    python examples/hf_peft_lora.py --smoke    # 2 steps (CI)

``get_peft_model`` marks the base weights ``requires_grad=False``; ZOTrainer builds its optimizer
from the trainable parameters only, so nothing else is needed. ``zo_perturbation="transient"``
keeps even the adapters' stored values unperturbed between probes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_trainer_minilm


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    a, rest = p.parse_known_args(argv)
    return hf_trainer_minilm.main(["--lora", *(["--smoke"] if a.smoke else []), *rest])


if __name__ == "__main__":
    main()
