"""Methods compared at matched KL, with paired-bootstrap intervals over prompts (issue 30).

A method is a set of evaluated settings ("points": one per beta, lambda, N, ...), each with its
per-prompt mean reward and per-prompt mean KL to pi_ref over the same prompts and seeds as every
other method. What a method reaches within a KL budget kappa is read from its own **envelope**:
the upper concave hull of its points (and, as an option, pi_ref at KL 0), made non-decreasing. A
point of the hull between two measured settings is achievable: answering each prompt with
setting A with probability p, else with B, has reward p r_A + (1-p) r_B and, KL being convex in
the policy, KL <= p KL_A + (1-p) KL_B. Nothing is extrapolated: a budget beyond a method's largest
measured KL gets the best it measured (flagged ``plateau``: what it would reach with more KL is not
known), and a budget below its smallest KL is reached only by mixing with pi_ref (flagged
``mixture_with_ref``; NaN without pi_ref).

Uncertainty: prompts are resampled with replacement, the same indices for every method (paired),
every point's means recomputed, every envelope rebuilt; the interval is the 2.5-97.5 % percentile
range of the replicates. Differences between two methods at a level are taken replicate by
replicate (paired). Hypervolume at a KL budget keeps the points whose KL is within the budget, in
each replicate.

All functions are pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

KL_LEVELS = (1.0, 2.0, 4.0, 8.0, 16.0)  # nats over the response


@dataclass(frozen=True)
class Point:
    """One evaluated setting of a method: per-prompt means over the same P prompts as every other.

    reward: [P] (or [P, M] for fronts), kl: [P] nats, label: what the setting was (e.g. "beta=5").
    """

    reward: np.ndarray
    kl: np.ndarray
    label: str = ""


def per_prompt(values: Sequence[float], samples: int) -> np.ndarray:
    """Per-prompt means of per-response values listed prompt by prompt (``samples`` each) -> [P]."""
    v = np.asarray(values, dtype=float)
    if samples < 1 or v.size % samples:
        raise ValueError(f"{v.size} values are not whole prompts of {samples} samples")
    return v.reshape(-1, samples).mean(1)


def point_of(result: Mapping, objectives: Sequence[str], weights: Sequence[float] | None = None, label: str = "") -> Point:
    """A :class:`Point` from an evaluator result (``evaluate_policy`` / sweep point dict).

    ``weights`` given: the reward is sum_m w_m R_m per prompt ([P]); else the rewards of
    ``objectives`` side by side ([P, M]). The KL is the per-response eq. 7 estimate where the result
    holds it (``kl.values``), plus a best-of-N bound where there is one; an older result without
    per-response KLs gets its mean KL for every prompt (no KL variation in the bootstrap).
    """
    samples = int(result.get("samples", 1))
    cols = [per_prompt(result["rewards"][o]["values"], samples) for o in objectives]
    r = np.stack(cols, 1)
    if weights is not None:
        r = r @ np.asarray(weights, dtype=float)
    kl_info = result["kl"]
    kl = per_prompt(kl_info["values"], samples) if "values" in kl_info else np.full(r.shape[0], float(kl_info["mean"]))
    return Point(r, kl + float(result.get("kl_best_of_n_bound", 0.0)), label)


def envelope(kls: Sequence[float], rewards: Sequence[float]) -> list[tuple[float, float]]:
    """Upper concave hull of (KL, reward) points, non-decreasing in KL: [(kl, reward)] by KL.

    A point that a cheaper point beats is dropped (a budget allows every cheaper setting)."""
    pts = sorted(zip(map(float, kls), map(float, rewards)))
    best: list[tuple[float, float]] = []
    for k, r in pts:  # running maximum: the best reward within each budget
        if best and k == best[-1][0]:
            if r > best[-1][1]:
                best[-1] = (k, r)
            continue
        if not best or r > best[-1][1]:
            best.append((k, r))
    hull: list[tuple[float, float]] = []
    for p in best:  # upper hull (monotone chain)
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def reward_at(hull: Sequence[tuple[float, float]], levels: Sequence[float]) -> np.ndarray:
    """The best reward within each KL budget on the envelope: linear between hull points, the last
    point's reward beyond it (a budget allows every cheaper setting; nothing beyond is claimed), NaN
    below the first point (unreachable without a cheaper setting)."""
    out = np.full(len(levels), np.nan)
    if not hull:
        return out
    ks = np.array([k for k, _ in hull])
    rs = np.array([r for _, r in hull])
    for i, lv in enumerate(levels):
        if lv >= ks[0]:
            out[i] = float(np.interp(min(lv, ks[-1]), ks, rs))
    return out


def _method_levels(points: Sequence[Point], idx: np.ndarray | None, levels: Sequence[float], anchor: Point | None) -> np.ndarray:
    def mean(x: np.ndarray) -> float:
        return float(x.mean() if idx is None else x[idx].mean())

    pts = list(points) + ([anchor] if anchor is not None else [])
    kls = [mean(p.kl) for p in pts]
    rs = [mean(p.reward) for p in pts]
    if anchor is not None:
        kls[-1] = 0.0  # pi_ref itself: KL 0 by definition (its sampled estimate is noise around 0)
    return reward_at(envelope(kls, rs), levels)


def matched_kl(methods: Mapping[str, Sequence[Point]], *, levels: Sequence[float] = KL_LEVELS, anchor: Point | None = None,
               against: str | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Every method's reward at each KL level, with paired-bootstrap intervals over prompts.

    Args:
        methods: {name: its points}; every point over the same prompts (same P, same order).
        levels: KL budgets (nats).
        anchor: pi_ref's point, put at KL 0 in every envelope (mixing with pi_ref is always possible),
            or None (a method is then only read between its own smallest and largest KL).
        against: a method the others are compared with at each level (paired differences), or None.
        n_boot, seed: bootstrap replicates and their seed.
    Returns:
        {"levels", "prompts", "n_boot", "methods": {name: {"min_kl", "max_kl", "at": [{"kl", "reward",
        "lo", "hi", "defined", "mixture_with_ref", "plateau", "diff", "diff_lo", "diff_hi"}]}}}; None where a
        level is below a method's points and there is no anchor.
    """
    names = list(methods)
    sizes = {p.reward.shape[0] for ps in methods.values() for p in ps} | ({anchor.reward.shape[0]} if anchor is not None else set())
    if len(sizes) != 1:
        raise ValueError(f"every point must cover the same prompts; got prompt counts {sorted(sizes)}")
    n_prompts = sizes.pop()
    if against is not None and against not in methods:
        raise ValueError(f"against={against!r} is not one of the methods {names}")
    rng = np.random.default_rng(seed)
    full = {m: _method_levels(methods[m], None, levels, anchor) for m in names}
    boot = {m: np.empty((n_boot, len(levels))) for m in names}
    for b in range(n_boot):
        idx = rng.integers(0, n_prompts, n_prompts)
        for m in names:
            boot[m][b] = _method_levels(methods[m], idx, levels, anchor)
    out = {"levels": list(map(float, levels)), "prompts": n_prompts, "n_boot": n_boot, "anchor": anchor is not None, "against": against, "methods": {}}
    for m in names:
        own = [float(p.kl.mean()) for p in methods[m]]
        rows = []
        for j, lv in enumerate(levels):
            col = boot[m][:, j]
            ok = np.isfinite(col)
            row = {"kl": float(lv), "reward": _num(full[m][j]), "defined": float(ok.mean()),
                   "lo": _num(np.percentile(col[ok], 2.5)) if ok.mean() >= 0.95 else None,
                   "hi": _num(np.percentile(col[ok], 97.5)) if ok.mean() >= 0.95 else None,
                   "mixture_with_ref": bool(own) and lv < min(own), "plateau": bool(own) and lv > max(own)}
            if against is not None and m != against:
                d = col - boot[against][:, j]
                okd = np.isfinite(d)
                row["diff"] = _num(full[m][j] - full[against][j])
                row["diff_lo"] = _num(np.percentile(d[okd], 2.5)) if okd.mean() >= 0.95 else None
                row["diff_hi"] = _num(np.percentile(d[okd], 97.5)) if okd.mean() >= 0.95 else None
            rows.append(row)
        out["methods"][m] = {"min_kl": min(own) if own else None, "max_kl": max(own) if own else None, "at": rows}
    return out


def hypervolume_at_budget(methods: Mapping[str, Sequence[Point]], budget: float, reference: Sequence[float], *, n_boot: int = 2000,
                          seed: int = 0) -> dict:
    """Hypervolume of each method's points whose KL is within ``budget`` nats (points [P, M] rewards),
    with a paired-bootstrap interval over prompts (the points inside the budget can change per replicate).

    Returns {name: {"hypervolume", "lo", "hi", "points_within"}}."""
    from .metrics import hypervolume

    sizes = {p.reward.shape[0] for ps in methods.values() for p in ps}
    if len(sizes) > 1:
        raise ValueError(f"every point must cover the same prompts; got prompt counts {sorted(sizes)}")
    n_prompts = sizes.pop() if sizes else 0

    def hv(points: Sequence[Point], idx: np.ndarray | None) -> tuple[float, int]:
        keep = []
        for p in points:
            k = float(p.kl.mean() if idx is None else p.kl[idx].mean())
            if k <= budget:
                keep.append((p.reward if idx is None else p.reward[idx]).mean(0).tolist())
        return hypervolume(keep, reference), len(keep)

    rng = np.random.default_rng(seed)
    idxs = [rng.integers(0, n_prompts, n_prompts) for _ in range(n_boot)] if n_prompts else []
    out = {}
    for m, pts in methods.items():
        est, n_in = hv(pts, None)
        reps = np.array([hv(pts, i)[0] for i in idxs]) if idxs else np.array([])
        out[m] = {"hypervolume": est, "lo": _num(np.percentile(reps, 2.5)) if reps.size else None,
                  "hi": _num(np.percentile(reps, 97.5)) if reps.size else None, "points_within": n_in}
    return out


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


# ---------------------------------------------------------------------------------- sweeps

KL_BUDGETS = (2.0, 4.0, 8.0)  # hypervolume budgets (nats)


def response_cost(point: Mapping, bon_n: int = 0) -> dict:
    """A sweep point's inference cost per response: wall seconds (decode + any reranking), and reward
    calls (best-of-N, ``bon_n`` candidates, scores each; every other method none at decode time)."""
    n = max(1, int(point.get("prompts", 1)) * int(point.get("samples", 1)))
    bon = str(point.get("method", "")).startswith("bon-")
    return {"seconds": float(point.get("seconds", float("nan"))) / n, "reward_calls": int(bon_n) if bon else 0}


def sweep_matched_kl(points: Sequence[Mapping], objectives: Sequence[str], *, levels: Sequence[float] = KL_LEVELS,
                     budgets: Sequence[float] = KL_BUDGETS, against: str = "mavis", bon_n: int = 0, n_boot: int = 2000, seed: int = 0) -> dict:
    """Matched-KL tables of a sweep: at every lambda, each method's sum_m lambda_m R_m at the KL levels
    (its points at that lambda, pi_ref at KL 0), paired over prompts; and each method's hypervolume
    within each KL budget. ``points``: the sweep's point dicts (``method``, ``lambda``, per-response values);
    a method may have several points at one lambda (e.g. two betas), all of them on its envelope.
    Returns {"lambdas": {key: matched_kl(...)}, "hypervolume": {budget: {...}}, "reference_point", "cost"}."""
    ref = [p for p in points if p["method"] == "ref"]
    if not ref:
        raise ValueError("a matched-KL comparison needs the sweep's `ref` point (pi_ref at KL 0)")
    ref = ref[0]
    by_lam: dict[str, dict[str, list[Point]]] = {}
    for p in points:
        if p["method"] == "ref" or p.get("lambda") is None:
            continue
        key = "/".join(f"{x:g}" for x in p["lambda"])
        by_lam.setdefault(key, {}).setdefault(p["method"], []).append(
            point_of(p, objectives, weights=p["lambda"], label=f"beta={p['beta']}" if p.get("beta") is not None else ""))
    tables = {}
    for key, methods in sorted(by_lam.items()):
        lam = [float(x) for x in key.split("/")]
        if any(x < 0 for x in lam):
            continue  # extrapolated weights (mva) have no pi_ref-mixture reading on the simplex
        tables[key] = matched_kl(methods, levels=levels, anchor=point_of(ref, objectives, weights=lam), against=against if against in methods else None,
                                 n_boot=n_boot, seed=seed)
    fronts: dict[str, list[Point]] = {}
    for p in points:
        if p["method"] != "ref":
            fronts.setdefault(p["method"], []).append(point_of(p, objectives))
    fronts.setdefault("ref", []).append(point_of(ref, objectives))
    means = [pt.reward.mean(0) for pts in fronts.values() for pt in pts]
    reference = np.min(np.stack(means), 0).tolist()
    hv = {f"{b:g}": hypervolume_at_budget(fronts, b, reference, n_boot=n_boot, seed=seed) for b in budgets}
    cost: dict[str, dict] = {}
    for p in points:
        c = response_cost(p, bon_n)
        acc = cost.setdefault(p["method"], {"seconds": [], "reward_calls": c["reward_calls"]})
        acc["seconds"].append(c["seconds"])
    cost = {m: {"seconds_per_response": float(np.nanmean(c["seconds"])), "reward_calls_per_response": c["reward_calls"]} for m, c in cost.items()}
    return {"objectives": list(objectives), "levels": list(levels), "lambdas": tables, "hypervolume": hv, "reference_point": reference,
            "reference_point_rule": "componentwise minimum mean reward over every point of every method", "cost": cost,
            "kl_per_response": all("values" in p["kl"] for p in points)}


def format_cell(row: Mapping) -> str:
    """One level of :func:`matched_kl` as a table cell: reward [95 % interval], ᵐ mixture with pi_ref, ᵖ plateau; – without a value."""
    if row["reward"] is None:
        return "–"
    ci = f" [{row['lo']:.3f}, {row['hi']:.3f}]" if row.get("lo") is not None else ""
    return f"{row['reward']:.3f}{ci}" + ("ᵐ" if row.get("mixture_with_ref") else "") + ("ᵖ" if row.get("plateau") else "")


def render_sweep_matched(summary: Mapping) -> list[str]:
    """Markdown tables of :func:`sweep_matched_kl`."""
    objs, levels = summary["objectives"], summary["levels"]
    cost = summary["cost"]

    out = ["## At matched KL", "",
           "The best Σλ·R within each KL budget on each method's own envelope (upper concave hull of its points and π_ref at KL 0), "
           "with 95 % paired-bootstrap intervals over prompts; ᵐ: below the method's cheapest own point, reached by mixing with π_ref; "
           "ᵖ: beyond its largest KL, its best measured point (nothing extrapolated). Cost: wall seconds per response on this machine, reward-model calls per "
           "response (best-of-N's N)." + ("" if summary.get("kl_per_response") else
                                           " These points predate per-response KLs: each point's KL is its mean for every prompt (intervals from rewards only)."), ""]
    for key, table in summary["lambdas"].items():
        lam = ", ".join(f"{o}={x}" for o, x in zip(objs, key.split("/")))
        out += [f"### λ: {lam}", "", "| method | own KL range | " + " | ".join(f"{lv:g} nats" for lv in levels) + " | s / response | reward calls |",
                "|---" * (len(levels) + 4) + "|"]
        for m, info in table["methods"].items():
            rng = f"{info['min_kl']:.1f}–{info['max_kl']:.1f}" if info["min_kl"] is not None else "-"
            c = cost.get(m, {})
            out.append(f"| {m} | {rng} | " + " | ".join(format_cell(r) for r in info["at"])
                       + f" | {c.get('seconds_per_response', float('nan')):.2f} | {c.get('reward_calls_per_response', 0)} |")
        if table.get("against"):
            a = table["against"]
            diffs = []
            for m, info in table["methods"].items():
                if m == a:
                    continue
                for r in info["at"]:
                    if r.get("diff") is not None and r.get("diff_lo") is not None:
                        sign = "ahead" if r["diff_lo"] > 0 else ("behind" if r["diff_hi"] < 0 else "tied")
                        diffs.append(f"{m} − {a} at {r['kl']:g} nats: {r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}] ({sign})")
            if diffs:
                out += ["", "Paired differences (95 % bootstrap): " + "; ".join(diffs) + "."]
        out.append("")
    out += ["### Hypervolume within a KL budget", "",
            f"Reference point {', '.join(f'{o}={r:.3f}' for o, r in zip(objs, summary['reference_point']))} ({summary['reference_point_rule']}); "
            "only points whose mean KL is within the budget count (per replicate); 95 % paired-bootstrap intervals.", "",
            "| method | " + " | ".join(f"≤ {b} nats" for b in summary["hypervolume"]) + " |", "|---" * (len(summary["hypervolume"]) + 1) + "|"]
    methods = list(next(iter(summary["hypervolume"].values())))
    for m in methods:
        cells = []
        for b, hv in summary["hypervolume"].items():
            h = hv[m]
            cells.append(f"{h['hypervolume']:.4f} [{h['lo']:.4f}, {h['hi']:.4f}] ({h['points_within']} pts)" if h["lo"] is not None else f"{h['hypervolume']:.4f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out + [""]


# ---------------------------------------------------------------------------------- verdict rules at matched KL

HOLDS, FAILS, MIXED = "holds", "does not hold", "mixed"  # the report's words
VERDICT_BUDGET = 4.0  # nats over the response: where the training-time rivals of the study sit (1.4-3.4)


def verdict_single(table: Mapping, method: str, rival: str, kl: float) -> dict:
    """Claim 1 at matched KL, for one objective: ``method`` reaches ``rival``'s reward at the rival's own KL.

    ``table``: :func:`matched_kl` with ``against=rival`` and ``kl`` among its levels. Rule (fixed for
    the final-split rerun): with d = method − rival at ``kl`` and its 95 % paired interval [lo, hi]:
    hi < 0 → does not hold; hi >= 0 and the method has an own point at KL <= ``kl`` → holds;
    hi >= 0 but reached only by mixing with pi_ref → mixed (the method was not run where the rival is).
    """
    row = next(r for r in table["methods"][method]["at"] if abs(r["kl"] - kl) < 1e-9)
    lo, hi = row.get("diff_lo"), row.get("diff_hi")
    if hi is None:
        verdict = MIXED
    elif hi < 0:
        verdict = FAILS
    else:
        verdict = MIXED if row["mixture_with_ref"] else HOLDS
    return {"verdict": verdict, "kl": kl, "diff": row.get("diff"), "lo": lo, "hi": hi, "mixture_with_ref": row["mixture_with_ref"]}


def verdict_front(summary: Mapping, rival: str, *, method: str = "mavis", budget: float = VERDICT_BUDGET) -> dict:
    """Claims 3, 4, 7, 8 at matched KL: ``method`` beats ``rival`` at every lambda within ``budget`` nats.

    ``summary``: :func:`sweep_matched_kl` with ``against=method`` (its differences are rival − method).
    Rule (fixed for the final-split rerun): at each lambda where both were run, the 95 % paired interval
    of rival − method at ``budget``: all upper ends < 0 → holds (the method ahead everywhere); some lower
    end > 0 → does not hold (the rival ahead somewhere); otherwise mixed (tied somewhere)."""
    rows = []
    for lam, table in summary["lambdas"].items():
        if rival not in table["methods"] or method not in table["methods"] or table.get("against") != method:
            continue
        r = next(x for x in table["methods"][rival]["at"] if abs(x["kl"] - budget) < 1e-9)
        rows.append({"lambda": lam, "diff": r.get("diff"), "lo": r.get("diff_lo"), "hi": r.get("diff_hi")})
    if not rows or any(r["lo"] is None for r in rows):
        verdict = MIXED
    elif any(r["lo"] > 0 for r in rows):
        verdict = FAILS
    elif all(r["hi"] < 0 for r in rows):
        verdict = HOLDS
    else:
        verdict = MIXED
    return {"verdict": verdict, "rival": rival, "method": method, "budget": budget, "rows": rows}


def combine(verdicts: Sequence[str]) -> str:
    """One verdict from several: holds if all hold, does not hold if none does, else mixed."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    if verdicts and all(v == FAILS for v in verdicts):
        return FAILS
    return MIXED
