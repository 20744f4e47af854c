"""Non-IID client splits of a labelled dataset (Dirichlet over class proportions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["dirichlet_split"]


def dirichlet_split(
    labels: Sequence[int] | torch.Tensor | np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[list[int]]:
    """Split example indices among ``num_clients`` with class proportions ~ Dirichlet(alpha) per class.

    For every class, a draw p ~ Dir(alpha·1) over the clients assigns that class's (shuffled)
    examples in proportions p. Small ``alpha`` (0.1) gives a few classes per client, large
    (100) is close to IID. Redrawn (up to ``max_tries``) until every client holds at least
    ``min_size`` examples. Deterministic in ``seed``; every index appears exactly once.

    Returns: one sorted list of indices per client.
    """
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"Invalid num_clients: {num_clients!r} (an int >= 1)")
    if not (isinstance(alpha, (int, float)) and alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"Invalid alpha: {alpha!r} (a positive finite concentration)")
    y: Any = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.reshape(-1)
    if y.size < num_clients * min_size:
        raise ValueError(f"{y.size} examples cannot give {num_clients} clients {min_size} each; lower min_size")
    gen = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = np.flatnonzero(y == cls)
            gen.shuffle(idx)
            p = gen.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gave every client {min_size} examples in {max_tries} draws; "
                     "raise alpha or lower min_size")
