"""The tilt with and without NORMALIZE, at matched KL (paper eq. 14 vs the authors' 2026 code).

The paper min-max normalises the k candidates' values v to [0, 1] before the tilt, so β is the
largest log-odds shift at every step, whatever the spread of v; the authors' 2026 code drops it and
tilts by β · v on the raw values (mavis-v3-notes.md). With value models that are unsure, NORMALIZE
stretches small, noisy differences to the full range; the raw tilt moves π_ref in proportion to how
much the candidates' values differ. This benchmark measures which buys more reward per nat of KL.

    python benchmarks/tilt_scale.py [VALUE_MODEL ...] [--out runs/tilt_scale] [--max-step-kl CAP ...] [--name tilt_scale]

VALUE_MODEL (default: the value-backbones benchmark's 400-prompt model): one model with heads for helpful,
harmless and humor, or one model per objective (e.g. the demo's ``iter0/<objective>/value/best``).
``--max-step-kl`` adds raw-tilt rows with each per-step KL cap (SamplingConfig.max_step_kl) at every raw β. Prompts: hh-mix test prompts 40 onwards (12 ordinary, 12 harmful), disjoint from
the demo's and the reproduction study's test prompts, so settings chosen here can be checked there.
λ = {m: 1}, top-k 15, ≤ 40 tokens, 2 samples per prompt, seed 0; z is paired by prompt against π_ref.
Every row is saved as it finishes (a rerun resumes); results → benchmarks/results/tilt_scale.{json,md}.

Also reports the spread that NORMALIZE removes: over π_ref's decoding states, the range
(max − min) of each head's raw values among the top-k candidates.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from mavis_align.data import load_prompts
from mavis_align.decoding.decoder import MavisDecoder
from mavis_align.demo import balanced_prompts, steering_z
from mavis_align.evaluate import DecoderPolicy, evaluate_policy
from mavis_align.generation import SamplingConfig
from mavis_align.models import format_prompts, load_causal_lm
from mavis_align.provenance import write_json, write_run_record
from mavis_align.report import reward_at_kl, upper_envelope
from mavis_align.rewards import get_rewards
from mavis_align.values import ValueModel

OBJECTIVES = ["helpful", "harmless", "humor"]
DEFAULT_MODEL = "runs/value_backbones/models/trunk4-prompt_response-ridge-400p/best"
NORMALIZED_BETAS = [1.0, 2.0, 5.0]
RAW_BETAS = [10.0, 25.0, 50.0, 100.0]
TOP_K, MAX_NEW, SAMPLES, SEED, FIRST = 15, 40, 2, 0, 40


def dev_prompts(tok, per_category: int) -> list[str]:
    return balanced_prompts(load_prompts("hh-mix", "test", seed=0, tokenizer=tok)[FIRST:], per_category)


@torch.no_grad()
def candidate_spread(model, tok, vms: list[ValueModel], prompts: list[str], steps: int = 40) -> dict:
    """Range of each head's raw values among π_ref's top-k candidates, over the states of one
    π_ref sample per prompt (sequence scoring: the reference path, not the cached one)."""
    gen = torch.Generator().manual_seed(SEED)
    ranges: dict[str, list[float]] = {m: [] for vm in vms for m in vm.objectives}
    for text in format_prompts(tok, prompts, chat=True):
        ids = tok(text, return_tensors="pt").input_ids
        plen = ids.shape[1]
        for _ in range(steps):
            logits = model(ids).logits[0, -1]
            top = logits.topk(TOP_K).indices
            cand = torch.cat([ids.expand(TOP_K, -1), top[:, None]], dim=1)
            for vm in vms:
                v = vm.score(cand, torch.ones_like(cand), prompt_lengths=torch.full((TOP_K,), plen))  # [k, M]
                for j, m in enumerate(vm.objectives):
                    ranges[m].append(float(v[:, j].max() - v[:, j].min()))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt[None]], dim=1)
    return {m: {"median": statistics.median(r), "p90": sorted(r)[int(0.9 * (len(r) - 1))], "states": len(r)} for m, r in ranges.items()}


def _kl(row: dict) -> float:
    """The row's KL: the sum of step KLs where recorded (less variance), else eq. 7."""
    return row["kl_steps"] if row.get("kl_steps") is not None else row["kl"]


def pick_setting(rows: list[dict], budget: float) -> dict | None:
    """One tilt setting for every objective: among the settings (tilt, β, cap) measured for all of them whose KL
    (:func:`_kl`) is within ``budget`` for each, the one whose smallest z is largest; None if none qualifies."""
    settings: dict[tuple, list[dict]] = {}
    for r in rows:
        settings.setdefault((r["normalize"], r["beta"], r["max_step_kl"]), []).append(r)
    n = len({r["objective"] for r in rows})
    ok = {k: v for k, v in settings.items() if len(v) == n and all(_kl(r) <= budget for r in v)}
    if not ok:
        return None
    (normalize, beta, cap), best = max(ok.items(), key=lambda kv: min(r["z"] for r in kv[1]))
    return {"tilt": "NORMALIZE" if normalize else "raw", "beta": beta, "max_step_kl": cap, "min_z": min(r["z"] for r in best),
            "kl": {r["objective"]: _kl(r) for r in best}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("value_model", nargs="*", default=[DEFAULT_MODEL])
    ap.add_argument("--out", default="runs/tilt_scale")
    ap.add_argument("--per-category", type=int, default=12)
    ap.add_argument("--raw-betas", type=float, nargs="*", default=RAW_BETAS)
    ap.add_argument("--normalized-betas", type=float, nargs="*", default=NORMALIZED_BETAS)
    ap.add_argument("--max-step-kl", type=float, nargs="*", default=[], help="per-step KL caps (nats) for extra raw-tilt rows")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--name", default="tilt_scale", help="results file stem")
    ap.add_argument("--kl-budget", type=float, default=None, metavar="NATS",
                    help="also pick one setting for all objectives: among those whose KL (Σ step KLs) stays within NATS for every "
                         "objective, the one whose smallest z over the objectives is largest (how the demo's tilt was chosen)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"value_model": args.value_model, "per_category": args.per_category, "raw_betas": args.raw_betas,
              "normalized_betas": args.normalized_betas, "max_step_kl": args.max_step_kl, "top_k": TOP_K, "max_new_tokens": MAX_NEW, "samples": SAMPLES, "first_prompt": FIRST}
    write_run_record(out, config, SEED)
    model, tok = load_causal_lm("smollm2-135m-instruct")
    vms = [ValueModel.load(p) for p in args.value_model]
    missing = [m for m in OBJECTIVES if not any(m in vm.objectives for vm in vms)]
    if missing:
        raise SystemExit(f"no value model for {missing} among {args.value_model}")
    prompts = dev_prompts(tok, args.per_category)
    rewards = get_rewards(OBJECTIVES)

    spread_path = out / "spread.json"
    if not spread_path.exists():
        write_json(spread_path, candidate_spread(model, tok, vms, prompts[:: max(1, len(prompts) // 8)]))
    spread = json.loads(spread_path.read_text())
    print("raw value range among top-k candidates:", spread, flush=True)

    def row(name: str, weights, cfg: SamplingConfig) -> dict:
        path = out / f"{name}.json"
        if not path.exists():
            dec = MavisDecoder(model, tok, vms) if weights else MavisDecoder(model, tok)
            res = evaluate_policy(DecoderPolicy(name, dec, cfg, weights=weights, chat=True), prompts, rewards, model, tok,
                                  samples=SAMPLES, seed=SEED, chat=True, keep_examples=0)
            write_json(path, {"rewards": res["rewards"], "kl": res["kl"], "kl_steps": res.get("kl_steps")})
        return json.loads(path.read_text())

    ref = row("pi_ref", None, SamplingConfig(max_new_tokens=MAX_NEW))
    rows = []
    for m in OBJECTIVES:
        arms = [(True, b, 0.0) for b in args.normalized_betas] + [(False, b, cap) for cap in [0.0, *args.max_step_kl] for b in args.raw_betas]
        for normalize, beta, cap in arms:
            name = f"{m}-{'norm' if normalize else 'raw'}-beta{beta:g}" + (f"-cap{cap:g}" if cap else "")
            r = row(name, {m: 1.0}, SamplingConfig(max_new_tokens=MAX_NEW, top_k=TOP_K, beta=beta, normalize=normalize, max_step_kl=cap))
            rows.append({"objective": m, "normalize": normalize, "beta": beta, "max_step_kl": cap, "reward": r["rewards"][m]["mean"], "se": r["rewards"][m]["se"],
                         "ref": ref["rewards"][m]["mean"], "z": steering_z(r["rewards"][m], ref["rewards"][m], SAMPLES),
                         "kl": r["kl"]["mean"], "kl_se": r["kl"].get("se"),
                         "kl_steps": (r.get("kl_steps") or {}).get("mean"), "kl_steps_se": (r.get("kl_steps") or {}).get("se")})
            print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)

    for r in rows:  # a capped row against the uncapped raw tilt's reward-vs-KL curve at the same KL (linear between its points)
        if not r["max_step_kl"]:
            continue
        same = [q for q in rows if q["objective"] == r["objective"] and not q["normalize"] and not q["max_step_kl"]]
        curve = upper_envelope([(0.0, r["ref"], 0.0)] + [(_kl(q), q["reward"], q["se"]) for q in same])
        at, at_se, inside = reward_at_kl(curve, _kl(r))
        r["uncapped_at_kl"] = {"reward": at, "se": at_se, "inside": inside}

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / f"{args.name}.json", {"config": config, "prompts": len(prompts), "spread": spread, "ref": ref["rewards"], "rows": rows})
    def vs_uncapped(r: dict) -> str:
        u = r.get("uncapped_at_kl")
        if not u:
            return "-"
        return f"{u['reward']:.3f} ({r['reward'] - u['reward']:+.3f})" + ("" if u["inside"] else ", past the curve's end: its best at lower KL")

    lines = [f"Tilt with NORMALIZE (paper) and on raw values (authors' 2026 code); value model(s) `{', '.join(args.value_model)}`; "
             f"{len(prompts)} hh-mix test prompts from #{FIRST} × {SAMPLES} samples, λ = {{m: 1}}, top-k {TOP_K}, ≤ {MAX_NEW} tokens; "
             "z paired by prompt vs π_ref; KL in nats: eq. 7 and the sum of step KLs (same expectation, less variance); "
             "cap: SamplingConfig.max_step_kl (per-step KL the tilt may add; - = none); 'uncapped at this KL': the uncapped raw "
             "tilt's reward-vs-KL curve (π_ref and its β points, upper envelope, by Σ step KLs) read at the capped row's KL.", "",
             "Raw value range among the top-k candidates over π_ref's states: "
             + ", ".join(f"{m} median {s['median']:.4f} (p90 {s['p90']:.4f}, {s['states']} states)" for m, s in spread.items()), "",
             "| objective | tilt | β | cap | reward ± se | π_ref | z | KL ± se | Σ step KL ± se | uncapped at this KL (diff) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl_se = f" ± {r['kl_se']:.1f}" if r["kl_se"] is not None else ""
        steps = f"{r['kl_steps']:.1f} ± {r['kl_steps_se']:.1f}" if r.get("kl_steps") is not None else "-"
        lines.append(f"| {r['objective']} | {'NORMALIZE' if r['normalize'] else 'raw'} | {r['beta']:g} | {r.get('max_step_kl') or '-'} | "
                     f"{r['reward']:.3f} ± {r['se']:.3f} | {r['ref']:.3f} | {r['z']:+.1f} | {r['kl']:.1f}{kl_se} | {steps} | {vs_uncapped(r)} |")
    if args.kl_budget is not None:
        pick = pick_setting(rows, args.kl_budget)
        lines += ["", f"Setting for all objectives within {args.kl_budget:g} nats each (largest smallest-z): "
                  + (f"{pick['tilt']} β={pick['beta']:g}, cap {pick['max_step_kl'] or 'none'} (smallest z {pick['min_z']:+.2f})" if pick else "none")]
        write_json(results / f"{args.name}.json", {**json.loads((results / f"{args.name}.json").read_text()), "kl_budget": args.kl_budget, "pick": pick})
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
