"""Intervals and spreads for accuracies, so that no figure is read without its uncertainty.

Why Wilson and not the normal approximation: test splits here are 100 problems and accuracies
sit near 0 % or 100 % as often as in the middle; the normal interval there collapses to a point
(0/100 gives [0, 0]) or leaves [0, 100], while Wilson's stays inside and keeps its width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `correct` / `total`, in percent (95 % by default)."""
    if total <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be within 0-{total}, got {correct}")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return round(100 * max(0.0, centre - half), 1), round(100 * min(1.0, centre + half), 1)


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of per-seed figures; the spread of one value is 0."""
    if not values:
        raise ValueError("no values")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
