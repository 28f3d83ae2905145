"""Percentiles of one run and medians with min-max over the interleaved rounds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(ordered: Sequence[float], p: float) -> float:
    """The p-th percentile of already sorted values (nearest rank); 0 for none."""
    if not ordered:
        return 0.0
    return float(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of one measure over the rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
