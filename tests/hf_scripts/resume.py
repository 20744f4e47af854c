"""Run by tests/test_hf_exactness.py in a fresh process: resume every optimizer's run from its checkpoint.

``python resume.py <root> <checkpoint-step> <optimizer>...`` trains ``<root>/<optimizer>`` from
``checkpoint-<step>`` to the end and saves the final weights to ``<root>/<optimizer>/resumed.pt``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

import hf_resume_common as C

if __name__ == "__main__":
    root, step, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    for name in names:
        out = os.path.join(root, name)
        trainer = C.make_trainer(out, name)
        trainer.train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{step}"))
        torch.save({"weights": C.T.weights(trainer.model), "step": trainer.zo_optimizer.step_count},
                   os.path.join(out, "resumed.pt"))
