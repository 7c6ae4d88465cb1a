"""Distil the demo's three value models into one 3-head model and compare MAVIS with either, on
the embedded default (paper App. E / Table 3, at this machine's scale).

    python benchmarks/distill_default.py --run DEMO_RUN_FOLDER [--prompts 12] [--samples 2] [--beta 5]

DEMO_RUN_FOLDER is the folder `mavis-align demo` prints (it holds iter0/trees.h5 and
iter0/<objective>/value/best). For each objective m: reward R_m and KL of MAVIS with lambda = {m: 1}
using the original V_m vs the distilled head, on held-out val prompts, and decoding speed of the
three separate models vs the one 3-head model. Writes ``benchmarks/results/distill_default.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mavis_align.data import load_prompts
from mavis_align.decoding.decoder import MavisDecoder
from mavis_align.evaluate import evaluate_decoder
from mavis_align.generation import SamplingConfig
from mavis_align.models import load_causal_lm
from mavis_align.provenance import run_record
from mavis_align.rewards import get_rewards
from mavis_align.train import DistillConfig, distill
from mavis_align.values import ValueModel, build_value_model

OBJECTIVES = ["helpful", "harmless", "humor"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--beta", type=float, default=5.0)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_default.json"))
    args = ap.parse_args()
    run = Path(args.run)
    teachers = [ValueModel.load(run / "iter0" / m / "value" / "best") for m in OBJECTIVES]
    student_dir = run / "distill"
    if not (student_dir / "student" / "meta.json").exists():
        student = build_value_model(OBJECTIVES, backbone="tiny", seed=11)
        distill(teachers, student, [run / "iter0" / "trees.h5"], student_dir, DistillConfig(epochs=args.epochs))
    dres = json.loads((student_dir / "result.json").read_text())
    student = ValueModel.load(student_dir / "student")
    model, tok = load_causal_lm()
    prompts = [p.text for p in load_prompts("hh-mix", "val", tokenizer=tok, limit=args.prompts)]
    rewards = get_rewards(OBJECTIVES)
    cfg = SamplingConfig(max_new_tokens=40, top_k=15, beta=args.beta)
    separate, multi = MavisDecoder(model, tok, teachers), MavisDecoder(model, tok, [student])
    rows = {}
    for m in OBJECTIVES:
        a = evaluate_decoder(separate, prompts, rewards, weights={m: 1.0}, config=cfg, samples=args.samples)
        b = evaluate_decoder(multi, prompts, rewards, weights={m: 1.0}, config=cfg, samples=args.samples)
        rows[m] = {
            "original_reward": a["rewards"][m]["mean"], "original_se": a["rewards"][m]["se"], "original_kl": a["kl"]["mean"],
            "distilled_reward": b["rewards"][m]["mean"], "distilled_se": b["rewards"][m]["se"], "distilled_kl": b["kl"]["mean"],
            "reward_gap": a["rewards"][m]["mean"] - b["rewards"][m]["mean"],
        }
        print(m, json.dumps(rows[m]), flush=True)
    w = {m: 1.0 for m in OBJECTIVES}
    speed_cfg = SamplingConfig(max_new_tokens=40, min_new_tokens=40, top_k=15, beta=args.beta)
    sa = evaluate_decoder(separate, prompts[:8], rewards[:0], weights=w, config=speed_cfg)
    sb = evaluate_decoder(multi, prompts[:8], rewards[:0], weights=w, config=speed_cfg)
    out = {"distill": dres, "per_objective": rows, "beta": args.beta, "prompts": len(prompts), "samples": args.samples,
           "tokens_per_s_three_models": sa["tokens_per_s"], "tokens_per_s_one_3head_model": sb["tokens_per_s"],
           "speedup": sb["tokens_per_s"] / sa["tokens_per_s"]}
    Path(args.out).write_text(json.dumps({"run": run_record(vars(args), 0), "results": out}, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
