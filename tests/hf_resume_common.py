"""The run that tests/test_hf_exactness.py checkpoints and tests/hf_scripts/resume.py resumes."""

from __future__ import annotations

from typing import Any

import hf_tiny as T
from zo_optim.integrations.hf import ZOTrainer

STEPS, SAVE_AT = 6, 3  # 4 steps per epoch: the resume starts mid-epoch and crosses an epoch boundary


def make_trainer(out: str, optimizer: str) -> Any:
    args = T.zo_args(out, max_steps=STEPS, save_strategy="steps", save_steps=SAVE_AT, zo_optimizer=optimizer,
                     zo_dropout="shared", gradient_accumulation_steps=1, learning_rate=1e-3,
                     zo_optimizer_kwargs={"backend": "reference"})
    return ZOTrainer(model=T.tiny_gpt2(dropout=0.1), args=args, train_dataset=T.causal_lm_rows(16, seed=5))
