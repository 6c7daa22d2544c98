"""Percentile-bootstrap intervals for the evaluation's tables (mask IoU is ``layouts.mask_iou``)."""
from __future__ import annotations

import numpy as np


def bootstrap_draws(units: int, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """``(resamples, units)`` indices drawn with replacement: one resample per row.

    Use the same draws for every quantity that is to be compared, so differences are paired.
    """
    if units < 1:
        raise ValueError(f"bootstrap over {units} units: need at least one")
    return np.random.default_rng(seed).integers(0, units, size=(resamples, units))


def bootstrap_interval(per_unit: np.ndarray, draws: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean over units and its percentile-bootstrap interval."""
    per_unit = np.asarray(per_unit, dtype=float)
    means = per_unit[draws].mean(1)
    tail = 100 * (1 - level) / 2
    return float(per_unit.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
