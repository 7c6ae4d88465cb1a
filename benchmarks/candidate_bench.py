"""The candidate-level value benchmark on the embedded default (issue 36): states, candidates and rollouts
collected once into ``runs/candidates-tok`` (resumable), then every value model given is scored on them.

    python benchmarks/candidate_bench.py [--value packaged:default ...] [--chunk 1]

= ``mavis-align candidates --out runs/candidates-tok --prompts 24 --positions 0 2 8 20 --k 8 --rollouts 16
--value packaged:default`` (24 hh-mix val prompts, 12 ordinary + 12 harmful; 94 states; 8 next-token
candidates each; 16 pi_ref rollouts per candidate to 40 tokens: about 30 min alone on 2 cores, 75 min
beside another job), then the tables are copied to ``benchmarks/results/candidate_bench[-chunkL].{md,json}``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--value", action="append", default=None)
    ap.add_argument("--chunk", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mavis_align.evaluate.candidates import CandidateBenchConfig, collect_candidates, score_benchmark

    suffix = "" if args.chunk == 1 else f"-chunk{args.chunk}"
    out = Path(args.out or f"runs/candidates-tok{suffix}")
    collect_candidates(CandidateBenchConfig(prompts=24, positions=[0, 2, 8, 20], k=8, chunk=args.chunk, rollouts=16), out)
    res = Path(__file__).parent / "results"
    for spec in args.value or ["packaged:default"]:
        score_benchmark(out, spec)
        name = spec.replace(":", "-").replace("/", "-").strip("-.")
        tag = "" if spec == "packaged:default" else f"-{name}"
        for ext in ("md", "json"):
            shutil.copyfile(out / f"scores-{name}.{ext}", res / f"candidate_bench{suffix}{tag}.{ext}")
    print((res / f"candidate_bench{suffix}.md").read_text() if (res / f"candidate_bench{suffix}.md").exists() else "")


if __name__ == "__main__":
    main()
