"""Metrics as pure functions: distinct-n, perplexity, Pareto fronts and hypervolume (the last two from moocore)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams / all word n-grams over ``texts`` (0 when there are none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexity(logprobs: Sequence[Sequence[float]]) -> float:
    """exp(-mean token log-probability) pooled over all tokens of all sequences (nan when empty)."""
    flat = [x for seq in logprobs for x in seq]
    return math.exp(-sum(flat) / len(flat)) if flat else float("nan")


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (all objectives maximised; duplicates of a
    non-dominated point are all kept). Computed by moocore."""
    import moocore
    import numpy as np

    if len(points) == 0:
        return []
    keep = moocore.is_nondominated(np.asarray(points, dtype=float), maximise=True, keep_weakly=True)
    return [int(i) for i in np.flatnonzero(keep)]


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` and bounded below by ``reference`` (all objectives maximised).

    Exact, by moocore (dimension-sweep algorithms, polynomial in the number of points for 2 and 3
    objectives); points not above the reference in every objective contribute nothing.
    """
    import moocore
    import numpy as np

    d = len(reference)
    pts = [tuple(p) for p in points if len(p) == d and all(p[k] > reference[k] for k in range(d))]
    if not pts:
        return 0.0
    return float(moocore.hypervolume(np.asarray(pts, dtype=float), ref=np.asarray(reference, dtype=float), maximise=True))
