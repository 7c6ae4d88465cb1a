"""How far is the paper's multi-objective approximation from the exact optimum?

On random tiny token MDPs (pi_ref = a random 2-layer Llama over 4 tokens, responses of H tokens,
two random rewards R_1, R_2 on whole responses), compare

* pi*_lambda: the exact optimum of E[lambda R_1 + (1 - lambda) R_2] - eta KL(pi || pi_ref), and
* pi_MAVIS: decoding with lambda V*_1 + (1 - lambda) V*_2 (the exact per-objective soft values,
  beta = 1/eta, no normalisation, k = |V|), which is the paper's eq. 5 applied token by token.

For H = 1 the two coincide (checked to 1e-6 in tests/test_tilt.py); for H > 1 this reports the
KL between them and the loss in the regularised objective.

    python benchmarks/mdp_gap.py [--mdps 20]

Writes ``benchmarks/results/mdp_gap.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mavis_align.decoding.engine import decode_ids
from mavis_align.decoding.exact import TokenMDP, kl_divergence
from mavis_align.decoding.steppers import CachedBase, SequenceValueScorer
from mavis_align.generation import SamplingConfig
from mavis_align.provenance import run_record

VOCAB, PROMPT = 4, [1, 2]


def tiny_lm(seed: int):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a peakier pi_ref than the near-uniform random init
        model.lm_head.weight.mul_(20.0)
    return model


def mavis_logprobs(mdp, model, rewards, lam, eta):
    n = len(mdp.sequences)
    ids = torch.tensor([PROMPT] * n)
    scorer = SequenceValueScorer(mdp.value_fn(rewards, eta), ["r1", "r2"])
    cfg = SamplingConfig(max_new_tokens=mdp.horizon, top_k=VOCAB, normalize=False, beta=1.0 / eta)
    rows = decode_ids(CachedBase(model), ids, torch.ones_like(ids), cfg, eos_id=None, scorer=scorer,
                      weights=torch.tensor([lam] * n, dtype=torch.float32), forced=[list(y) for y in mdp.sequences])
    return {y: sum(r.logprobs_gen) for y, r in zip(mdp.sequences, rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mdps", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mdp_gap.json"))
    args = ap.parse_args()
    rows = []
    for horizon in (1, 2, 3):
        for eta in (0.25, 1.0):
            for lam1 in (0.5, 0.8):
                kls, gaps, rel = [], [], []
                for i in range(args.mdps):
                    model = tiny_lm(i)
                    mdp = TokenMDP(model, PROMPT, VOCAB, horizon)
                    g = torch.Generator().manual_seed(1000 + i)
                    r1 = {y: float(torch.randn((), generator=g)) for y in mdp.sequences}
                    r2 = {y: float(torch.randn((), generator=g)) for y in mdp.sequences}
                    lam = [lam1, 1 - lam1]
                    comb = {y: lam[0] * r1[y] + lam[1] * r2[y] for y in mdp.sequences}
                    exact = mdp.optimal_logprobs(comb, eta)
                    approx = mavis_logprobs(mdp, model, [r1, r2], lam, eta)
                    ref = {y: mdp.ref_logprob(y) for y in mdp.sequences}
                    j_opt = mdp.objective(exact, comb, eta)["objective"]
                    j_mav = mdp.objective(approx, comb, eta)["objective"]
                    j_ref = mdp.objective(ref, comb, eta)["objective"]
                    kls.append(kl_divergence(approx, exact))
                    gaps.append(j_opt - j_mav)
                    rel.append((j_mav - j_ref) / (j_opt - j_ref) if j_opt - j_ref > 1e-12 else 1.0)
                row = {
                    "horizon": horizon, "eta": eta, "lambda_1": lam1, "mdps": args.mdps,
                    "kl_mavis_to_exact_mean": statistics.mean(kls), "kl_mavis_to_exact_max": max(kls),
                    "objective_gap_mean": statistics.mean(gaps), "objective_gap_max": max(gaps),
                    "fraction_of_optimal_improvement_over_ref_mean": statistics.mean(rel),
                    "fraction_min": min(rel),
                }
                rows.append(row)
                print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run_record(vars(args), 0), "rows": rows}, indent=2) + "\n")
    assert all(math.isfinite(r["objective_gap_mean"]) for r in rows)


if __name__ == "__main__":
    main()
