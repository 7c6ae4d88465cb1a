"""REPORT.md of a reproduction study: one verdict per paper claim, with the numbers behind it.

The verdict rules are pure functions of the evaluator's JSON results (tested on hand-built dicts);
:func:`write_report` reads a study folder (see :mod:`mavis_align.study`), applies them and renders
markdown plus figures. Verdicts are "holds", "does not hold" or "mixed"; each comes with the rule
that produced it, so a reader can disagree with the rule rather than with a number.

Rewards are compared with their standard errors (se, over sampled responses); "within noise"
means a difference smaller than the combined se sqrt(se_a^2 + se_b^2).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .generation import DEFAULT_TOP_K

HOLDS, FAILS, MIXED = "holds", "does not hold", "mixed"
PAPER_DISTILL_GAP = 0.121  # largest reward gap of the distilled model in the paper's Table 3


def _combine(verdicts: list[bool]) -> str:
    if verdicts and all(verdicts):
        return HOLDS
    if not any(verdicts):
        return FAILS
    return MIXED


def _se(*ses: float) -> float:
    return math.sqrt(sum(s * s for s in ses))


def reward_at_kl(curve: list[tuple[float, float, float]], kl: float) -> tuple[float, float, bool]:
    """Linear interpolation of a reward-vs-KL curve at ``kl``.

    Args:
        curve: (kl, reward, se) points; pi_ref belongs in it as (0, r_ref, se_ref).
    Returns:
        (reward, se, inside): se of the nearer bracketing point; ``inside`` False when ``kl`` lies
        beyond the largest KL of the curve (then the reward of that last point is returned: no
        extrapolation).
    """
    pts = sorted(curve)
    if not pts:
        raise ValueError("empty curve")
    if kl <= pts[0][0]:
        return pts[0][1], pts[0][2], True
    for (k0, r0, s0), (k1, r1, s1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            t = 0.0 if k1 == k0 else (kl - k0) / (k1 - k0)
            return r0 + t * (r1 - r0), s0 if t < 0.5 else s1, True
    return pts[-1][1], pts[-1][2], False


def _mean(res: dict, objective: str) -> tuple[float, float]:
    r = res["rewards"][objective]
    return r["mean"], r["se"]


def mavis_curve(points: dict[str, dict], objective: str, iteration: int, betas: list[float]) -> list[dict]:
    """The MAVIS points of one objective and iteration, ordered by beta."""
    from .study_layout import point_name

    out = []
    for b in betas:
        res = points.get(point_name(iteration, objective, b))
        if res is not None:
            r, se = _mean(res, objective)
            out.append({"beta": float(b), "reward": r, "se": se, "kl": res["kl"]["mean"]})
    return out


def steering(betas: list[float]) -> list[float]:
    """The betas that steer (beta 0 is top-k sampling of pi_ref: reported, never credited to MAVIS)."""
    return [float(b) for b in betas if float(b) > 0]


def claim_single(points: dict[str, dict], objectives: list[str], iterations: dict[str, int], betas: list[float]) -> dict:
    """Claim 1: MAVIS reaches the RL policy's reward at a similar or lower KL, per objective.

    Rule: on the reward-vs-KL curve of MAVIS (every iteration's points plus pi_ref at KL 0, upper
    envelope), the reward interpolated at the RL policy's KL is at least the RL reward minus the
    combined se. Also reported: the best MAVIS reward at any KL.
    """
    rows, ok = [], []
    betas = steering(betas)
    for m in objectives:
        ref_r, ref_se = _mean(points["ref"], m)
        rl = points[f"rl-{m}"]
        rl_r, rl_se = _mean(rl, m)
        rl_kl = rl["kl"]["mean"]
        pts = [p for i in range(iterations[m] + 1) for p in mavis_curve(points, m, i, betas)]
        curve = upper_envelope([(0.0, ref_r, ref_se)] + [(p["kl"], p["reward"], p["se"]) for p in pts])
        at, at_se, _ = reward_at_kl(curve, rl_kl)
        inside = bool(pts) and rl_kl <= max(p["kl"] for p in pts)
        diff = at - rl_r
        holds = diff >= -_se(at_se, rl_se)
        ok.append(holds)
        best = max(pts, key=lambda p: p["reward"]) if pts else None
        rows.append({"objective": m, "ref_reward": ref_r, "rl_reward": rl_r, "rl_se": rl_se, "rl_kl": rl_kl, "mavis_at_rl_kl": at, "mavis_at_rl_kl_se": at_se,
                     "diff": diff, "inside_curve": inside, "holds": holds, "best_mavis": best})
    return {"claim": 1, "verdict": _combine(ok), "rows": rows}


def upper_envelope(curve: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Upper envelope in KL order: a point is kept when its reward beats every point of lower KL.

    Linear interpolation between kept points is achievable: the response-level mixture "with
    probability p answer with policy A, else with B" has reward p r_A + (1-p) r_B and, KL being
    convex, KL <= p KL_A + (1-p) KL_B. So the interpolated reward at a KL is a lower bound of what
    the method reaches within that KL budget (pi_ref at KL 0 is one end)."""
    out: list[tuple[float, float, float]] = []
    for p in sorted(curve):
        if not out or p[1] > out[-1][1]:
            out.append(p)
    return out


def claim_iteration(points: dict[str, dict], objectives: list[str], iterations: dict[str, int], betas: list[float]) -> dict:
    """Claim 2: a later iteration gives higher reward at the same or lower KL than iteration 0,
    for at least one objective.

    Rule: every later iteration i is judged against iteration 0: for each beta, its point (KL k,
    reward r) is compared with iteration 0's curve (plus pi_ref) interpolated at k, only where k
    lies within that curve; iteration i improves an objective when some point beats that curve by
    more than the combined se and none loses by more.
    """
    rows, improved = [], []
    betas = steering(betas)
    for m in objectives:
        if iterations[m] == 0:
            rows.append({"objective": m, "iteration": 0, "points": [], "improved": False, "note": "no later iteration"})
            continue
        ref_r, ref_se = _mean(points["ref"], m)
        curve0 = [(0.0, ref_r, ref_se)] + [(p["kl"], p["reward"], p["se"]) for p in mavis_curve(points, m, 0, betas)]
        for it in range(1, iterations[m] + 1):
            cmp = []
            for p in mavis_curve(points, m, it, betas):
                r0, s0, inside = reward_at_kl(curve0, p["kl"])
                cmp.append({**p, "iter0_at_kl": r0, "diff": p["reward"] - r0, "se": _se(p["se"], s0), "inside": inside})
            same_beta = list(zip(mavis_curve(points, m, 0, betas), mavis_curve(points, m, it, betas)))
            valid = [c for c in cmp if c["inside"]]
            better = any(c["diff"] > c["se"] for c in valid)
            worse = any(c["diff"] < -c["se"] for c in valid)
            rows.append({"objective": m, "iteration": it, "points": cmp, "improved": better and not worse, "some_better": better, "some_worse": worse,
                         "same_beta": [{"beta": a["beta"], "iter0": a["reward"], "iter0_kl": a["kl"], "last": b["reward"], "last_kl": b["kl"]} for a, b in same_beta]})
            improved.append(better and not worse)
    verdict = HOLDS if any(improved) else (MIXED if any(r.get("some_better") for r in rows) else FAILS)
    # the rule as first written (before the first results widened it to "any later iteration"): only each
    # objective's final iteration is judged against iteration 0
    final = [r for r in rows if r["iteration"] > 0 and r["iteration"] == iterations[r["objective"]]]
    verdict_final = HOLDS if any(r["improved"] for r in final) else (MIXED if any(r.get("some_better") for r in final) else FAILS)
    return {"claim": 2, "verdict": verdict, "rows": rows, "verdict_final_iteration_rule": verdict_final}


def weighted(point: dict, objectives: list[str]) -> float:
    """sum_m lambda_m R_m of a front point (from fronts.json)."""
    return sum(l * point["rewards"][o] for l, o in zip(point["lambda"], objectives))


def claim_fronts(fronts: dict) -> dict:
    """Claim 3: the MAVIS front dominates RSoup and MOD by hypervolume, and is close to MORLHF where
    MORLHF was trained.

    Rule: hypervolume(mavis) > hypervolume(rsoup) and > hypervolume(mod); at each MORLHF lambda,
    MAVIS's weighted reward sum_m lambda_m R_m is at least MORLHF's minus 0.02 (close).
    """
    objs, methods = fronts["objectives"], fronts["methods"]
    hv = {m: info["hypervolume"] for m, info in methods.items()}
    dom = [hv.get("mavis", 0.0) > hv[b] for b in ("rsoup", "mod") if b in hv]
    close = []
    rows = []
    for pt in methods.get("morlhf", {}).get("points", []):
        lam = pt["lambda"]
        mav = next((p for p in methods.get("mavis", {}).get("points", []) if _same(p["lambda"], lam)), None)
        if mav is None:
            continue
        w_m, w_rl = weighted(mav, objs), weighted(pt, objs)
        close.append(w_m >= w_rl - 0.02)
        rows.append({"lambda": lam, "mavis": w_m, "mavis_kl": mav["kl"], "morlhf": w_rl, "morlhf_kl": pt["kl"]})
    verdict = _combine(dom + close)
    return {"claim": 3, "verdict": verdict, "hypervolume": hv, "morlhf": rows, "dominates": dom, "close": close}


def _same(a, b) -> bool:
    return a is not None and b is not None and all(abs(x - y) < 1e-6 for x, y in zip(a, b))


def claim_search(fronts: dict) -> dict:
    """Claim 4: MAVIS beam search (N beams) beats best-of-N of the baselines.

    Rule: at each lambda, the weighted reward of mavis-beam exceeds that of every bon-* method.
    """
    objs, methods = fronts["objectives"], fronts["methods"]
    bons = [m for m in methods if m.startswith("bon-")]
    rows, wins = [], []
    for pt in methods.get("mavis-beam", {}).get("points", []):
        lam = pt["lambda"]
        others = {}
        for b in bons:
            q = next((p for p in methods[b]["points"] if _same(p["lambda"], lam)), None)
            if q is not None:
                others[b] = weighted(q, objs)
        w = weighted(pt, objs)
        win = bool(others) and all(w > v for v in others.values())
        wins.append(win)
        rows.append({"lambda": lam, "mavis-beam": w, "kl": pt["kl"], **others, "wins": win})
    hv = {m: methods[m]["hypervolume"] for m in ["mavis-beam", *bons] if m in methods}
    return {"claim": 4, "verdict": _combine(wins), "rows": rows, "hypervolume": hv}


def claim_conditioned(fronts: dict) -> dict | None:
    """Claim 7 (paper v3): MAVIS's front beats a single preference-conditioned value model and a
    preference-conditioned policy. None when the sweep has neither.

    Rule: hypervolume(mavis) > hypervolume(mavis-conditioned) and > hypervolume(moodpo), for those
    in the sweep (same reference point as claim 3).
    """
    return _against(fronts, ("mavis-conditioned", "moodpo"), 7)


NEIGHBOURS = ("mavis-step", "mahalo", "mahalo-step", "mva")


def claim_neighbours(fronts: dict) -> dict | None:
    """Claim 8 (issue 17, not a paper claim): MAVIS's token-level front beats the neighbouring systems
    run in the same harness. None when the sweep has none of them.

    Rule: hypervolume(mavis) > hypervolume of each of mavis-step (step-level value guidance), mahalo
    (multi-head DPO policy), mahalo-step (its heads + step-level guidance) and mva (decorrelated
    adapters, extrapolated), for those in the sweep (same reference point as claim 3). KL differs
    between methods and is reported beside every point; step-level KLs are upper bounds.
    """
    return _against(fronts, NEIGHBOURS, 8)


def matched_kl(sweeps: dict[str, dict], rivals: list[str], primary: str = "sweep") -> list[dict]:
    """Every rival point of the primary sweep beside MAVIS at the same KL: MAVIS's weighted reward at
    that lambda interpolated on the upper envelope of pi_ref (KL 0) and every sweep's MAVIS point
    at that lambda (one per beta). ``sweeps``: name -> {"fronts", "se"}; se(method, lambda) is the
    standard error of that point's sum lambda R."""
    objs = sweeps[primary]["fronts"]["objectives"]
    ref = next(iter(sweeps[primary]["fronts"]["methods"].get("ref", {}).get("points", [])), None)
    rows = []
    for m in rivals:
        for pt in sweeps[primary]["fronts"]["methods"].get(m, {}).get("points", []):
            lam = pt["lambda"]
            curve = []
            if ref is not None:
                curve.append((0.0, weighted({**ref, "lambda": lam}, objs), sweeps[primary]["se"]("ref", lam)))
            for sw in sweeps.values():
                q = next((p for p in sw["fronts"]["methods"].get("mavis", {}).get("points", []) if _same(p["lambda"], lam)), None)
                if q is not None:
                    curve.append((q["kl"], weighted(q, objs), sw["se"]("mavis", lam)))
            if len(curve) < 2:
                continue  # e.g. an extrapolated lambda: MAVIS has no point there
            at, at_se, inside = reward_at_kl(upper_envelope(curve), pt["kl"])
            mine, mine_se = weighted(pt, objs), sweeps[primary]["se"](m, lam)
            rows.append({"method": m, "lambda": lam, "weighted": mine, "se": mine_se, "kl": pt["kl"], "mavis_at_kl": at, "mavis_se": at_se,
                         "inside": inside, "diff": mine - at, "z": (mine - at) / _se(mine_se, at_se) if _se(mine_se, at_se) > 0 else None})
    return rows


def _against(fronts: dict, candidates, number: int) -> dict | None:
    """MAVIS's hypervolume against each rival present, and the per-lambda weighted rewards (KL)."""
    objs, methods = fronts["objectives"], fronts["methods"]
    rivals = [m for m in candidates if m in methods]
    if not rivals or "mavis" not in methods:
        return None
    hv = {m: methods[m]["hypervolume"] for m in ["mavis", *rivals]}
    wins = [hv["mavis"] > hv[m] for m in rivals]
    rows = []
    for pt in methods["mavis"]["points"]:
        row = {"lambda": pt["lambda"], "mavis": weighted(pt, objs), "mavis_kl": pt["kl"]}
        for m in rivals:
            q = next((p for p in methods[m]["points"] if _same(p["lambda"], pt["lambda"])), None)
            if q is not None:
                row[m], row[f"{m}_kl"] = weighted(q, objs), q["kl"]
        rows.append(row)
    extra = {m: [p for p in methods[m]["points"] if not any(_same(p["lambda"], q["lambda"]) for q in methods["mavis"]["points"])]
             for m in rivals}  # e.g. mva's extrapolated lambdas
    return {"claim": number, "verdict": _combine(wins), "hypervolume": hv, "rows": rows, "rivals": rivals,
            "off_grid": {m: [{"lambda": p["lambda"], "weighted": weighted(p, objs), "rewards": p["rewards"], "kl": p["kl"]} for p in v]
                         for m, v in extra.items() if v}}


def across_betas(verdicts: list[str]) -> str:
    """One verdict from the same claim judged at several MAVIS betas: theirs when they agree,
    else mixed."""
    return verdicts[0] if len(set(verdicts)) == 1 else MIXED


def claim_distill(separate: dict[str, dict], distilled: dict[str, dict], speed: dict) -> dict:
    """Claim 5: the distilled multi-head model stays close to the separate ones and decodes faster.

    Rule: |reward gap| <= 0.121 (the paper's largest, Table 3) for every objective, and the one
    multi-head model decodes faster than the separate models.
    """
    rows, ok = [], []
    for m in separate:
        a, sa = _mean(separate[m], m)
        b, sb = _mean(distilled[m], m)
        within = abs(a - b) <= PAPER_DISTILL_GAP
        ok.append(within)
        rows.append({"objective": m, "separate": a, "separate_se": sa, "distilled": b, "distilled_se": sb, "gap": a - b,
                     "separate_kl": separate[m]["kl"]["mean"], "distilled_kl": distilled[m]["kl"]["mean"], "within": within})
    faster = speed.get("speedup", 0.0) > 1.0
    return {"claim": 5, "verdict": _combine(ok + [faster]), "rows": rows, "speed": speed, "faster": faster}


def claim_cost(value_costs: dict[str, float], rl_seconds: dict[str, float], objectives: list[str]) -> dict:
    """Claim 6: MAVIS's training compute (rollout trees + value models, every iteration) is of the
    same order as fine-tuning the per-objective policies RSoup and MOD need.

    Rule (the paper: 21.5 vs 17 GPU-hours, 1.26x): ratio <= 2 holds, <= 4 mixed, else does not.
    """
    collect = sum(v for k, v in value_costs.items() if k.startswith("collect:"))
    train = sum(v for k, v in value_costs.items() if k.startswith("train:"))
    per_obj = sum(rl_seconds[f"rl-{m}"] for m in objectives if f"rl-{m}" in rl_seconds)
    morlhf = {k: v for k, v in rl_seconds.items() if k.startswith("rl-morlhf")}
    ratio = (collect + train) / per_obj if per_obj else float("inf")
    verdict = HOLDS if ratio <= 2 else (MIXED if ratio <= 4 else FAILS)
    return {"claim": 6, "verdict": verdict, "collect_seconds": collect, "train_seconds": train, "value_total": collect + train,
            "rl_per_objective_total": per_obj, "morlhf": morlhf, "ratio": ratio}


# ------------------------------------------------------------------------------ rendering


def _f(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def _plot_single(points: dict, objectives: list[str], iterations: dict[str, int], betas: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 4))
    axes = axes if len(objectives) > 1 else [axes]
    for ax, m in zip(axes, objectives):
        ref_r, _ = _mean(points["ref"], m)
        ax.plot([0], [ref_r], "ks", label="π_ref")
        rl = points[f"rl-{m}"]
        ax.errorbar([rl["kl"]["mean"]], [rl["rewards"][m]["mean"]], yerr=[rl["rewards"][m]["se"]], fmt="r^", label="RL (GRPO+LoRA)")
        for i in range(iterations[m] + 1):
            c = mavis_curve(points, m, i, betas)
            ax.errorbar([p["kl"] for p in c], [p["reward"] for p in c], yerr=[p["se"] for p in c], fmt="o-", label=f"MAVIS iter {i}")
            for p in c:
                ax.annotate(f"β={p['beta']:g}", (p["kl"], p["reward"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("KL to π_ref (nats, eq. 7)")
        ax.set_ylabel(f"{m} reward")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scale(out: Path, spec) -> dict:
    from .collect.store import read_trees

    files = sorted((out / "mavis").glob("iter*/**/trees.h5")) if (out / "mavis").exists() else []
    trees = nodes = tokens = 0
    for f in files:
        data, _, _ = read_trees(f)
        trees += len(data.trees)
        for t in data.trees:
            nodes += len(t.nodes) - 1
            tokens += sum(len(n.tokens) for n in t.nodes)
    return {"tree_files": len(files), "trees": trees, "nodes": nodes, "generated_tokens": tokens}


def build(out: Path, spec) -> tuple[dict, dict]:
    """Every claim's verdict dict plus the context (scale, costs) from a finished study folder."""
    from .study_layout import final_value_dir, load_points

    r = spec.recipe
    objs = list(r.objectives)
    betas = [float(b) for b in spec.single["betas"]]
    points = load_points(out / "single" / "points")
    iterations = {m: final_value_dir(out / "mavis", m)[0] for m in objs}
    claims = {1: claim_single(points, objs, iterations, betas), 2: claim_iteration(points, objs, iterations, betas)}
    # the primary sweep (KL-matched or fixed beta) and any extra-beta sweeps
    sweeps = {}
    for folder in [out / "sweep", *sorted(out.glob("sweep-beta*"))]:
        if (folder / "fronts.json").exists():
            f = json.loads((folder / "fronts.json").read_text())
            sweeps[folder.name] = {"fronts": f, "spec": json.loads((folder / "sweep.json").read_text()),
                                   "claim3": claim_fronts(f), "claim4": claim_search(f), "claim7": claim_conditioned(f),
                                   "claim8": claim_neighbours(f),
                                   "fronts_md": (folder / "fronts.md").read_text(),
                                   "judge_md": (folder / "judge.md").read_text() if (folder / "judge.md").exists() else None}
    fronts = sweeps["sweep"]["fronts"]
    claims[3] = {**sweeps["sweep"]["claim3"], "verdict": across_betas([v["claim3"]["verdict"] for v in sweeps.values()])}
    claims[4] = {**sweeps["sweep"]["claim4"], "verdict": across_betas([v["claim4"]["verdict"] for v in sweeps.values()])}
    if sweeps["sweep"]["claim7"] is not None:
        claims[7] = {**sweeps["sweep"]["claim7"], "verdict": across_betas([v["claim7"]["verdict"] for v in sweeps.values() if v["claim7"]])}
        cond = out / "conditioned"
        claims[7]["value_quality"] = {p.parent.parent.name: json.loads((p.parent / "result.json").read_text()).get("quality")
                                      for p in sorted(cond.glob("iter*/value/best")) if (p.parent / "result.json").exists()}
    if sweeps["sweep"]["claim8"] is not None:
        claims[8] = {**sweeps["sweep"]["claim8"], "verdict": across_betas([v["claim8"]["verdict"] for v in sweeps.values() if v["claim8"]])}
        with_se = {name: {"fronts": sw["fronts"], "se": _weighted_se(out / name, sw["fronts"]["objectives"])} for name, sw in sweeps.items()}
        claims[8]["matched_kl"] = matched_kl(with_se, claims[8]["rivals"])
        nb = out / "neighbours"
        claims[8]["training"] = {p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k in ("train_seconds", "multihead", "decorrelated")}
                                 for p in sorted(nb.glob("*/mavis_policy.json"))}
    ev = out / "distill" / "eval"
    claims[5] = claim_distill({m: json.loads((ev / f"separate-{m}.json").read_text()) for m in objs},
                              {m: json.loads((ev / f"distilled-{m}.json").read_text()) for m in objs}, json.loads((ev / "speed.json").read_text()))
    claims[5]["distill_result"] = json.loads((out / "distill" / "result.json").read_text())
    value_costs = json.loads((out / "mavis" / "costs.json").read_text())
    rl = {p.name: json.loads((p / "mavis_policy.json").read_text())["train_seconds"] for p in sorted((out / "baselines").glob("rl-*"))}
    claims[6] = claim_cost(value_costs, rl, objs)
    stages = json.loads((out / "costs.json").read_text()) if (out / "costs.json").exists() else {}
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    summary = out / "mavis" / "summary.json"
    context = {"points": points, "iterations": iterations, "betas": betas, "fronts": fronts, "sweeps": sweeps, "stages": stages, "sweep": sweep,
               "scale": _scale(out, spec), "rl_seconds": rl,
               "value_quality": json.loads(summary.read_text())["iterations"] if summary.exists() else []}
    # the same claims judged at matched KL, with paired-bootstrap intervals (evaluate.matched's rules), beside the raw verdicts
    from .evaluate.matched_study import study_matched_kl

    context["matched_kl"] = study_matched_kl(out, objs, {str(k): v["verdict"] for k, v in claims.items()}, n_boot=1000)
    return claims, context


def render(claims: dict, ctx: dict, spec, out: Path, command: str) -> str:
    from .study import STAGES

    r, e = spec.recipe, spec.evaluation
    objs = list(r.objectives)
    sc, st = ctx["scale"], ctx["stages"]
    hours = sum(st.values()) / 3600
    L = [f"# Reproduction report: {spec.name}", "",
         "Every claim of the MAVIS paper that issue 7 lists, re-measured on this machine's scale. Generated by",
         f"`{command}` from `{out}` (resumable; rerunning it rewrites this file from the stored results).",
         "Every evaluated point (rewards, KL, fluency, diversity, length, speed, example responses) is under `data/` next to the",
         "copy of this report (`--report DIR`), so each number below can be traced to its measurement.", "",
         "## Verdicts", "", "| # | claim | verdict |", "|---|---|---|"]
    names = {1: "single objective: MAVIS reaches the RL policy's reward at similar or lower KL",
             2: "iteration: a later iteration beats iteration 0 at the same or lower KL (≥ 1 objective)",
             3: "multi-objective: MAVIS front dominates RSoup and MOD (hypervolume), close to MORLHF",
             4: "search: MAVIS beam search (N beams) beats best-of-N of the baselines",
             5: f"distillation: multi-head model within {PAPER_DISTILL_GAP} reward of the separate ones, faster",
             6: "cost: value-model training compute of the same order as fine-tuning the baselines",
             7: "preference-conditioned (v3): MAVIS front beats one conditioned value model V(s, λ) and one conditioned policy (hypervolume)",
             8: "neighbours (not a paper claim): MAVIS front beats step-level guidance, MAHALO-style heads and MVA-style adapters (hypervolume)"}
    for k in sorted(claims):
        L.append(f"| {k} | {names[k]} | **{claims[k]['verdict']}** |")
    L += ["", "Each verdict follows the rule printed under its claim. To recompute only some stages after a change, add",
          "`--stages single,sweep,report` (stages: " + ", ".join(STAGES) + "); finished work is reused."]
    L += ["", "## Scale and setup", "",
          f"- Base model π_ref: `{r.model}`; objectives (rewards): {', '.join(objs)}; data set `{r.dataset}`.",
          f"- Value models: backbone `{r.backbone}`; iteration 0 on {r.train_prompts} train prompts' trees (tree {json.dumps(r.tree)}); "
          f"{len(r.rounds)} further round(s) {[{'beta': x.beta, 'zeta': x.zeta} for x in r.rounds]}.",
          f"- Trees collected: {sc['trees']} in {sc['tree_files']} files, {sc['nodes']} nodes, {sc['generated_tokens']} generated tokens.",
          f"- RL baselines: LoRA + KL-penalised GRPO (TRL), {spec.rl_config.steps} steps × {spec.rl_config.prompts_per_step} prompts × "
          f"{spec.rl_config.num_generations} samples, KL coefficient {spec.rl_config.kl_beta}, on {spec.baselines.get('prompts', 160)} train prompts; "
          f"MORLHF at λ_1 ∈ {spec.baselines.get('morlhf', [])} for ({', '.join(spec.pair)}).",
          f"- Evaluation: {e.get('prompts', 16)} held-out `{spec.eval_split}` prompts × {e.get('samples', 2)} samples, ≤ {e.get('max_new_tokens', 40)} new tokens, "
          f"top-k {e.get('top_k', DEFAULT_TOP_K)}, seed {e.get('seed', 0)}; KL by eq. 7 (teacher-forced π_ref, full vocabulary); ± is one standard error.",
          f"- Wall time (2-core CPU, no GPU): {hours:.2f} h in all; per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in st.items()) + ".", ""]

    L += _quality_section(ctx.get("value_quality", []), claims[5].get("distill_result", {}))
    L += _reading(claims, ctx, spec)

    # claim 1
    c = claims[1]
    L += ["## Claim 1: single objective (paper Table 2)", "", _rule(claim_single), "",
          "| objective | π_ref | RL reward | RL KL | MAVIS at RL's KL | difference (z) | MAVIS best (β, KL) | holds |", "|---|---|---|---|---|---|---|---|"]
    for row in c["rows"]:
        b = row["best_mavis"]
        best = f"{_f(b['reward'])} (β={b['beta']:g}, KL {b['kl']:.1f})" if b else "-"
        note = "" if row["inside_curve"] else " (beyond MAVIS's largest KL)"
        L.append(f"| {row['objective']} | {_f(row['ref_reward'])} | {_f(row['rl_reward'])} ± {_f(row['rl_se'])} | {row['rl_kl']:.2f} | "
                 f"{_f(row['mavis_at_rl_kl'])} ± {_f(row['mavis_at_rl_kl_se'])}{note} | {row['diff']:+.3f} ({_z(row['diff'], _se(row['mavis_at_rl_kl_se'], row['rl_se']))}) | "
                 f"{best} | {_yes(row['holds'], row['diff'])} |")
    floor = next((v for k, v in ctx["points"].items() if k.endswith("-beta0")), None)
    if floor is not None:
        L += ["", f"β = 0 (top-k sampling of π_ref with k = {e.get('top_k', DEFAULT_TOP_K)}, no value model) has KL {floor['kl']['mean']:.1f} ± {floor['kl']['se']:.1f} nats and rewards "
              + ", ".join(f"{m} {floor['rewards'][m]['mean']:.3f}" for m in objs)
              + ": the top-k truncation alone costs that much KL, a floor under every MAVIS point. β = 0 points are listed but not credited to MAVIS."]
    L += ["", "Every single-objective point (reward of the objective steered for, ± se; KL):", "",
          "| objective | policy | β | reward | KL |", "|---|---|---|---|---|"]
    for m in objs:
        L.append(f"| {m} | π_ref | - | {_f(ctx['points']['ref']['rewards'][m]['mean'])} | 0.00 |")
        rl = ctx["points"][f"rl-{m}"]
        L.append(f"| {m} | RL | - | {_f(rl['rewards'][m]['mean'])} ± {_f(rl['rewards'][m]['se'])} | {rl['kl']['mean']:.2f} |")
        for i in range(ctx["iterations"][m] + 1):
            for p in mavis_curve(ctx["points"], m, i, ctx["betas"]):
                L.append(f"| {m} | MAVIS iter {i} | {p['beta']:g} | {_f(p['reward'])} ± {_f(p['se'])} | {p['kl']:.2f} |")
    L += ["", "![single objective](single_objective.png)", ""]

    # claim 2
    c = claims[2]
    L += ["## Claim 2: policy iteration (Theorem 1, Section 4.2)", "", _rule(claim_iteration), "",
          "| objective | iteration | β | reward (KL) | iteration 0 at that KL | difference ± se (z) | compared |", "|---|---|---|---|---|---|---|"]
    for row in c["rows"]:
        for p in row["points"]:
            L.append(f"| {row['objective']} | {row['iteration']} | {p['beta']:g} | {_f(p['reward'])} ({p['kl']:.1f}) | {_f(p['iter0_at_kl'])} | {p['diff']:+.3f} ± {_f(p['se'])} ({_z(p['diff'], p['se'])}) | "
                     f"{'yes' if p['inside'] else 'no (KL beyond iteration 0 curve)'} |")
    strong = [f"{r_['objective']} iteration {r_['iteration']} β={p['beta']:g}" for r_ in c["rows"] for p in r_["points"] if p["inside"] and p["se"] > 0 and abs(p["diff"]) > 2 * p["se"]]
    L += ["", f"Under the rule as first written (only each objective's *final* iteration against iteration 0; widened to any later "
          f"iteration after the first results): **{c.get('verdict_final_iteration_rule', '?')}**. Both versions are reported.", ""]
    L += ["", "Improvements (rule above, one standard error): " + (", ".join(f"{r_['objective']} (iteration {r_['iteration']})" for r_ in c["rows"] if r_["improved"]) or "none") + ". "
          + ("Differences beyond two standard errors: " + ", ".join(strong) + "." if strong else "No difference reaches two standard errors at this sample size."), ""]

    # claims 3 and 4, for every sweep (primary beta first)
    matched = spec.sweep.get("beta", "matched") == "matched"
    L += ["## Claim 3: multi-objective fronts (Fig. 3)", "", _rule(claim_fronts), "",
          f"Pair: {' vs '.join(spec.pair)}; λ_1 grid step {ctx['sweep']['grid_step']}; {ctx['sweep']['n']} beams / N. The sweep runs at the "
          f"{'KL-matched MAVIS β (the single-objective β whose KL is closest to the RL policies)' if matched else 'recipe β'}"
          + (f" and again at β ∈ {spec.sweep.get('extra_betas')} (baselines' points shared); the verdict above is mixed when the βs disagree." if spec.sweep.get("extra_betas") else "."), ""]
    for name, sw in ctx["sweeps"].items():
        c3 = sw["claim3"]
        mav_kl = [p["kl"] for p in sw["fronts"]["methods"].get("mavis", {}).get("points", [])]
        L += [f"### MAVIS β = {sw['spec']['beta']:g} (`{name}/`): {c3['verdict']}", "",
              f"MAVIS KL {min(mav_kl):.1f}-{max(mav_kl):.1f} nats." if mav_kl else "", "",
              "| method | hypervolume |", "|---|---|"] + [f"| {m} | {v:.4f} |" for m, v in sorted(c3["hypervolume"].items(), key=lambda kv: -kv[1])]
        if c3["morlhf"]:
            L += ["", "| λ | MAVIS Σλ·R (KL) | MORLHF Σλ·R (KL) |", "|---|---|---|"]
            for row in c3["morlhf"]:
                L.append(f"| {'/'.join(f'{x:g}' for x in row['lambda'])} | {_f(row['mavis'])} ({row['mavis_kl']:.1f}) | {_f(row['morlhf'])} ({row['morlhf_kl']:.1f}) |")
        L += ["", "<details><summary>every front point</summary>", "", sw["fronts_md"], "</details>", ""]
    L += ["![fronts](front.png)", "", "![reward vs KL](reward_kl.png)", "", "(figures of the primary sweep)", ""]
    for name in ctx["sweeps"]:
        if name != "sweep":
            L += [f"![fronts, {name}](front-{name}.png)", "", f"(fronts of `{name}/`)", ""]
    L += [
          "## Claim 4: value-guided search (Fig. 4)", "", _rule(claim_search), ""]
    for name, sw in ctx["sweeps"].items():
        c4 = sw["claim4"]
        bons = sorted({k for row in c4["rows"] for k in row if k.startswith("bon-")})
        L += [f"### MAVIS β = {sw['spec']['beta']:g}: {c4['verdict']}", "",
              "| λ | MAVIS beam Σλ·R (KL) | " + " | ".join(bons) + " | beam wins |", "|---" * (len(bons) + 3) + "|"]
        for row in c4["rows"]:
            L.append(f"| {'/'.join(f'{x:g}' for x in row['lambda'])} | {_f(row['mavis-beam'])} ({row['kl']:.1f}) | "
                     + " | ".join(_f(row[b]) if b in row else "-" for b in bons) + f" | {'yes' if row['wins'] else 'no'} |")
        L += ["", "Hypervolumes: " + ", ".join(f"{m} {v:.4f}" for m, v in c4["hypervolume"].items()) + ".", ""]
    L += ["Best-of-N KL: log N − (N−1)/N (bound on KL to the policy it samples) plus that policy's eq. 7 KL over the chosen responses; "
          "the beam's KL is the eq. 7 estimate along the kept beam.", ""]

    # claim 5
    c = claims[5]
    d = c["distill_result"]
    mse = ', '.join(f'{k} {v:.2g}' for k, v in (d.get('val_mse_vs_teachers') or {}).items())
    if d.get("method") == "stacked":
        student = (f"Student: the {len(objs)} teachers share one frozen trunk and pool centre, so their heads were stacked on it "
                   f"(no training; measured MSE vs teachers on held-out completions {mse}): at decode time the separate models "
                   "already run one trunk forward for all objectives, so this claim measures noise around 1× speed and 0 gap here.")
    else:
        student = (f"Student: {len(objs)} heads, trained {d.get('steps')} steps on {d.get('sequences')} tree completions in {d.get('seconds', 0):.0f} s "
                   f"(val MSE vs teachers {mse}).")
    L += ["## Claim 5: distillation into one multi-head model (Table 3, App. E)", "", _rule(claim_distill), "",
          f"{student} MAVIS β = {float(spec.distill.get('beta', 5.0)):g}, λ = {{m: 1}}.", "",
          "| objective | separate V_m | distilled head | gap | within 0.121 |", "|---|---|---|---|---|"]
    for row in c["rows"]:
        L.append(f"| {row['objective']} | {_f(row['separate'])} ± {_f(row['separate_se'])} (KL {row['separate_kl']:.1f}) | "
                 f"{_f(row['distilled'])} ± {_f(row['distilled_se'])} (KL {row['distilled_kl']:.1f}) | {row['gap']:+.3f} | {'yes' if row['within'] else 'no'} |")
    s = c["speed"]
    L += ["", f"Decoding with every objective weighted: separate models {s['separate']:.1f} tok/s, one multi-head model {s['distilled']:.1f} tok/s "
          f"(**{s['speedup']:.2f}×**, measured back to back in one process).", ""]

    # claim 6
    c = claims[6]
    L += ["## Claim 6: training cost (Section 4.5)", "", _rule(claim_cost), "",
          "| side | wall seconds (2-core CPU) |", "|---|---|",
          f"| MAVIS: rollout trees, every iteration | {c['collect_seconds']:.0f} |",
          f"| MAVIS: value-model training, every iteration | {c['train_seconds']:.0f} |",
          f"| MAVIS total | {c['value_total']:.0f} |",
          f"| RL policies RSoup/MOD need ({', '.join('rl-' + m for m in objs)}) | {c['rl_per_objective_total']:.0f} |"]
    for k, v in c["morlhf"].items():
        L.append(f"| MORLHF {k} (one λ) | {v:.0f} |")
    L += ["", f"Ratio MAVIS / per-objective RL: **{c['ratio']:.2f}×** (paper: 21.5 / 17 GPU-hours = 1.26×). Iteration-0 trees are collected once "
          "and labelled with every reward, so their cost is shared by all objectives. Wall times count the calls that finished or were stopped "
          "by Ctrl-C / SIGTERM; a process killed with SIGKILL loses its share, and other work on the machine inflates them.", ""]
    if 7 in claims:
        L += _claim7_section(claims[7], ctx, spec)
    if 8 in claims:
        L += _claim8_section(claims[8], ctx, spec)
    for name, sw in ctx["sweeps"].items():
        if sw.get("judge_md"):
            L += [f"## Pairwise judge win rates (`{name}/`)", "", sw["judge_md"]]
    if "matched_kl" in ctx:
        L += ["# At matched KL", "", "The verdicts above compare rewards and raw hypervolumes as the paper does. Below, the same measurements "
              "judged at matched KL (`mavis_align.evaluate.matched`): each method's envelope within common KL budgets, paired-bootstrap "
              "intervals over prompts.", ""] + ["#" + x if x.startswith("#") else x for x in ctx["matched_kl"][1]]
    return "\n".join(L) + "\n"


def _claim7_section(c: dict, ctx: dict, spec) -> list[str]:
    """Claim 7: the paper v3 comparison with preference-conditioned methods."""
    cond = spec.conditioned
    L = ["## Claim 7: preference-conditioned methods (paper v3)", "", _rule(claim_conditioned), "",
         f"`mavis-conditioned`: one value model V(s, λ) over ({', '.join(spec.pair)}) with a λ-gated head (width {cond.get('head_hidden', 64)}), "
         "trained by the same soft policy iteration as the per-objective models: iteration 0 on the shared π_ref trees at λ drawn from the simplex, "
         f"then {cond.get('rounds', len(spec.recipe.rounds))} round(s) (β, ζ of `mavis.iterations`) on MAVIS(V(·, λ_j), λ_j) trees for "
         f"λ_1 ∈ {cond.get('grid', [1.0, 0.5, 0.0])}, {cond.get('prompts_per_weighting', '?')} prompts each; decoded by the same engine. "
         "`moodpo`: one LoRA policy told its weights in a system instruction, trained with GRPO (the RL baselines' settings) over weights on a "
         f"{cond.get('policy_grid_step', 0.2)} grid (the authors use online DPO); its KL is measured against π_ref on the user prompt alone.", ""]
    L += _front_tables(c, ctx, "claim7")
    def num(x) -> str:
        return "-" if x is None else f"{x:.3f}"

    for it, q in (c.get("value_quality") or {}).items():
        if q:
            per = q.get("per_objective", {})
            mixed = q.get("mixed_weights", {})
            L.append(f"- conditioned value model {it}: held-out (at λ = e_m) " + "; ".join(
                f"{m} R² {num(v.get('r2'))}, concordance {num(v.get('concordance'))} ({v.get('pairs', 0)} pairs)" for m, v in per.items())
                + (f"; at mixed λ R² {num(mixed.get('r2'))}, concordance {num(mixed.get('concordance'))}" if mixed else ""))
    return L + [""]


def _weighted_se(folder: Path, objectives: list[str]):
    """A function (method, lambda) -> se of sum_m lambda_m R_m, sqrt(sum lambda_m^2 se_m^2), from a
    sweep folder's point files (the ref point serves every lambda); 0 when the point is missing."""
    from .evaluate.pareto import lam_key

    ses = {}
    for f in sorted((folder / "points").glob("*.json")):
        p = json.loads(f.read_text())
        ses[(p["method"], None if p.get("lambda") is None else lam_key(p["lambda"]))] = [p["rewards"][o]["se"] for o in objectives]

    def se(method: str, lam) -> float:
        per = ses.get((method, None if method == "ref" else lam_key(lam)))
        return 0.0 if per is None else math.sqrt(sum((w * x) ** 2 for w, x in zip(lam, per)))

    return se


def _front_tables(c: dict, ctx: dict, key: str) -> list[str]:
    """Per sweep: hypervolumes, then MAVIS's weighted reward (KL) beside each rival's at every lambda."""
    L = []
    for name, sw in ctx["sweeps"].items():
        cl = sw.get(key)
        if not cl:
            continue
        L += [f"### MAVIS β = {sw['spec']['beta']:g} (`{name}/`): {cl['verdict']}", "", "| method | hypervolume |", "|---|---|"]
        L += [f"| {m} | {v:.4f} |" for m, v in sorted(cl["hypervolume"].items(), key=lambda kv: -kv[1])]
        L += ["", "| λ | MAVIS Σλ·R (KL) | " + " | ".join(cl["rivals"]) + " |", "|---" * (len(cl["rivals"]) + 2) + "|"]
        for row in cl["rows"]:
            L.append(f"| {'/'.join(f'{x:g}' for x in row['lambda'])} | {_f(row['mavis'])} ({row['mavis_kl']:.1f}) | "
                     + " | ".join(f"{_f(row[m])} ({row[m + '_kl']:.1f})" if m in row else "-" for m in cl["rivals"]) + " |")
        for m, pts in (cl.get("off_grid") or {}).items():
            for p in pts:
                L.append(f"| {m} at λ = {'/'.join(f'{x:g}' for x in p['lambda'])} (beyond the simplex) | rewards "
                         + ", ".join(f"{o} {_f(v)}" for o, v in p["rewards"].items()) + f"; KL {p['kl']:.1f} | |")
        L.append("")
    return L


def _claim8_section(c: dict, ctx: dict, spec) -> list[str]:
    """Claim 8: the neighbouring systems (issue 17) in the same harness."""
    n = spec.neighbours
    a, b = spec.pair
    mh = n.get("multihead", {})
    L = ["## Claim 8: the neighbouring systems (MAHALO-style, MVA-style, step-level guidance)", "", _rule(claim_neighbours), "",
         f"`mavis-step`: step-level value guidance: {n.get('step_candidates', 4)} candidate steps of {n.get('step_chunk', 10)} tokens sampled "
         f"from π_ref, the {n.get('step_select', 'best')} kept by Σλ V (the MAVIS value models as process reward models); its KL is the "
         "best-of-N bound per step (an upper bound). "
         f"`mahalo`: one LoRA trunk with one low-rank LM-head delta per objective (rank {mh.get('head_rank', 16)}), each head trained by DPO "
         f"on (best, worst) pairs of {mh.get('samples_per_prompt', 4)} π_ref samples of {n.get('multihead_prompts', 64)} train prompts ranked by "
         "its objective's reward; heads mixed by λ. `mahalo-step`: its heads at λ as the step proposal, kept by the value models. "
         f"`mva`: the adapter of `rl-{a}` and one for {b} trained with GRPO (the RL baselines' settings) plus {n.get('mi_weight', 1.0)} × "
         "the Gaussian mutual information of their LoRA updates; combined as θ_ref + Σλ_m Δθ_m, also at "
         f"λ_1 = {1 + float(n.get('extrapolate', 0.2)):g} and {-float(n.get('extrapolate', 0.2)):g} (extrapolation).", ""]
    L += _front_tables(c, ctx, "claim8")
    if c.get("matched_kl"):
        L += ["### At matched KL", "",
              "Each rival point beside MAVIS at the same KL and λ: MAVIS's Σλ·R interpolated on the upper envelope of π_ref (KL 0) and its "
              "sweep points at that λ (one per β), as in claim 1. Step-level KLs are upper bounds (the best-of-N bound per step), so MAVIS "
              "is read at a KL at least as high as the rival's true one.", "",
              "| method | λ | its Σλ·R ± se (KL) | MAVIS at that KL | difference (z) |", "|---|---|---|---|---|"]
        for row in c["matched_kl"]:
            lam = "/".join(f"{x:g}" for x in row["lambda"])
            z = "-" if row["z"] is None else f"{row['z']:+.1f}"
            beyond = "" if row["inside"] else " (beyond MAVIS's largest KL: its last point)"
            L.append(f"| {row['method']} | {lam} | {_f(row['weighted'])} ± {_f(row['se'])} ({row['kl']:.1f}) | {_f(row['mavis_at_kl'])}{beyond} | "
                     f"{row['diff']:+.3f} (z={z}) |")
        L.append("")
    for name, t in (c.get("training") or {}).items():
        L.append(f"- `{name}`: trained in {t.get('train_seconds', 0):.0f} s" + (f"; DPO pairs per head {t['multihead']['pairs']}" if "multihead" in t else ""))
    return L + [""]


def _quality_section(rows: list[dict], distill_result: dict) -> list[str]:
    """Held-out R² and sibling concordance of every value model the claims rest on."""
    from .train.quality import format_concordance, format_r2

    def cells(q: dict) -> str:
        return f"{format_r2(q)} | {format_concordance(q)} | {q.get('pairs', '-')}"

    L = ["## Value-model quality", "",
         "Held-out R² (1 − MSE / variance of the targets) and sibling concordance (the fraction of held-out sibling pairs with",
         "different Monte-Carlo values that V orders the same way; 0.5 is chance) on each model's own held-out trees.", "",
         "| iteration | objective | R² | sibling concordance | pairs |", "|---|---|---|---|---|"]
    for row in rows:
        for m, q in row["objectives"].items():
            L.append(f"| {row['iteration']} | {m} | {cells(q)} |")
    student = (distill_result.get("quality") or {}).get("per_objective") or {}
    for m, q in student.items():
        L.append(f"| distilled student | {m} | {cells(q)} |")
    return L + [""]


def _reading(claims: dict, ctx: dict, spec) -> list[str]:
    """Observations computed from the results that bear on the verdicts (the 'why' of negatives)."""
    objs = list(spec.recipe.objectives)
    pts, betas = ctx["points"], steering(ctx["betas"])
    rl_kl = {m: pts[f"rl-{m}"]["kl"]["mean"] for m in objs}
    mav = [p for m in objs for i in range(ctx["iterations"][m] + 1) for p in mavis_curve(pts, m, i, betas)]
    out = ["## Reading the results", ""]
    if mav:
        lo = min(p["kl"] for p in mav)
        out.append(f"- KL: the RL policies moved {min(rl_kl.values()):.1f}-{max(rl_kl.values()):.1f} nats from π_ref; the lowest-KL MAVIS point "
                   f"(any objective, β ≥ {min(betas):g}) sits at {lo:.1f} nats. Claim 1 therefore compares the RL policies with MAVIS mixed back towards "
                   "π_ref (the interpolation in its rule), not with a MAVIS policy at their KL.")
    floor = next((v for k, v in pts.items() if k.endswith("-beta0")), None)
    if floor is not None:
        out.append(f"- Top-k truncation: top-{spec.evaluation.get('top_k', DEFAULT_TOP_K)} sampling of π_ref without any value model (β = 0) already costs "
                   f"{floor['kl']['mean']:.1f} nats and changes the rewards ("
                   + ", ".join(f"{m} {pts['ref']['rewards'][m]['mean']:.3f} → {floor['rewards'][m]['mean']:.3f}" for m in objs)
                   + f"). Per token that is {floor['kl']['mean'] / max(floor['length']['mean'], 1):.2f} nats: the top-k tokens hold about "
                   f"{100 * math.exp(-floor['kl']['mean'] / max(floor['length']['mean'], 1)):.0f} % of this small model's probability mass (geometric mean). "
                   "A larger, instruction-tuned base model is more peaked, so this floor shrinks with scale (not measured here); it is not caused by the value models.")
    ses = sorted(p["se"] for p in mav)
    if ses:
        out.append(f"- Noise: {spec.evaluation.get('prompts', 16)} prompts × {spec.evaluation.get('samples', 2)} samples give reward standard errors "
                   f"of {ses[0]:.3f}-{ses[-1]:.3f} (median {ses[len(ses) // 2]:.3f}); differences below about twice that are not resolved.")
    c6 = claims[6]
    out.append(f"- Training budgets: value models saw {ctx['scale']['trees']} trees ({ctx['scale']['generated_tokens']} generated tokens); each RL policy "
               f"{spec.rl_config.steps * spec.rl_config.prompts_per_step * spec.rl_config.num_generations} sampled responses. "
               f"Wall time: MAVIS {c6['value_total'] / 60:.1f} min vs RL (per-objective policies) {c6['rl_per_objective_total'] / 60:.1f} min.")
    return out + [""]


def _z(diff: float, se: float) -> str:
    return f"z={diff / se:+.1f}" if se > 0 else "z=-"


def _yes(holds: bool, diff: float) -> str:
    return ("yes" if diff >= 0 else "yes, within noise") if holds else "no"


def _rule(fn) -> str:
    doc = (fn.__doc__ or "").strip().split("\n\n")
    rule = next((p for p in doc if p.strip().startswith("Rule")), "")
    return " ".join(x.strip() for x in rule.splitlines())


def write_report(out: str | Path, spec, *, copy_to: str | Path | None = None, command: str | None = None) -> Path:
    """Build every verdict from the study folder ``out`` and write ``out/REPORT.md`` (+ figures,
    ``verdicts.json``); with ``copy_to``, copy the report and figures there too."""
    out = Path(out)
    claims, ctx = build(out, spec)
    _plot_single(ctx["points"], list(spec.recipe.objectives), ctx["iterations"], ctx["betas"], out / "single_objective.png")
    for name in ("front.png", "reward_kl.png"):
        shutil.copy(out / "sweep" / name, out / name)
    extra_figs = []
    for folder in sorted(out.glob("sweep-beta*")):
        if (folder / "front.png").exists():
            shutil.copy(folder / "front.png", out / f"front-{folder.name}.png")
            extra_figs.append(f"front-{folder.name}.png")
    command = command or f"mavis-align reproduce --recipe {spec.name} --out {out}"
    extra = {k: v for k, v in claims.items()}
    matched = {str(k): v["verdict"] for k, v in ctx["matched_kl"][0]["verdicts"].items()}
    (out / "verdicts.json").write_text(json.dumps({"claims": extra, "matched_kl_verdicts": matched, "stages": ctx["stages"], "scale": ctx["scale"]},
                                                  indent=2, default=str) + "\n")
    (out / "REPORT.md").write_text(render(claims, ctx, spec, out, command))
    if copy_to is not None:
        dest = Path(copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("REPORT.md", "verdicts.json", "single_objective.png", "front.png", "reward_kl.png", *extra_figs):
            shutil.copy(out / name, dest / name)
        # the measurements behind every number (small JSON / markdown files; no models, no trees)
        data = dest / "data"
        if data.exists():
            shutil.rmtree(data)
        keep = ["study.json", "run.json", "costs.json", "mavis/summary.md", "mavis/costs.json", "mavis/recipe.json", "distill/result.json"]
        keep += [str(p.relative_to(out)) for p in sorted(out.glob("single/points/*.json"))]
        keep += [str(p.relative_to(out)) for p in sorted(out.glob("distill/eval/*.json"))]
        for sweep in sorted(out.glob("sweep*")):
            keep += [str(p.relative_to(out)) for p in [sweep / "fronts.json", sweep / "fronts.md", sweep / "sweep.json", *sorted(sweep.glob("points/*.json"))]]
        keep += [str(p.relative_to(out)) for p in sorted(out.glob("baselines/*/mavis_policy.json"))]
        keep += [str(p.relative_to(out)) for p in [*sorted(out.glob("conditioned/*/mavis_policy.json")), *sorted(out.glob("neighbours/*/mavis_policy.json")),
                                                   *sorted(out.glob("*/costs.json"))]]
        for rel in keep:
            if (out / rel).exists():
                (data / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / rel, data / rel)
    return out / "REPORT.md"
