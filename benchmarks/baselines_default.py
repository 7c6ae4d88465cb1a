"""First Pareto front on the embedded default: helpful vs harmless.

1. RL fine-tunes LoRA policies with a KL penalty (TRL GRPO) for helpful, for harmless, and a
   MORLHF policy for lambda = (0.5, 0.5) (skipped when already trained);
2. sweeps lambda over {0, 0.5, 1} (or --grid-step) for MAVIS (the demo's iteration-0 value
   models), MAVIS beam search, Rewarded Soups and MOD, next to pi_ref, best-of-N of pi_ref and
   MORLHF, all through the one evaluator;
3. copies fronts.json / fronts.md / front.png|svg / reward_kl.png|svg and the baselines' costs
   into benchmarks/results/pareto_default/.

    python benchmarks/baselines_default.py --values DEMO_RUN/iter0 --work runs/baselines

Resumable: finished policies and finished sweep points are reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from mavis_align.baselines import RLConfig, train_rl_policy
from mavis_align.data import load_prompts
from mavis_align.evaluate import SweepSpec, run_sweep
from mavis_align.models import load_tokenizer

OBJ = ["helpful", "harmless"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", required=True, help="folder with <objective>/value/best (e.g. the demo's iter0)")
    ap.add_argument("--work", default="runs/baselines")
    ap.add_argument("--rl-steps", type=int, default=40)
    ap.add_argument("--rl-prompts", type=int, default=160)
    ap.add_argument("--grid-step", type=float, default=0.5)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--beta", type=float, default=5.0)
    ap.add_argument("--methods", default="ref,mavis,rsoup,mod,morlhf,bon-ref,mavis-beam")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pareto_default"))
    args = ap.parse_args()
    work = Path(args.work)
    tok = load_tokenizer("smollm2-135m-instruct")
    prompts = [p.text for p in load_prompts("hh-mix", "train", tokenizer=tok, limit=args.rl_prompts)]
    cfg = RLConfig(steps=args.rl_steps)
    costs = {}
    for name, w in [("helpful", {"helpful": 1.0}), ("harmless", {"harmless": 1.0}), ("morlhf-0.5", {"helpful": 0.5, "harmless": 0.5})]:
        t0 = time.perf_counter()
        folder = train_rl_policy("smollm2-135m-instruct", prompts, w, work / f"rl-{name}", cfg)
        meta = json.loads((folder / "mavis_policy.json").read_text())
        costs[name] = {"train_seconds": meta["train_seconds"], "steps": cfg.steps, "this_call_seconds": round(time.perf_counter() - t0, 1)}
        print(name, costs[name], flush=True)
    values = Path(args.values)
    spec = SweepSpec(
        objectives=OBJ, values={o: str(values / o / "value" / "best") for o in OBJ},
        policies={o: str(work / f"rl-{o}") for o in OBJ}, morlhf={"0.5": str(work / "rl-morlhf-0.5")},
        methods=args.methods.split(","), grid_step=args.grid_step, beta=args.beta, n=5, prompts=args.prompts, samples=args.samples,
        max_new_tokens=40, top_k=15,
    )
    (work / "sweep.yaml").write_text(yaml.safe_dump(spec.__dict__))
    summary = run_sweep(spec, work / "sweep")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("fronts.json", "fronts.md", "front.png", "front.svg", "reward_kl.png", "reward_kl.svg", "run.json"):
        shutil.copy(work / "sweep" / name, out / name)
    speeds = {}
    for p in (work / "sweep" / "points").glob("*.json"):
        r = json.loads(p.read_text())
        speeds.setdefault(r["method"], []).append(r["tokens_per_s"])
    (out / "costs.json").write_text(json.dumps({"rl_training": costs, "decode_tokens_per_s": {m: sum(v) / len(v) for m, v in speeds.items()},
                                                "sweep": spec.__dict__}, indent=2, default=str) + "\n")
    print((out / "fronts.md").read_text())
    print(json.dumps(summary["reference_point"]))


if __name__ == "__main__":
    main()
