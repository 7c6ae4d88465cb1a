"""Pairwise Pearson correlation of the default rewards over base-model responses.

Samples one response per prompt from the embedded default base model (pi_ref, temperature 1,
64 new tokens) for N prompts of the default prompt mix (val split, helpful + harmful), scores
each with every default reward, and writes the correlation matrix (overall and per prompt
category) to ``benchmarks/results/reward_correlation.json`` plus a markdown table.

    python benchmarks/reward_correlation.py [--n 240] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mavis_align.data import load_prompts
from mavis_align.generation import SamplingConfig, generate
from mavis_align.models import DEFAULT_BASE_MODEL, load_causal_lm
from mavis_align.provenance import run_record
from mavis_align.rewards import get_rewards, score_all

OBJECTIVES = ("helpful", "harmless", "humor", "positive")


def correlation(scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    names = list(scores)
    x = torch.tensor([scores[n] for n in names], dtype=torch.float64)
    c = torch.corrcoef(x)
    return {a: {b: round(float(c[i, j]), 3) for j, b in enumerate(names)} for i, a in enumerate(names)}


def markdown(matrix: dict[str, dict[str, float]]) -> str:
    names = list(matrix)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        lines.append(f"| **{a}** | " + " | ".join(f"{matrix[a][b]:+.2f}" for b in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=228, help="number of prompts (the whole hh-mix val split is 228)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward_correlation.json"))
    args = ap.parse_args()

    model, tokenizer = load_causal_lm(DEFAULT_BASE_MODEL)
    prompts = load_prompts("hh-mix", "val", seed=0, tokenizer=tokenizer, limit=args.n)
    t0 = time.perf_counter()
    gens = generate(model, tokenizer, [p.text for p in prompts], SamplingConfig(max_new_tokens=args.max_new_tokens), seed=args.seed, batch_size=8, progress=True)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = score_all(get_rewards(OBJECTIVES), [g.prompt for g in gens], [g.text for g in gens])
    score_s = time.perf_counter() - t0

    result = {
        "n_responses": len(gens),
        "prompts": "hh-mix val split (helpful + harmful)",
        "generation_seconds": round(gen_s, 1),
        "reward_seconds": round(score_s, 1),
        "mean": {k: round(sum(v) / len(v), 4) for k, v in scores.items()},
        "pearson": correlation(scores),
        "pearson_by_category": {},
        "run": run_record(vars(args), args.seed),
    }
    for cat in sorted({p.category for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if p.category == cat]
        result["pearson_by_category"][cat] = {"n": len(idx), "pearson": correlation({k: [v[i] for i in idx] for k, v in scores.items()})}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    samples = [{"prompt": g.prompt, "response": g.text, **{k: round(v[i], 3) for k, v in scores.items()}} for i, g in enumerate(gens[:12])]
    out.with_name("reward_correlation_samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    print(markdown(result["pearson"]))
    for cat, r in result["pearson_by_category"].items():
        print(f"\n{cat} (n={r['n']}):\n{markdown(r['pearson'])}")
    print(f"\nmeans: {result['mean']}; generation {gen_s:.0f}s, rewards {score_s:.0f}s -> {out}")


if __name__ == "__main__":
    main()
