"""The tilt that keeps pi_ref's tail against the paper's, at matched KL, on dev prompts (issue 30).

``packaged:default`` (heads for helpful, harmless, humor), each objective alone (lambda = {m: 1}),
raw tilt (its provenance's: no NORMALIZE), top-k 15, <= 40 tokens, hh-mix **val** (dev) prompts:
the first 6 ordinary and 6 harmful, 2 samples each, seed 0; tails ``drop`` (the paper: only the top
15 get mass; beta 0 is top-15 sampling) and ``keep`` (beta 0 is pi_ref itself) at raw beta in
{0, 10, 25, 50, 100}. Every setting's three objectives are decoded in one batch
(``evaluate_weightings``); each setting is saved as it finishes (a rerun resumes).

Each tail's points per objective form its envelope (``mavis_align.evaluate.matched``; pi_ref at KL 0
in both), read at 1, 2, 4, 8, 16 nats with 95 % paired-bootstrap intervals over the 12 prompts, and
keep − drop is taken replicate by replicate.

The rule, fixed before the data (it chooses the demo's tilt; the demo then runs on the final split):
among all (tail, beta > 0) settings whose mean KL (eq. 7) is <= 8 nats for each of the three
objectives, take the one with the largest mean over the objectives of its reward gain over pi_ref;
ties: the smaller mean KL. If no setting is within 8 nats, the one with the smallest mean KL.

    python benchmarks/tail_sweep.py [--out runs/tail_sweep]
    python benchmarks/tail_sweep.py --top-k 5 --betas 25 50   # other candidate counts (the rule is for k = 15 only)

Results -> benchmarks/results/tail_sweep.{json,md} (``tail_sweep-k<K>`` for another k).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OBJECTIVES = ["helpful", "harmless", "humor"]
BETAS = [0.0, 10.0, 25.0, 50.0, 100.0]
TAILS = ["drop", "keep"]
TOP_K, MAX_NEW, SAMPLES, SEED, PER_CATEGORY, BUDGET = 15, 40, 2, 0, 6, 8.0


def choose(rows: dict, ref: dict) -> dict:
    """The rule of the module docstring -> the chosen row's key and why."""
    cands = []
    for key, row in rows.items():
        if row["beta"] <= 0:
            continue
        kls = [row["results"][m]["kl"]["mean"] for m in OBJECTIVES]
        gain = sum(row["results"][m]["rewards"][m]["mean"] - ref["rewards"][m]["mean"] for m in OBJECTIVES) / len(OBJECTIVES)
        cands.append((max(kls) <= BUDGET, gain, -sum(kls) / len(kls), key))
    within = [c for c in cands if c[0]]
    if within:
        best = max(within, key=lambda c: (c[1], c[2]))
        why = f"largest mean reward gain over pi_ref ({best[1]:+.3f}) among settings within {BUDGET:g} nats for every objective"
    else:
        best = max(cands, key=lambda c: c[2])
        why = f"no setting within {BUDGET:g} nats for every objective: the smallest mean KL"
    return {"key": best[3], "tail": rows[best[3]]["tail"], "beta": rows[best[3]]["beta"], "why": why}


def ref_result(out: Path, model, tok, prompts: list[str], rewards) -> dict:
    """pi_ref's evaluation on the sweep's prompts (``out/rows/ref.json``, measured once, then read)."""
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.evaluate import DecoderPolicy, evaluate_policy
    from mavis_align.generation import SamplingConfig
    from mavis_align.provenance import write_json

    path = out / "rows" / "ref.json"
    if not path.exists():
        write_json(path, evaluate_policy(DecoderPolicy("ref", MavisDecoder(model, tok), SamplingConfig(max_new_tokens=MAX_NEW), chat=True),
                                         prompts, rewards, model, tok, samples=SAMPLES, seed=SEED, chat=True, keep_examples=2))
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/tail_sweep")
    ap.add_argument("--values", default="packaged:default")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--top-k", type=int, default=TOP_K)
    ap.add_argument("--betas", type=float, nargs="+", default=BETAS)
    args = ap.parse_args()
    k, betas = args.top_k, sorted(set([0.0] + list(args.betas)))
    suffix = "" if k == TOP_K else f"-k{k}"
    if suffix and args.out == "runs/tail_sweep":
        args.out += suffix

    from mavis_align.data import load_prompts
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.demo import balanced_prompts, steering_z
    from mavis_align.evaluate import evaluate_weightings
    from mavis_align.evaluate.matched import KL_LEVELS, format_cell, matched_kl, point_of
    from mavis_align.generation import SamplingConfig
    from mavis_align.models import load_causal_lm
    from mavis_align.provenance import write_json, write_run_record
    from mavis_align.rewards import get_rewards
    from mavis_align.values import ValueModel

    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    write_run_record(out, vars(args), SEED)
    model, tok = load_causal_lm("smollm2-135m-instruct")
    vm = ValueModel.load(args.values)
    decoder = MavisDecoder(model, tok, [vm])
    prompts = balanced_prompts(load_prompts("hh-mix", "val", seed=0, tokenizer=tok), PER_CATEGORY)
    rewards = get_rewards(OBJECTIVES)
    ref = ref_result(out, model, tok, prompts, rewards)
    rows = {}
    for tail in TAILS:
        for beta in betas:
            key = f"{tail}-beta{beta:g}"
            path = out / "rows" / f"{key}.json"
            if not path.exists():
                cfg = SamplingConfig(max_new_tokens=MAX_NEW, top_k=k, beta=beta, normalize=False, tail=tail)
                res = evaluate_weightings(decoder, cfg, [(m, {m: 1.0}) for m in OBJECTIVES], prompts, rewards, model, tok, samples=SAMPLES,
                                          seed=SEED, chat=True, keep_examples=2)
                write_json(path, {"tail": tail, "beta": beta, "results": res})
                print(key, {m: (round(res[m]["rewards"][m]["mean"], 3), round(res[m]["kl"]["mean"], 2)) for m in OBJECTIVES}, flush=True)
            rows[key] = json.loads(path.read_text())
    tables = {}
    for m in OBJECTIVES:
        methods = {tail: [point_of(rows[f"{tail}-beta{b:g}"]["results"][m], [m], weights=[1.0], label=f"beta={b:g}") for b in betas
                          if not (tail == "keep" and b == 0)]  # keep at beta 0 is pi_ref itself: the anchor
                   for tail in TAILS}
        tables[m] = matched_kl(methods, levels=KL_LEVELS, anchor=point_of(ref, [m], weights=[1.0]), against="drop", n_boot=args.boot, seed=SEED)
    chosen = choose(rows, ref) if not suffix else None
    lines = ["# The tilt that keeps π_ref's tail vs the paper's (dev prompts)", "",
             f"`python benchmarks/tail_sweep.py{' --top-k ' + str(k) + ' --betas ' + ' '.join(f'{b:g}' for b in args.betas) if suffix else ''}` — `{args.values}`, raw tilt, top-k {k}, ≤ {MAX_NEW} tokens, hh-mix val (dev) prompts "
             f"({PER_CATEGORY} ordinary + {PER_CATEGORY} harmful) × {SAMPLES} samples, seed {SEED}, λ = {{m: 1}}.", "",
             "| tail | β | " + " | ".join(f"{m} (KL)" for m in OBJECTIVES) + " | z vs π_ref |", "|---" * (len(OBJECTIVES) + 3) + "|",
             "| π_ref | – | " + " | ".join(f"{ref['rewards'][m]['mean']:.3f} (0)" for m in OBJECTIVES) + " | – |"]
    for key, row in rows.items():
        res = row["results"]
        zs = ", ".join(f"{steering_z(res[m]['rewards'][m], ref['rewards'][m], SAMPLES):+.1f}" for m in OBJECTIVES)
        lines.append(f"| {row['tail']} | {row['beta']:g} | " + " | ".join(f"{res[m]['rewards'][m]['mean']:.3f} ({res[m]['kl']['mean']:.1f})" for m in OBJECTIVES)
                     + f" | {zs} |")
    lines += ["", "Reward within each KL budget on each tail's envelope (π_ref at 0; ᵐ mixture with π_ref below the cheapest point; "
              "ᵖ beyond the largest KL: its best point), 95 % paired-bootstrap intervals over prompts, and keep − drop:", ""]
    for m, t in tables.items():
        lines += [f"**{m}**", "", "| tail | " + " | ".join(f"{lv:g} nats" for lv in t["levels"]) + " |", "|---" * (len(t["levels"]) + 1) + "|"]
        for tail, info in t["methods"].items():
            lines.append(f"| {tail} | " + " | ".join(format_cell(r) for r in info["at"]) + " |")
        diffs = [f"{r['kl']:g}: {r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]" for r in t["methods"]["keep"]["at"] if r.get("diff_lo") is not None]
        lines += ["", "keep − drop: " + "; ".join(diffs) + ".", ""]
    if chosen is not None:
        lines += [f"**The rule's choice** (fixed before the data, see the script): tail `{chosen['tail']}`, raw β {chosen['beta']:g} ({chosen['why']}).", ""]
    res_dir = Path(__file__).parent / "results"
    write_json(res_dir / f"tail_sweep{suffix}.json", {"config": vars(args), "prompts": prompts, "ref": {m: ref["rewards"][m] for m in OBJECTIVES},
                                              "rows": {k: {"tail": r["tail"], "beta": r["beta"], **{m: {"reward": r["results"][m]["rewards"][m],
                                                                                                       "kl": {k2: v for k2, v in r["results"][m]["kl"].items() if k2 != "values"}}
                                                                                                   for m in OBJECTIVES}} for k, r in rows.items()},
                                              "matched_kl": tables, "chosen": chosen})
    (res_dir / f"tail_sweep{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
