"""Value-model quality on held-out trees: R² per objective and sibling concordance.

* **R²** = 1 − MSE / Var(targets) over held-out nodes: 0 is a constant predictor, 1 is exact.
* **Sibling concordance**: over pairs of sibling nodes (same parent) whose Monte-Carlo targets
  differ, the fraction that V orders as the targets do (a tie in V counts one half). This is the
  quantity the tilt uses: NORMALIZE compares the candidates of one state, so a model can have a
  good R² from knowing which prompts score high and still order the continuations of one state
  at chance. Its standard error is clustered by tree (pairs of one tree are not independent).

Everything here is a pure function of arrays; :func:`value_quality` runs a model over examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def r_squared(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-column R² of ``pred`` against ``target`` ([N, M] each) -> [M].

    A column whose targets are all equal has no variance to explain: its R² is NaN.
    """
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must both be [N, M], got {pred.shape} and {target.shape}")
    mse = ((pred - target) ** 2).mean(0)
    var = target.var(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, 1.0 - mse / np.where(var > 0, var, 1.0), np.nan)


def sibling_pairs(groups: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Index pairs (i, j), i < j, of examples that share a parent.

    Args:
        groups: per example, (tree id, parent node id); examples with equal keys are siblings.
    """
    by_parent: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(groups):
        by_parent.setdefault((int(key[0]), int(key[1])), []).append(i)
    return [(a, b) for members in by_parent.values() for x, a in enumerate(members) for b in members[x + 1 :]]


def sibling_concordance(pred: np.ndarray, target: np.ndarray, pairs: Sequence[tuple[int, int]], clusters: Sequence[int], *, tol: float = 1e-9) -> dict:
    """Concordance of ``pred`` with ``target`` ([N], one objective) over sibling ``pairs``.

    Pairs whose targets differ by at most ``tol`` carry no order and are skipped.
    Args:
        clusters: [N] cluster id (tree) of each example, for the standard error.
    Returns:
        {"concordance", "se", "pairs", "trees"}; concordance is NaN (and se NaN) without pairs.
    """
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    per_cluster: dict[int, list[float]] = {}
    for a, b in pairs:
        dt = target[a] - target[b]
        if abs(dt) <= tol:
            continue
        dp = pred[a] - pred[b]
        score = 0.5 if dp == 0 else float(np.sign(dp) == np.sign(dt))
        per_cluster.setdefault(int(clusters[a]), []).append(score)
    n = sum(len(v) for v in per_cluster.values())
    if n == 0:
        return {"concordance": float("nan"), "se": float("nan"), "pairs": 0, "trees": 0}
    p = sum(sum(v) for v in per_cluster.values()) / n
    g = len(per_cluster)
    if g > 1:  # ratio estimator, clustered by tree
        resid = np.array([sum(v) - p * len(v) for v in per_cluster.values()])
        se = math.sqrt(g / (g - 1) * float((resid**2).sum())) / n
    else:
        se = math.sqrt(p * (1 - p) / n)
    return {"concordance": p, "se": se, "pairs": n, "trees": g}


def quality_report(pred: np.ndarray, target: np.ndarray, groups: Sequence[tuple[int, int]], objectives: Sequence[str]) -> dict:
    """R² and sibling concordance per objective.

    Args:
        pred, target: [N, M]; groups: per example (tree id, parent node id).
    Returns:
        {"examples", "trees", "per_objective": {name: {"r2", "mse", "target_var", "concordance", "se", "pairs"}}}
    """
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    pairs = sibling_pairs(groups)
    clusters = [int(g[0]) for g in groups]
    r2 = r_squared(pred, target)
    out = {}
    for m, name in enumerate(objectives):
        conc = sibling_concordance(pred[:, m], target[:, m], pairs, clusters)
        out[name] = {
            "r2": _num(r2[m]), "mse": _num(((pred[:, m] - target[:, m]) ** 2).mean()), "target_var": _num(target[:, m].var()),
            "concordance": _num(conc["concordance"]), "concordance_se": _num(conc["se"]), "pairs": conc["pairs"],
        }
    return {"examples": int(len(pred)), "trees": len(set(clusters)), "per_objective": out}


def _num(x: float) -> float | None:
    """JSON-safe float (NaN -> None)."""
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def format_r2(q: dict, missing: str = "-") -> str:
    """R² of one objective's quality entry, 3 decimals (``missing`` when absent)."""
    return missing if q.get("r2") is None else f"{q['r2']:.3f}"


def format_concordance(q: dict, missing: str = "-") -> str:
    """"c ± se" of one objective's quality entry (``missing`` when absent)."""
    return missing if q.get("concordance") is None else f"{q['concordance']:.3f} ± {q.get('concordance_se') or 0:.3f}"


def format_quality(report: dict) -> str:
    """One line per objective: R², concordance ± se over n pairs."""
    lines = []
    for name, q in report["per_objective"].items():
        lines.append(f"{name}: R² {format_r2(q, 'n/a')}, sibling concordance {format_concordance(q, 'n/a')} over {q['pairs']} pairs "
                     f"({report['trees']} held-out trees)")
    return "\n".join(lines)
