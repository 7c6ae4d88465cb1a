"""Metrics as pure functions: distinct-n, perplexity, Pareto fronts and hypervolume."""

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
    """Indices of the points no other point dominates (all objectives maximised)."""
    out = []
    for i, p in enumerate(points):
        dominated = any(all(q[k] >= p[k] for k in range(len(p))) and any(q[k] > p[k] for k in range(len(p))) for j, q in enumerate(points) if j != i)
        if not dominated:
            out.append(i)
    return out


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` and bounded below by ``reference`` (all objectives maximised).

    Exact, by recursive slicing along the last objective; points not above the reference in every
    objective contribute nothing.
    """
    d = len(reference)
    pts = [tuple(p) for p in points if len(p) == d and all(p[k] > reference[k] for k in range(d))]
    if not pts:
        return 0.0
    if d == 1:
        return max(p[0] for p in pts) - reference[0]
    levels = sorted({p[-1] for p in pts}, reverse=True)
    volume = 0.0
    for i, z in enumerate(levels):
        below = levels[i + 1] if i + 1 < len(levels) else reference[-1]
        slab = [p[:-1] for p in pts if p[-1] >= z]
        volume += hypervolume(slab, reference[:-1]) * (z - below)
    return volume
