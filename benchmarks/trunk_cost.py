"""What one decoding step costs, piece by piece, for a value trunk made of the base model's first N layers.

Per step, MAVIS with a frozen `trunk:N` value model runs (1) the base model on the chosen token (all L
layers + LM head), (2) the k candidates through the trunk's N layers as one block, (3) the chosen token
through the trunk's N layers (its own KV cache). A fused stepper that shares the base's KV cache would
skip (3) and the chosen token's first N layers in (1), since the candidate block already computed them.
This script times the pieces on the embedded default (same process, same prompts, median of repeats)
and writes the measured step cost of today's path and the estimated cost of the fused one as ratios to
plain decoding (1 token through all L layers), for N in {4, 8, 16} at batch 1 and 8, k = 15.

    python benchmarks/trunk_cost.py   ->  benchmarks/results/trunk_cost.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from decode_profile import median_ms  # benchmarks/ is on sys.path when a script here runs
from transformers import DynamicCache

from mavis_align.models import load_causal_lm
from mavis_align.provenance import run_record
from mavis_align.values import truncated_backbone

K, PROMPT_TOKENS, REPEATS = 15, 80, 20
OUT = Path(__file__).parent / "results" / "trunk_cost.json"


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    model, _ = load_causal_lm("smollm2-135m-instruct")
    n_layers = model.config.num_hidden_layers
    rows = []
    for batch in (1, 8):
        ids = torch.randint(100, 20000, (batch, PROMPT_TOKENS))
        pos1 = torch.full((batch, 1), PROMPT_TOKENS)
        posk = torch.full((batch, K), PROMPT_TOKENS)
        cache = DynamicCache()
        model(input_ids=ids, cache=cache, use_cache=True)

        def base_step():
            model(input_ids=ids[:, :1], position_ids=pos1, cache=cache, use_cache=True)
            cache.crop(-1)

        base = median_ms(base_step, REPEATS)
        for n in (4, 8, 16):
            trunk = truncated_backbone(model, n)
            tc = DynamicCache()
            trunk(input_ids=ids, cache=tc, use_cache=True)

            def candidates():
                trunk(input_ids=ids[:, :K], position_ids=posk, cache=tc, use_cache=True)
                tc.crop(-K)

            def chosen():
                trunk(input_ids=ids[:, :1], position_ids=pos1, cache=tc, use_cache=True)
                tc.crop(-1)

            cand, one = median_ms(candidates, REPEATS), median_ms(chosen, REPEATS)
            today = base + cand + one
            # fused: the candidates' block is the chosen token's first n layers; the base runs the rest.
            # Upper layers cost at most base * (L - n) / L plus nothing else (the LM head is inside `base`).
            fused = cand + base * (n_layers - n) / n_layers
            rows.append({"batch": batch, "trunk_layers": n, "k": K, "base_step_ms": round(base, 1), "candidates_ms": round(cand, 1),
                         "chosen_token_trunk_ms": round(one, 1), "today_step_ms": round(today, 1), "today_ratio": round(base / today, 3),
                         "fused_step_ms_estimate": round(fused, 1), "fused_ratio_estimate": round(base / fused, 3)})
            print(rows[-1], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows, "note": "ratios = plain decoding step / MAVIS step (value heads and sampling not counted); "
                               "fused is an estimate: candidates' block + the base's upper layers, scaled by layer count",
                               "run": run_record({"k": K, "prompt_tokens": PROMPT_TOKENS, "repeats": REPEATS}, 0)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
