"""Small statistics shared by every metric: bootstrap intervals and the metric row."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_mean(values: Sequence[float] | np.ndarray, resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` with a percentile bootstrap interval over its items.

    Args:
        values: one number per item (e.g. 1/0 per image).
        resamples: bootstrap resamples.
        seed: seed of the resampling (intervals are reproducible).
        level: coverage of the interval.

    Returns:
        (mean, lower, upper); NaNs when ``values`` is empty.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def metric_row(method: str, metric: str, split: str, values: Sequence[float] | np.ndarray,
               seed: int = 0) -> dict:
    """One ``evaluation.parquet`` row: the mean of per-item values with its bootstrap interval."""
    value, lo, hi = bootstrap_mean(values, seed=seed)
    return {"method": method, "metric": metric, "split": split, "value": value, "ci_lo": lo,
            "ci_hi": hi, "n": int(np.asarray(values).size)}
