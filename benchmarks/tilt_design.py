"""Decode designs that spend KL where the value models can tell candidates apart, at matched KL (issue 36).

Dev prompts only (hh-mix **val**: the first 6 ordinary + 6 harmful, 2 samples each, seed 0: the
prompts of ``tail_sweep.py``), ``packaged:default``, each objective alone (λ = {m: 1}), ≤ 40 tokens.
Families (every setting saved as it finishes; a rerun resumes):

* ``token``     today's default family: token tilt, tail keep, raw values, top-15, β ∈ {10, 25, 50, 100}
                (today's default, the demo's: β 25);
* ``horizon-h`` the same tilt on the first h response tokens only (``tilt_tokens``), π_ref after them,
                β ∈ {25, 50, 100, 200}: the candidate benchmark found the candidates' true spread, and
                the harmless decision, in the first tokens;
* ``step-c``    step-level selection (``mavis-step``): N ∈ {2, 4} chunks of c tokens sampled from π_ref
                (full vocabulary, temperature 1), the best by V kept; KL = the best-of-N bound per step
                (an upper bound); it decodes N× the tokens;
* ``hybrid-h``  both: N ∈ {2, 4} chunks of 10 tokens sampled from the horizon-h token tilt (β ∈ {50, 100}),
                the best by V kept (decisive tokens tilted, chunks selected after them); KL = the tokens'
                log-ratios + the best-of-N bound. (Added to the families after the sweep had measured only
                token β 10 and 25, before any horizon, step or hybrid row: the rule below is unchanged.)
* ``hybridlow-h`` report only (added after the whole dev sweep had been read): the hybrid at β ∈ {10, 25}.
* ``nucleus-p`` report only (never chosen: added after the first horizon row had been seen): the token tilt
                whose candidates are the fewest of the top-15 holding p of π_ref's mass (``candidate_p``),
                tail keep, β ∈ {25, 50, 100}.

The rule, fixed before this sweep's data (today's default D = token β 25; per objective m its mean KL
k_m and reward R_D,m on these prompts):

1. every family's envelope per objective (``evaluate.matched``; π_ref at KL 0), read at k_m / 2;
2. a family *passes* objective m when its reward at k_m / 2 is at least R_D,m (the issue's bar: today's
   reward at half today's KL), on the point estimates; the 95 % paired-bootstrap interval of the
   difference is reported beside it;
3. the chosen family passes the most objectives; ties: the larger mean over objectives of
   (reward at k_m / 2 − R_D,m); a family that passes none is never chosen (then D stays);
4. the setting shipped from it: among its settings whose KL is ≤ k_m for every objective, the one with
   the largest mean reward gain over π_ref (ties: the smaller mean KL).

The verdict is read once on the untouched final split (``--final``: the chosen setting and D on the
demo's final prompts, paired differences at their KLs).

    python benchmarks/tilt_design.py [--out runs/tilt_design] [--horizons 4 8]
    python benchmarks/tilt_design.py --final        # after the dev choice, once

Results -> benchmarks/results/tilt_design.{json,md} (and tilt_design-final.{json,md}).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tail_sweep import MAX_NEW, OBJECTIVES, PER_CATEGORY, SAMPLES, SEED, TOP_K, ref_result  # the same dev prompts and pi_ref row

TOKEN_BETAS = [10.0, 25.0, 50.0, 100.0]
HORIZON_BETAS = [25.0, 50.0, 100.0, 200.0]
STEP_N = [2, 4]
HYBRID_BETAS, HYBRID_N = [50.0, 100.0], [2, 4]
NUCLEUS_BETAS = [25.0, 50.0, 100.0]
REPORT_ONLY = ("nucleus", "hybridlow")  # families measured beside the others but outside the rule's choice
DEFAULT_KEY = "token-beta25"


def settings(horizons: list[int], chunks: list[int], hybrid: int = 8, nucleus: tuple[float, ...] = (0.8,)) -> dict[str, dict]:
    """key -> {"family", "kind": token|step, ...} of every setting of the sweep."""
    out = {f"token-beta{b:g}": {"family": "token", "kind": "token", "beta": b, "tilt_tokens": 0} for b in TOKEN_BETAS}
    for h in horizons:
        out.update({f"horizon{h}-beta{b:g}": {"family": f"horizon-{h}", "kind": "token", "beta": b, "tilt_tokens": h} for b in HORIZON_BETAS})
    for c in chunks:
        out.update({f"step{c}-n{n}": {"family": f"step-{c}", "kind": "step", "chunk": c, "n": n} for n in STEP_N})
    if hybrid:
        out.update({f"hybrid{hybrid}-beta{b:g}-n{n}": {"family": f"hybrid-{hybrid}", "kind": "step", "chunk": 10, "n": n, "proposal_beta": b,
                                                       "tilt_tokens": hybrid} for b in HYBRID_BETAS for n in HYBRID_N})
    if hybrid:
        out.update({f"hybridlow{hybrid}-beta{b:g}-n{n}": {"family": f"hybridlow-{hybrid}", "kind": "step", "chunk": 10, "n": n, "proposal_beta": b,
                                                          "tilt_tokens": hybrid} for b in (10.0, 25.0) for n in HYBRID_N})
    for q in nucleus:
        out.update({f"nucleus{q:g}-beta{b:g}": {"family": f"nucleus-{q:g}", "kind": "token", "beta": b, "tilt_tokens": 0, "candidate_p": q}
                    for b in NUCLEUS_BETAS})
    return out


def run_setting(spec: dict, decoder, prompts, rewards, model, tok) -> dict:
    """{objective: evaluator result} of one setting."""
    from mavis_align.evaluate import DecoderPolicy, evaluate_policy, evaluate_weightings
    from mavis_align.generation import SamplingConfig

    if spec["kind"] == "token":
        cfg = SamplingConfig(max_new_tokens=MAX_NEW, top_k=TOP_K, beta=spec["beta"], normalize=False, tail="keep", tilt_tokens=spec["tilt_tokens"],
                             candidate_p=spec.get("candidate_p", 1.0))
        return evaluate_weightings(decoder, cfg, [(m, {m: 1.0}) for m in OBJECTIVES], prompts, rewards, model, tok, samples=SAMPLES,
                                   seed=SEED, chat=True, keep_examples=2)
    pb = float(spec.get("proposal_beta", 0.0))
    cfg = (SamplingConfig(max_new_tokens=MAX_NEW, top_k=TOP_K, normalize=False, tail="keep", tilt_tokens=spec["tilt_tokens"]) if pb > 0
           else SamplingConfig(max_new_tokens=MAX_NEW, top_k=0, normalize=False))
    out = {}
    for m in OBJECTIVES:
        policy = DecoderPolicy(m, decoder, cfg, weights={m: 1.0}, chat=True, chunk=spec["chunk"], candidates=spec["n"], select="best", batch_size=32,
                               proposal_beta=pb)
        out[m] = evaluate_policy(policy, prompts, rewards, model, tok, samples=SAMPLES, seed=SEED, chat=True, keep_examples=2)
    return out


def half_kl_tests(rows: dict, specs: dict, tables: dict) -> dict:
    """Per family (but token) and objective: its envelope's reward at half today's KL against today's reward."""
    d = rows[DEFAULT_KEY]
    half = {m: d[m]["kl"]["mean"] / 2 for m in OBJECTIVES}
    tests = {}
    for f in sorted({s["family"] for s in specs.values()} - {"token"}):
        per = {}
        for m in OBJECTIVES:
            at = next(r for r in tables[m]["methods"][f]["at"] if abs(r["kl"] - round(half[m], 2)) < 1e-9)
            per[m] = {"kl": round(half[m], 2), "reward": at["reward"], "lo": at["lo"], "hi": at["hi"], "default_reward": d[m]["rewards"][m]["mean"],
                      "default_kl": d[m]["kl"]["mean"], "pass": bool(at["reward"] >= d[m]["rewards"][m]["mean"]),
                      "diff_vs_token": at.get("diff"), "diff_lo": at.get("diff_lo"), "diff_hi": at.get("diff_hi")}
        tests[f] = {"objectives": per, "passes": sum(v["pass"] for v in per.values()),
                    "margin": sum(v["reward"] - v["default_reward"] for v in per.values()) / len(OBJECTIVES)}
    return tests


def choose(rows: dict, specs: dict, ref: dict, tables: dict) -> dict:
    """The rule of the module docstring -> the chosen family and setting, with the per-objective tests."""
    d = rows[DEFAULT_KEY]
    tests = half_kl_tests(rows, specs, tables)
    fams = sorted(f for f in tests if not f.startswith(REPORT_ONLY))
    best = max(fams, key=lambda f: (tests[f]["passes"], tests[f]["margin"])) if fams else None
    if best is None or tests[best]["passes"] == 0:
        return {"family": "token", "setting": DEFAULT_KEY, "why": "no family reaches today's reward at half today's KL on any objective", "tests": tests}
    budget = {m: d[m]["kl"]["mean"] for m in OBJECTIVES}
    cands = []
    for key, s in specs.items():
        if s["family"] != best:
            continue
        r = rows[key]
        if all(r[m]["kl"]["mean"] <= budget[m] for m in OBJECTIVES):
            gain = sum(r[m]["rewards"][m]["mean"] - ref["rewards"][m]["mean"] for m in OBJECTIVES) / len(OBJECTIVES)
            cands.append((gain, -sum(r[m]["kl"]["mean"] for m in OBJECTIVES), key))
    if not cands:
        return {"family": best, "setting": None, "why": f"{best} passes {tests[best]['passes']} objective(s) but none of its settings is within today's KL for every objective",
                "tests": tests}
    key = max(cands)[2]
    return {"family": best, "setting": key, "why": f"{best} passes {tests[best]['passes']} of {len(OBJECTIVES)} objectives (margin {tests[best]['margin']:+.3f}); "
            f"{key}: the largest mean reward gain within today's KL", "tests": tests}


def _interval(v: dict) -> str:
    return f" [{v['lo']:.3f}, {v['hi']:.3f}]" if v.get("lo") is not None and v.get("hi") is not None else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/tilt_design")
    ap.add_argument("--values", default="packaged:default")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--horizons", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--chunks", type=int, nargs="+", default=[10])
    ap.add_argument("--hybrid", type=int, default=8, help="tilt horizon of the hybrid family (0: no hybrid family)")
    ap.add_argument("--nucleus", type=float, nargs="*", default=[0.8], help="candidate_p of the report-only nucleus families")
    ap.add_argument("--final", action="store_true", help="read the chosen setting and today's default once on the final split")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"), help="where the tables go")
    args = ap.parse_args()

    from mavis_align.data import load_prompts
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.demo import balanced_prompts, steering_z
    from mavis_align.evaluate.matched import KL_LEVELS, format_cell, matched_kl, point_of
    from mavis_align.models import load_causal_lm
    from mavis_align.provenance import write_json, write_run_record
    from mavis_align.rewards import get_rewards
    from mavis_align.rewards.independent import with_independent
    from mavis_align.values import ValueModel

    res_dir = Path(args.results)
    specs = settings(args.horizons, args.chunks, args.hybrid, tuple(args.nucleus))
    split = "final" if args.final else "val"
    out = Path(args.out + ("-final" if args.final else ""))
    (out / "rows").mkdir(parents=True, exist_ok=True)
    write_run_record(out, vars(args), SEED)
    model, tok = load_causal_lm("smollm2-135m-instruct")
    decoder = MavisDecoder(model, tok, [ValueModel.load(args.values)])
    prompts = balanced_prompts(load_prompts("hh-mix", split, seed=0, tokenizer=tok), PER_CATEGORY)
    rewards = get_rewards(with_independent(OBJECTIVES))
    if args.final:  # today's default and the chosen family, every setting of it (no choice is made here)
        chosen_dev = json.loads((res_dir / "tilt_design.json").read_text())["chosen"]
        specs = {k: s for k, s in specs.items() if k == DEFAULT_KEY or s["family"] == chosen_dev["family"]}
    ref = ref_result(out, model, tok, prompts, rewards)
    rows = {}
    for key, spec in specs.items():
        path = out / "rows" / f"{key}.json"
        if not path.exists():
            res = run_setting(spec, decoder, prompts, rewards, model, tok)
            write_json(path, {"spec": spec, "results": res})
            print(key, {m: (round(res[m]["rewards"][m]["mean"], 3), round(res[m]["kl"]["mean"], 2)) for m in OBJECTIVES}, flush=True)
        rows[key] = json.loads(path.read_text())["results"]
    fams: dict[str, list[str]] = {}
    for key, s in specs.items():
        fams.setdefault(s["family"], []).append(key)
    tables = {}
    for m in OBJECTIVES:
        methods = {f: [point_of(rows[k][m], [m], weights=[1.0], label=k) for k in ks] for f, ks in fams.items()}
        levels = sorted(set(KL_LEVELS) | {round(rows[DEFAULT_KEY][m]["kl"]["mean"] / 2, 2), round(rows[DEFAULT_KEY][m]["kl"]["mean"], 2)})
        tables[m] = matched_kl(methods, levels=levels, anchor=point_of(ref, [m], weights=[1.0]), against="token", n_boot=args.boot, seed=SEED)
    chosen = choose(rows, specs, ref, tables) if not args.final else {
        "family": chosen_dev["family"], "setting": chosen_dev["setting"], "why": "chosen on the dev prompts (tilt_design.md)",
        "tests": half_kl_tests(rows, specs, tables)}
    cmd = "python benchmarks/tilt_design.py" + (" --final" if args.final else "")
    lines = [f"# Decode designs at matched KL ({'final split: the verdict, read once' if args.final else 'dev prompts'})", "",
             f"`{cmd}` — `{args.values}`, raw values, top-{TOP_K}, tail keep for token tilts, ≤ {MAX_NEW} tokens, hh-mix {split} prompts "
             f"({PER_CATEGORY} ordinary + {PER_CATEGORY} harmful) × {SAMPLES} samples, seed {SEED}, λ = {{m: 1}}. Cost: base-model tokens "
             "decoded per response token (step-level decodes N candidates) and wall seconds of the setting (3 objectives).", "",
             "| setting | " + " | ".join(f"{m} (KL)" for m in OBJECTIVES) + " | z vs π_ref | independent z vs π_ref | cost (tokens ×) | seconds |",
             "|---" * (len(OBJECTIVES) + 5) + "|",
             "| π_ref | " + " | ".join(f"{ref['rewards'][m]['mean']:.3f} (0)" for m in OBJECTIVES) + " | – | – | 1 | – |"]
    from mavis_align.rewards.independent import INDEPENDENT

    for key, res in rows.items():
        s = specs[key]
        zs = ", ".join(f"{steering_z(res[m]['rewards'][m], ref['rewards'][m], SAMPLES):+.1f}" for m in OBJECTIVES)
        iz = ", ".join(f"{steering_z(res[m]['rewards'][INDEPENDENT[m]], ref['rewards'][INDEPENDENT[m]], SAMPLES):+.1f}" for m in OBJECTIVES)
        secs = sum(res[m]["seconds"] for m in OBJECTIVES) if s["kind"] == "step" else res[OBJECTIVES[0]]["seconds"]
        lines.append(f"| {key} | " + " | ".join(f"{res[m]['rewards'][m]['mean']:.3f} ({res[m]['kl']['mean']:.1f})" for m in OBJECTIVES)
                     + f" | {zs} | {iz} | {s.get('n', 1)} | {secs:.0f} |")
    lines += ["", "Reward within each KL budget on each family's envelope (π_ref at 0; ᵐ mixture with π_ref below the cheapest point; "
              "ᵖ beyond the largest KL: its best point), 95 % paired-bootstrap intervals over prompts; family − token in the detail:", ""]
    for m, t in tables.items():
        lines += [f"**{m}** (today's default: {rows[DEFAULT_KEY][m]['rewards'][m]['mean']:.3f} at {rows[DEFAULT_KEY][m]['kl']['mean']:.2f} nats)", "",
                  "| family | " + " | ".join(f"{lv:g} nats" for lv in t["levels"]) + " |", "|---" * (len(t["levels"]) + 1) + "|"]
        for f, info in t["methods"].items():
            lines.append(f"| {f} | " + " | ".join(format_cell(r) for r in info["at"]) + " |")
        lines.append("")
    if chosen is not None:
        lines += ["## The rule's choice (fixed before the data, see the script)" if not args.final else "## The dev choice read on the final split", "",
                  "| family | " + " | ".join(f"{m}: reward at ½ today's KL vs today's (pass)" for m in OBJECTIVES) + " | passes |", "|---" * (len(OBJECTIVES) + 2) + "|"]
        for f, t in chosen["tests"].items():
            lines.append(f"| {f} | " + " | ".join(f"{v['reward']:.3f}{_interval(v)} at {v['kl']:g} vs {v['default_reward']:.3f} ({'yes' if v['pass'] else 'no'})"
                                                  for v in t["objectives"].values()) + f" | {t['passes']} |")
        lines += ["", f"**Chosen**: family `{chosen['family']}`, setting `{chosen['setting']}` ({chosen['why']}).", ""]
        if args.final:
            t = chosen["tests"].get(chosen["family"])
            if t is not None:
                lines += [f"**Verdict on the final split**: the chosen family reaches today's reward at half today's KL on {t['passes']} of "
                          f"{len(OBJECTIVES)} objectives (point estimates; intervals above).", ""]
    name = "tilt_design-final" if args.final else "tilt_design"
    write_json(res_dir / f"{name}.json", {"config": vars(args), "prompts": prompts, "specs": specs,
                                         "rows": {k: {m: {"reward": {x: y for x, y in r[m]["rewards"][m].items() if x != "values"},
                                                          "kl": {x: y for x, y in r[m]["kl"].items() if x != "values"}} for m in OBJECTIVES} for k, r in rows.items()},
                                         "matched_kl": tables, "chosen": chosen})
    (res_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
