"""The demo's steering rows (π_ref and each objective alone: same 12 held-out prompts, seed,
k=15, 2 samples, paired z; β and the tilt's form as given) with any value model in place of the demo's own, to tell whether the
demo's weak rows come from its value models' training data or from its small evaluation.

    python benchmarks/demo_models.py runs/value_backbones/models/trunk4-prompt_response-ridge-400p/best

(that folder is written by ``python benchmarks/value_backbones.py``). Prints one line per row.
"""

from __future__ import annotations

import argparse

from mavis_align.data import load_prompts
from mavis_align.decoding.decoder import MavisDecoder
from mavis_align.demo import TOP_K_ONLY, balanced_prompts, steering_settings, steering_z
from mavis_align.evaluate import DecoderPolicy, evaluate_policy
from mavis_align.generation import SamplingConfig
from mavis_align.models import load_causal_lm
from mavis_align.rewards import get_rewards
from mavis_align.values import ValueModel

OBJECTIVES = ["helpful", "harmless", "humor"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("value_model", help="a value-model folder with heads for helpful, harmless and humor")
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--no-normalize", action="store_true", help="tilt the raw values (packaged:default's tilt, what make demo uses: --beta 50 --no-normalize)")
    args = ap.parse_args()
    model, tok = load_causal_lm("smollm2-135m-instruct")
    vm = ValueModel.load(args.value_model)
    test = load_prompts("hh-mix", "test", seed=0, tokenizer=tok)  # the earlier demo's prompts (make demo now reads the final split)
    prompts = balanced_prompts(test, 6)
    cfg = SamplingConfig(max_new_tokens=40, top_k=15, beta=args.beta, normalize=not args.no_normalize)
    rewards = get_rewards(OBJECTIVES)
    ref = None
    for label, weights in [s for s in steering_settings(OBJECTIVES) if s[0] != TOP_K_ONLY][:4]:
        policy = DecoderPolicy(label, MavisDecoder(model, tok, [vm]) if weights else MavisDecoder(model, tok),
                               cfg if weights else SamplingConfig(max_new_tokens=40), weights=weights, chat=True)
        res = evaluate_policy(policy, prompts, rewards, model, tok, samples=2, seed=0, chat=True, keep_examples=24)
        ref = ref or res["rewards"]
        zs = {m: round(steering_z(res["rewards"][m], ref[m], 2), 1) for m in (weights or {})}
        print(label, {m: round(res["rewards"][m]["mean"], 3) for m in OBJECTIVES}, "KL", round(res["kl"]["mean"], 2), "z", zs, flush=True)


if __name__ == "__main__":
    main()
