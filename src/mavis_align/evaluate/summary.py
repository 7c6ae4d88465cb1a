"""Summary statistics of per-response measurements (the evaluator's building block)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def summarize(values: Sequence[float]) -> dict:
    """mean, std, standard error and count."""
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "se": float("nan"), "n": 0}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": mean, "std": std, "se": std / math.sqrt(n), "n": n}
