"""Aggregation of the clients' scalars: one function, three rules, float64 inside and rounded once to float32.

The server aggregates each (local step k, query p) column of the round's valid replies; the rule is
the ``Server``'s ``aggregation`` setting. ``"median"`` and ``"trimmed_mean"`` bound what one client's
scalars can do to the round (``docs/federated.md``, *Security model*).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["AGGREGATIONS", "aggregate"]

AGGREGATIONS = ("mean", "median", "trimmed_mean")


def aggregate(values: np.ndarray, weights: np.ndarray, how: str = "mean", trim_fraction: float = 0.2) -> np.ndarray:
    """Aggregate [n, V] values per column in float64, rounded once to float32.

    ``"mean"``: weighted by ``weights`` (n_examples). ``"median"``: per column (mean of the two middle
    values for even n; unweighted). ``"trimmed_mean"``: drop ``floor(trim_fraction·n)`` smallest and
    largest values per column, unweighted mean of the rest.
    """
    x = np.asarray(values, dtype=np.float64)
    if how == "mean":
        w = np.asarray(weights, dtype=np.float64)
        out = (w[:, None] * x).sum(axis=0) / w.sum()
    elif how == "median":
        out = np.median(x, axis=0)
    elif how == "trimmed_mean":
        n = x.shape[0]
        k = math.floor(trim_fraction * n)
        if 2 * k >= n:
            k = (n - 1) // 2
        out = np.sort(x, axis=0)[k: n - k].mean(axis=0)
    else:
        raise _invalid_aggregation(how)
    return out.astype(np.float32)


def _invalid_aggregation(how: object) -> ValueError:
    return ValueError(f"Invalid aggregation: {how!r} (choose from {', '.join(map(repr, AGGREGATIONS))})")
