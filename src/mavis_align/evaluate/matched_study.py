"""A study folder (or its ``data/`` copy) read at matched KL: the single-objective curves against the RL
policies, the sweeps' fronts, and the verdicts of claims 1, 3, 4, 7, 8 under the matched-KL rules of
:mod:`mavis_align.evaluate.matched` beside the raw ones. Used by the reproduction report and by
``benchmarks/matched_kl_study.py``.

Layout read: ``single/points/{ref,rl-<m>,iter<i>-<m>-beta<b>}.json`` and ``sweep*/points/*.json`` (the
primary sweep; the MAVIS-family points of every other ``sweep-beta*`` join the same envelopes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..rewards.independent import independent_scorers
from .matched import KL_LEVELS, VERDICT_BUDGET, combine, format_cell, matched_kl, point_of, render_sweep_matched, sweep_matched_kl, verdict_front, verdict_single

MAVIS_FAMILY = ("mavis", "mavis-beam", "mavis-conditioned", "mavis-step")


def load(folder: Path) -> list[dict]:
    """The point dicts of one sweep folder."""
    return [json.loads(p.read_text()) for p in sorted((folder / "points").glob("*.json"))]


def single_objective(data: Path, objectives: Sequence[str], levels: Sequence[float] = KL_LEVELS, n_boot: int = 2000, seed: int = 0,
                     scored_by: Mapping[str, str] | None = None) -> dict:
    """Per objective with an RL policy: every MAVIS iteration's beta > 0 points, top-k alone (beta 0),
    all iterations together and the RL policy, read at the KL levels and at the RL policy's own KL.

    ``scored_by``: {objective: reward name} read instead of the objective's own reward (its independent
    scorer, rewards.independent): the same policies, steered by the objective, scored by another signal;
    objectives whose points lack that reward are left out."""
    pts = {p.stem: json.loads(p.read_text()) for p in (data / "single" / "points").glob("*.json")}
    out = {}
    for m in objectives:
        if f"rl-{m}" not in pts or "ref" not in pts:
            continue
        score = m if scored_by is None else scored_by.get(m)
        if score is None or any(score not in res["rewards"] for res in pts.values()):
            continue
        methods: dict[str, list] = {}
        for name, res in pts.items():
            hit = re.fullmatch(rf"iter(\d+)-{m}-beta([\d.]+)", name)
            if hit:
                it, beta = int(hit.group(1)), float(hit.group(2))
                key = "top-k only (beta 0)" if beta == 0 else f"mavis iter{it}"
                if beta == 0 and it > 0:
                    continue  # beta 0 is the same policy at every iteration (pi_ref's top-k)
                methods.setdefault(key, []).append(point_of(res, [score], weights=[1.0], label=f"beta={beta:g}"))
        methods["mavis (all iterations)"] = [p for k, v in methods.items() if k.startswith("mavis iter") for p in v]
        methods[f"rl-{m}"] = [point_of(pts[f"rl-{m}"], [score], weights=[1.0])]
        rl_kl = float(pts[f"rl-{m}"]["kl"]["mean"])
        lv = sorted(set(levels) | {round(rl_kl, 2)})
        methods = {k: v for k, v in methods.items() if v}
        out[m] = {"rl_kl": rl_kl, "scored_by": score, **matched_kl(methods, levels=lv, anchor=point_of(pts["ref"], [score], weights=[1.0]),
                                                                    against=f"rl-{m}", n_boot=n_boot, seed=seed)}
    return out


def sweep_points(data: Path) -> list[dict]:
    """The primary sweep's points and the MAVIS-family points of every ``sweep-beta*`` folder (their
    baselines are the same measurements, copied)."""
    points = load(data / "sweep")
    for extra in sorted(data.glob("sweep-beta*")):
        points += [p for p in load(extra) if p["method"] in MAVIS_FAMILY]
    return points


def sweeps(data: Path, n_boot: int = 2000, against: str = "mavis", seed: int = 0) -> dict:
    """:func:`~mavis_align.evaluate.matched.sweep_matched_kl` of the study's sweeps."""
    spec = json.loads((data / "sweep" / "sweep.json").read_text())
    return sweep_matched_kl(sweep_points(data), spec["objectives"], bon_n=int(spec["n"]), against=against, n_boot=n_boot, seed=seed)


CLAIMS = {3: ("mavis", ["rsoup", "mod"]), 4: ("mavis-beam", ["bon-ref", "bon-rsoup", "bon-mod"]), 7: ("mavis", ["mavis-conditioned", "moodpo"]),
          8: ("mavis", ["mavis-step", "mahalo", "mahalo-step", "mva"])}


def verdicts(single: dict, sweep: dict, beam: dict, raw: Mapping) -> tuple[dict, list[str]]:
    """Claims 1, 3, 4, 7, 8 under the matched-KL rules (evaluate.matched.verdict_*), beside the raw verdicts
    (``raw``: {"1": verdict, ...}) -> (verdicts, markdown lines)."""
    out = {1: {m: verdict_single(t, "mavis (all iterations)", f"rl-{m}", round(t["rl_kl"], 2)) for m, t in single.items()
               if "mavis (all iterations)" in t["methods"]}}
    out[1]["verdict"] = combine([v["verdict"] for v in out[1].values()])
    for claim, (method, rivals) in CLAIMS.items():
        summary = beam if method == "mavis-beam" else sweep
        per = {r: verdict_front(summary, r, method=method) for r in rivals if any(r in t["methods"] for t in summary["lambdas"].values())}
        out[claim] = {**per, "verdict": combine([v["verdict"] for v in per.values()])}
    lines = ["## Verdicts at matched KL", "",
             f"Rules (`mavis_align.evaluate.matched.verdict_single` / `verdict_front`, tested in `tests/test_matched.py`): claim 1, per objective, "
             "MAVIS − RL at the RL policy's own KL: interval below 0 → does not hold; covering or above 0 at an own MAVIS point → holds; only by "
             f"mixing with π_ref → mixed. Claims 3, 4, 7, 8: at every λ within {VERDICT_BUDGET:g} nats, rival − MAVIS (MAVIS beam for claim 4): every "
             "interval below 0 → holds; one above 0 → does not hold; else mixed; a claim holds if it holds against every rival. These rules were "
             "first applied to the 2026-11-27 study's data after its tables had been seen (a re-analysis, `results/matched_kl.md`); they are fixed "
             "since for every later study.", "",
             "| claim | raw verdict (`results/REPORT.md`) | at matched KL | detail |", "|---|---|---|---|"]
    detail1 = "; ".join(f"{m}: {v['diff']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] at {v['kl']:g} nats ({v['verdict']}{', via π_ref' if v['mixture_with_ref'] else ''})"
                        for m, v in out[1].items() if m != "verdict")
    lines.append(f"| 1 | {raw.get('1', '?')} | **{out[1]['verdict']}** | {detail1} |")
    for claim in CLAIMS:
        parts = []
        for r, v in out[claim].items():
            if r == "verdict":
                continue
            cells = ", ".join(f"{row['lambda']}: {row['diff']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}]" for row in v["rows"] if row["lo"] is not None)
            parts.append(f"{r} − {v['method']} ({v['verdict']}): {cells}")
        lines.append(f"| {claim} | {raw.get(str(claim), '?')} | **{out[claim]['verdict']}** | {'; '.join(parts)} |")
    return out, lines + [""]


def render_single(single: dict, title: str = "## Single objectives (claim 1's data)") -> list[str]:
    """Markdown tables of :func:`single_objective`."""
    out = [title, "",
           "The best reward of the objective within each KL budget on each method's own envelope (π_ref at KL 0 in every envelope; ᵐ: below "
           "the method's cheapest own point, reached only by mixing with π_ref; ᵖ: beyond its largest KL, its best measured point), 95 % "
           "paired-bootstrap interval over prompts; one column is the RL policy's own KL. Paired differences are against the RL policy.", ""]
    for m, table in single.items():
        levels = table["levels"]
        scored = f", scored by {table['scored_by']}" if table.get("scored_by", m) != m else ""
        out += [f"### {m}{scored} (RL policy at {table['rl_kl']:.2f} nats)", "",
                "| method | own KL range | " + " | ".join(f"{lv:g}" for lv in levels) + " |", "|---" * (len(levels) + 2) + "|"]
        for name, info in table["methods"].items():
            out.append(f"| {name} | {info['min_kl']:.1f}–{info['max_kl']:.1f} | " + " | ".join(format_cell(r) for r in info["at"]) + " |")
        at_rl = [r for r in table["methods"]["mavis (all iterations)"]["at"] if abs(r["kl"] - round(table["rl_kl"], 2)) < 1e-9][0]
        if at_rl.get("diff") is not None and at_rl.get("diff_lo") is not None:
            verdict = "ahead" if at_rl["diff_lo"] > 0 else ("behind" if at_rl["diff_hi"] < 0 else "tied (interval covers 0)")
            out += ["", f"MAVIS (all iterations) − RL at the RL policy's KL: {at_rl['diff']:+.3f} [{at_rl['diff_lo']:+.3f}, {at_rl['diff_hi']:+.3f}]: "
                        f"{verdict}" + (", read by mixing with π_ref" if at_rl["mixture_with_ref"] else "") + "."]
        out.append("")
    return out




def study_matched_kl(data: Path, objectives: Sequence[str], raw: Mapping, *, n_boot: int = 2000, seed: int = 0) -> tuple[dict, list[str]]:
    """Everything above for one study folder -> ({"single", "sweeps", "verdicts"}, markdown lines: verdicts,
    single-objective tables, sweep tables)."""
    single = single_objective(data, objectives, n_boot=n_boot, seed=seed)
    sweep = sweeps(data, n_boot, seed=seed)
    beam = sweeps(data, n_boot, against="mavis-beam", seed=seed)
    judged, lines = verdicts(single, sweep, beam, raw)
    lines += render_single(single)
    independent = single_objective(data, objectives, n_boot=n_boot, seed=seed, scored_by=independent_scorers(objectives))
    if independent:  # points measured before the independent scorers existed carry none
        lines += render_single(independent, "## Single objectives scored by independent scorers (rewards.independent; never used to label or select)")
        lines += ["A rise of the labeller without a rise here is what reward hacking looks like.", ""]
    lines += ["## Two objectives at matched KL: the sweeps, MAVIS family at every swept β on one envelope", ""]
    lines += render_sweep_matched(sweep)[1:]
    return {"single": single, "independent": independent, "sweeps": sweep, "verdicts": judged}, lines
