"""The committed reproduction study read again at matched KL (issue 30), without decoding anything.

Reads the study's evaluations under ``results/data`` (the 2026-11-27 rerun: 16 hh-mix *test* prompts x 2
samples, the same prompts and seeds for every method) and compares every method at common KL budgets on
its own envelope, with 95 % paired-bootstrap intervals over prompts (``mavis_align.evaluate.matched``):

* single objectives (claim 1's data): each MAVIS iteration's beta > 0 points, top-k sampling alone
  (MAVIS's beta = 0 point) and each RL policy, per objective, pi_ref at KL 0 in every envelope;
* the two sweeps (claims 3, 7, 8's data): MAVIS-family methods at beta 0.5 and 5 (both on one envelope)
  and every baseline, at each lambda, plus hypervolume within KL budgets.

These evaluations predate per-response KLs, so each point's KL is its mean for every prompt: the
intervals carry the rewards' sampling noise over prompts, not the KL's. The prompts are the *test*
split that the study's choices were made on, not the untouched ``final`` split: read these as a
re-analysis, not as final verdicts.

    python benchmarks/matched_kl_study.py [--data results/data] [--out results] [--boot 2000]

Writes ``<out>/matched_kl.md``, ``<out>/matched_kl.json`` and ``<out>/reward_kl_matched.png``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

OBJECTIVES = ["helpful", "harmless", "humor"]
MAVIS_FAMILY = ("mavis", "mavis-beam", "mavis-conditioned", "mavis-step")


def load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "points").glob("*.json"))]


def single_objective(data: Path, levels, n_boot: int) -> dict:
    from mavis_align.evaluate.matched import matched_kl, point_of

    pts = {p.stem: json.loads(p.read_text()) for p in (data / "single" / "points").glob("*.json")}
    out = {}
    for m in OBJECTIVES:
        methods: dict[str, list] = {}
        for name, res in pts.items():
            hit = re.fullmatch(rf"iter(\d+)-{m}-beta([\d.]+)", name)
            if hit:
                it, beta = int(hit.group(1)), float(hit.group(2))
                key = "top-k only (beta 0)" if beta == 0 else f"mavis iter{it}"
                if beta == 0 and it > 0:
                    continue  # beta 0 is the same policy at every iteration (pi_ref's top-k)
                methods.setdefault(key, []).append(point_of(res, [m], weights=[1.0], label=f"beta={beta:g}"))
        methods["mavis (all iterations)"] = [p for k, v in methods.items() if k.startswith("mavis iter") for p in v]
        methods[f"rl-{m}"] = [point_of(pts[f"rl-{m}"], [m], weights=[1.0])]
        rl_kl = float(pts[f"rl-{m}"]["kl"]["mean"])
        lv = sorted(set(levels) | {round(rl_kl, 2)})
        out[m] = {"rl_kl": rl_kl, **matched_kl(methods, levels=lv, anchor=point_of(pts["ref"], [m], weights=[1.0]), against=f"rl-{m}", n_boot=n_boot)}
    return out


def sweeps(data: Path, n_boot: int, against: str = "mavis") -> dict:
    from mavis_align.evaluate.matched import sweep_matched_kl

    low, high = load(data / "sweep"), load(data / "sweep-beta5")
    spec = json.loads((data / "sweep" / "sweep.json").read_text())
    points = low + [p for p in high if p["method"] in MAVIS_FAMILY]  # the baselines are the same measurements in both
    return sweep_matched_kl(points, spec["objectives"], bon_n=int(spec["n"]), against=against, n_boot=n_boot)


CLAIMS = {3: ("mavis", ["rsoup", "mod"]), 4: ("mavis-beam", ["bon-ref", "bon-rsoup", "bon-mod"]), 7: ("mavis", ["mavis-conditioned", "moodpo"]),
          8: ("mavis", ["mavis-step", "mahalo", "mahalo-step", "mva"])}


def verdicts(single: dict, sweep: dict, beam: dict, raw: dict) -> tuple[dict, list[str]]:
    """Claims 1, 3, 4, 7, 8 under the matched-KL rules (evaluate.matched.verdict_*), beside the raw verdicts."""
    from mavis_align.evaluate.matched import VERDICT_BUDGET, combine, verdict_front, verdict_single

    out = {1: {m: verdict_single(t, "mavis (all iterations)", f"rl-{m}", round(t["rl_kl"], 2)) for m, t in single.items()}}
    out[1]["verdict"] = combine([v["verdict"] for v in out[1].values()])
    for claim, (method, rivals) in CLAIMS.items():
        summary = beam if method == "mavis-beam" else sweep
        per = {r: verdict_front(summary, r, method=method) for r in rivals}
        out[claim] = {**per, "verdict": combine([v["verdict"] for v in per.values()])}
    lines = ["## Verdicts at matched KL", "",
             f"Rules (`mavis_align.evaluate.matched.verdict_single` / `verdict_front`, tested in `tests/test_matched.py`): claim 1, per objective, "
             "MAVIS − RL at the RL policy's own KL: interval below 0 → does not hold; covering or above 0 at an own MAVIS point → holds; only by "
             f"mixing with π_ref → mixed. Claims 3, 4, 7, 8: at every λ within {VERDICT_BUDGET:g} nats, rival − MAVIS (MAVIS beam for claim 4): every "
             "interval below 0 → holds; one above 0 → does not hold; else mixed; a claim holds if it holds against every rival. These rules were "
             "written after the tables above were first seen; they are fixed now for the final-split rerun, and their verdicts here are a re-analysis.", "",
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


def render_single(single: dict) -> list[str]:
    out = ["## Single objectives (claim 1's data)", "",
           "The best reward of the objective within each KL budget on each method's own envelope (π_ref at KL 0 in every envelope; ᵐ: below "
           "the method's cheapest own point, reached only by mixing with π_ref; ᵖ: beyond its largest KL, its best measured point), 95 % "
           "paired-bootstrap interval over the 16 prompts; one column is the RL policy's own KL. Paired differences are against the RL policy.", ""]
    for m, table in single.items():
        levels = table["levels"]
        out += [f"### {m} (RL policy at {table['rl_kl']:.2f} nats)", "",
                "| method | own KL range | " + " | ".join(f"{lv:g}" for lv in levels) + " |", "|---" * (len(levels) + 2) + "|"]
        for name, info in table["methods"].items():
            cells = []
            for r in info["at"]:
                if r["reward"] is None:
                    cells.append("–")
                    continue
                ci = f" [{r['lo']:.3f}, {r['hi']:.3f}]" if r["lo"] is not None else ""
                cells.append(f"{r['reward']:.3f}{ci}" + ("ᵐ" if r["mixture_with_ref"] else "") + ("ᵖ" if r["plateau"] else ""))
            out.append(f"| {name} | {info['min_kl']:.1f}–{info['max_kl']:.1f} | " + " | ".join(cells) + " |")
        at_rl = [r for r in table["methods"]["mavis (all iterations)"]["at"] if abs(r["kl"] - round(table["rl_kl"], 2)) < 1e-9][0]
        if at_rl.get("diff") is not None and at_rl.get("diff_lo") is not None:
            verdict = "ahead" if at_rl["diff_lo"] > 0 else ("behind" if at_rl["diff_hi"] < 0 else "tied (interval covers 0)")
            out += ["", f"MAVIS (all iterations) − RL at the RL policy's KL: {at_rl['diff']:+.3f} [{at_rl['diff_lo']:+.3f}, {at_rl['diff_hi']:+.3f}]: "
                        f"{verdict}" + (", read by mixing with π_ref" if at_rl["mixture_with_ref"] else "") + "."]
        out.append("")
    return out


def plot(single: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(single), figsize=(5 * len(single), 4))
    for ax, (m, table) in zip(axes, single.items()):
        for name, info in table["methods"].items():
            xs = [r["kl"] for r in info["at"] if r["reward"] is not None]
            ys = [r["reward"] for r in info["at"] if r["reward"] is not None]
            ax.plot(xs, ys, "o-", label=name, alpha=0.8)
        ax.axvline(table["rl_kl"], color="grey", lw=0.8, ls=":")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL budget (nats)")
        ax.set_ylabel(f"{m} reward on the envelope")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="results/data")
    ap.add_argument("--out", default="results")
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args()

    from mavis_align.evaluate.matched import KL_LEVELS, render_sweep_matched
    from mavis_align.provenance import run_record, write_json

    data, out = Path(args.data), Path(args.out)
    single = single_objective(data, KL_LEVELS, args.boot)
    sweep = sweeps(data, args.boot)
    beam = sweeps(data, args.boot, against="mavis-beam")
    raw = {k: v["verdict"] for k, v in json.loads((out / "verdicts.json").read_text())["claims"].items()} if (out / "verdicts.json").exists() else {}
    judged, verdict_lines = verdicts(single, sweep, beam, raw)
    write_json(out / "matched_kl.json", {"run": run_record(vars(args), 0), "single": single, "sweeps": sweep, "verdicts": judged})
    plot(single, out / "reward_kl_matched.png")
    text = ["# The reproduction study at matched KL", "",
            f"`python benchmarks/matched_kl_study.py --data {args.data} --out {args.out}` (no decoding; {args.boot} bootstrap replicates). "
            "Data: the 2026-11-27 study rerun (16 hh-mix test prompts × 2 samples, the same for every method; these prompts were read for "
            "earlier choices: a re-analysis, not a final-split verdict). Each point's KL is its mean (the evaluations predate per-response KLs): "
            "the intervals carry the rewards' noise over prompts only.", ""]
    text += verdict_lines
    text += render_single(single)
    text += ["## Two objectives (claims 3, 7, 8's data): helpful / harmless sweeps, MAVIS family at beta 0.5 and 5 on one envelope", ""]
    text += render_sweep_matched(sweep)[1:]
    (out / "matched_kl.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
