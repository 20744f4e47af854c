"""Peak memory of ONE training step on one batch, ZO versus backprop, each in a fresh process.

The demo prints what its own run peaked at, but that number includes what the demo did around the
training (encoding the tweet pool once, evaluation). To say what a zeroth-order step saves, this
module measures one step on the same batch of packaged tweets through the whole model, in a fresh
interpreter per method, so neither run inherits the other's high-water mark:

* ``zo``: ``optimizer.step(closure)`` with a zo-optim optimizer (two forwards, no autograd graph);
* ``backprop``: forward + backward + ``torch.optim.AdamW.step()`` on the same trainable parameters;
* ``inference``: one forward under ``torch.no_grad()`` (the floor both are compared with).

On CPU the number is the process's RSS high-water mark (``VmHWM``; ``ru_maxrss`` off Linux), which
also counts the interpreter, torch and the loaded weights; on CUDA it is ``torch.cuda.max_memory_allocated``.

    python -m zo_optim.apps.step_memory --method backprop --train all --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..optim.registry import OPTIMIZERS, optimizer_class
from .common import TRAIN_MODES, peak_memory_mb

METHODS = ("inference", "zo", "backprop")


def _build(train: str, k: int, seed: int) -> tuple[torch.nn.Module, Any]:
    """The packaged MiniLM classifier with ``train``'s parameters trainable, and a loss function of a batch."""
    import torch.nn.functional as F

    from . import assets

    assets.set_offline()
    if train == "lora":
        from .demo_lora import build_lora_model

        model = build_lora_model(seed)

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(**batch).loss

        return model, loss_fn
    from .common import select_trainable

    model = assets.load_minilm_classifier(num_labels=len(assets.LABELS), seed=seed)
    select_trainable(model, train, k)

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"])

    return model, loss_fn


def measure(method: str, train: str = "head", *, optimizer: str = "mezo", batch_size: int = 32, max_len: int = 64,
            k: int = 1, device: str = "cpu", seed: int = 0, backend: str = "auto") -> dict[str, float]:
    """One ``method`` step in THIS process: its peak memory and ``trainable_params`` (call it in a fresh process)."""
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (choose one of {', '.join(METHODS)})")
    if train not in TRAIN_MODES:
        raise ValueError(f"Invalid train mode: {train!r} (choose one of {', '.join(TRAIN_MODES)})")
    from . import assets

    dev = torch.device(device)
    model, loss_fn = _build(train, k, seed)
    model.to(dev)
    split = assets.load_tweet_sentiment(n_train=batch_size + batch_size % 2, n_eval=2, seed=0)
    enc = assets.encode(assets.load_minilm_tokenizer(), list(split.train_texts[:batch_size]), max_len)
    batch = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev),
             "labels": torch.as_tensor(split.train_labels[:batch_size]).to(dev)}
    params = [p for p in model.parameters() if p.requires_grad]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if method == "inference":
        with torch.no_grad():
            loss_fn(batch)
    elif method == "zo":
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {optimizer!r} (choose one of {', '.join(OPTIMIZERS)})")
        opt = optimizer_class(optimizer)(params, lr=1e-4, seed=seed, backend=backend)
        opt.step(lambda: loss_fn(batch))
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
        loss_fn(batch).backward()
        opt.step()
    # the parameters the step trained (the demo's line names them: a 770-parameter head and the 22.7M model differ)
    return {**peak_memory_mb(dev), "trainable_params": float(sum(p.numel() for p in params))}


def measure_in_fresh_process(method: str, train: str, **kwargs: Any) -> dict[str, float]:
    """:func:`measure` in a new interpreter (its high-water mark is its own); raises with its stderr if it fails."""
    cmd = [sys.executable, "-m", "zo_optim.apps.step_memory", "--method", method, "--train", train]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the {method} memory probe failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zo_optim.apps.step_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--train", choices=TRAIN_MODES, default="head")
    p.add_argument("--optimizer", default="mezo")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="zo-optim backend of the zo step (its runtime counts too)")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.method, a.train, optimizer=a.optimizer, batch_size=a.batch_size, max_len=a.max_len,
                             k=a.k, device=a.device, seed=a.seed, backend=a.backend)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
