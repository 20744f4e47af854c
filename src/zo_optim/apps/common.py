"""What the apps and benches share: argument types, thread settings, the cached MiniLM prefix, peak memory.

One home, so that no app imports another app's private names (the demo, the federated CLI,
the step-memory probe, the tweet task and the benches all use these).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import assets

__all__ = [
    "TRAIN_MODES",
    "Cached",
    "encode_cached",
    "peak_memory_mb",
    "peak_rss_mb",
    "positive_float",
    "positive_int",
    "proc_status_mb",
    "select_trainable",
    "serial_numba",
]

#: what ``zo-optim demo --train`` (and the step-memory probe) can train
TRAIN_MODES = ("head", "last-k", "all", "lora")


def positive_int(text: str) -> int:
    """An ``argparse`` type: an int > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite float > 0."""
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def serial_numba() -> None:
    """Keep the cpu backend's numba kernels on the calling thread (used with ``--train head`` on CPU).

    numba's OpenMP pool spin-waits after its parallel regions and takes the cores from torch's
    pool between two forward passes. Measured on the 2-core machine (load ~2-7), ``--train head``,
    MeZO on the cpu backend: 32 ms per step with numba's default 2 threads, 0.74 ms with
    ``NUMBA_NUM_THREADS=1``, 1.1 ms with ``OMP_WAIT_POLICY=PASSIVE``, still 32 ms with
    ``numba.set_num_threads(1)`` (the pool is already running). The variable must be set before
    numba is first imported, and numba and torch share libgomp here, so once numba has launched,
    ``torch.get_num_threads()`` drops to 1 too: harmless for the head (the encoder has run by
    then; a head step is two tiny matmuls) but not for ``last-k``/``all``, where the forwards
    dominate and numba's default threads cost nothing measurable (0.33 s per step with 2 numba
    threads vs 0.40 s with ``numba.set_num_threads(1)``, ``--train last-k --k 1``). Hence only
    for the head, and never over a value the user set.
    """
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_NUM_THREADS", "1")
        return
    import numba

    numba.set_num_threads(1)


def select_trainable(model: assets.SentenceClassifier, mode: str, k: int) -> int:
    """Freeze everything except what ``mode`` trains; return the number of frozen leading encoder layers."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"Invalid train mode: {mode!r} (choose one of {', '.join(TRAIN_MODES)})")
    n_layers = model.num_layers
    if mode == "last-k" and not 1 <= k <= n_layers:
        raise ValueError(f"Invalid k: {k} (the encoder has {n_layers} layers; use 1 <= --k <= {n_layers})")
    model.requires_grad_(mode == "all")
    model.head.requires_grad_(True)
    if mode == "last-k":
        for layer in model.layers[n_layers - k :]:
            layer.requires_grad_(True)
    return model.frozen_prefix_layers()


@dataclass
class Cached:
    """Per-example inputs of the trainable suffix, computed once by the frozen prefix.

    ``rows[i]`` is, depending on ``start`` (the number of frozen encoder layers): the token ids
    (``start == 0``, nothing frozen), the hidden states entering layer ``start`` (unpadded,
    ``[len_i, H]``), or, when only the head trains, the mean-pooled sentence vector ``[H]``
    (pooling has no parameters, so caching its output is exact).
    """

    rows: list[torch.Tensor]
    labels: torch.Tensor  # [N] int64
    pooled: bool

    def __len__(self) -> int:
        return len(self.rows)

    def batch(
        self, index: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        rows = [self.rows[i] for i in index.tolist()]
        y = self.labels[index].to(device)
        if self.pooled:
            return torch.stack(rows).to(device), None, y
        lengths = torch.tensor([r.shape[0] for r in rows])
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).long()
        return padded.to(device), mask.to(device), y


def encode_cached(model: assets.SentenceClassifier, tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
                  start: int, max_len: int, device: torch.device, desc: str, progress: bool) -> Cached:
    """Run the frozen prefix (``start`` encoder layers) once over ``texts``: the trainable suffix's inputs."""
    from tqdm.auto import tqdm

    pooled = start == model.num_layers
    rows: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    # encode in chunks of similar length: less padding, ~1.5x faster than file order on tweets
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunk = 64
    with torch.no_grad(), tqdm(total=len(texts), desc=desc, unit="tweet", disable=not progress, leave=False) as bar:
        for first in range(0, len(texts), chunk):
            index = by_length[first : first + chunk]
            enc = assets.encode(tokenizer, [texts[i] for i in index], max_len)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            lengths = mask.sum(1).tolist()
            if start == 0:  # nothing frozen: the trainable part starts at the embeddings
                out = [ids[j, :n] for j, n in enumerate(lengths)]
            else:
                h = model.features(ids.to(device), mask.to(device), stop=start)
                if pooled:
                    out = list(model.pool(h, mask.to(device)))
                else:
                    out = [h[j, :n] for j, n in enumerate(lengths)]
            for i, row in zip(index, out, strict=True):
                rows[i] = row.clone()  # own storage: a view would keep the whole padded chunk alive
            bar.update(len(index))
    return Cached(rows, torch.tensor(labels, dtype=torch.long), pooled)


def proc_status_mb() -> dict[str, float]:
    """``VmHWM`` (RSS high-water mark) and ``VmRSS`` (RSS now) of this process in MiB; empty off Linux."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """This process's RSS high-water mark in MiB.

    On Linux ``ru_maxrss`` is inherited across fork and kept across exec, so a probe started by a
    bigger process would report its parent's peak (seen: the demo's 829 MiB for both probes);
    ``VmHWM`` in ``/proc/self/status`` belongs to the new address space alone.
    """
    hwm = proc_status_mb().get("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peaks so far: ``peak_rss_mb``, and ``peak_cuda_allocated_mb`` on a CUDA device."""
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
