"""Tree building speed of one checkout, for A/B comparisons of the builder across commits.

    PYTHONPATH=<checkout>/src python benchmarks/collect_ab.py --label NAME [--prompts 16] [--group-size 4] [--max-rows 64]

Builds GET_DATA trees (the demo's shape: 3 layers, k_root 4, k 2, 40 tokens) for the first
``--prompts`` hh-mix train prompts on the embedded default, in groups of ``--group-size`` as
``collect`` grows them (one warm-up group first), and appends generated tokens / second with the
checkout's git commit to ``benchmarks/results/collect_ab.jsonl``. Run two checkouts alternately,
several times each, in one session: the machine is shared and noisy, so compare medians of pairs.

Recorded (``collect_ab.jsonl``, 2-core CPU, 16 prompts, 2 alternating pairs per shape): a builder that
refills the batch continuously (children join as soon as their parent's row ends, instead of layer by
layer; ``benchmarks/results/continuous-builder.patch``) kept the batch at 0.90 of ``max_rows`` against 0.48 on a
tiny model but was no faster on the CPU: 132 / 139 vs 132 / 114 tok/s at groups of 4 and 64 rows,
135 / 153 vs 163 / 170 at groups of 16 and 128 rows (a CPU step costs in proportion to its rows, so
a draining batch costs little, while every join merges the caches). Not adopted; a GPU, whose step
time hardly grows with the batch, is where it should pay, unmeasured here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

import mavis_align
from mavis_align.collect import GenPolicy, TreeConfig, build_trees
from mavis_align.collect.runner import group_generator
from mavis_align.data import load_prompts
from mavis_align.models import format_prompts, load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/collect_ab.jsonl")
    args = ap.parse_args()
    model, tok = load_causal_lm("smollm2-135m-instruct")
    policy = GenPolicy(model, tok)
    cfg = TreeConfig(num_layers=3, k_root=4, k=2, max_new_tokens=40, max_rows=args.max_rows)
    prompts = [p.text for p in load_prompts("hh-mix", "train", seed=0)[: args.prompts]]
    formatted = format_prompts(tok, prompts, chat=True)
    items = [(i, p, tok(f, add_special_tokens=False)["input_ids"]) for i, (p, f) in enumerate(zip(prompts, formatted))]
    groups = [items[s : s + args.group_size] for s in range(0, len(items), args.group_size)]
    build_trees(policy, groups[0][:2], cfg, torch.Generator().manual_seed(0))  # warm-up
    t0, tokens = time.perf_counter(), 0
    for g, group in enumerate(groups):
        trees = build_trees(policy, group, cfg, group_generator(0, g))
        tokens += sum(len(n.tokens) for t in trees for n in t.nodes)
    seconds = time.perf_counter() - t0
    src = Path(mavis_align.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(src), "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip())
    rec = {"label": args.label, "commit": commit, "dirty": dirty, "prompts": args.prompts, "group_size": args.group_size, "max_rows": args.max_rows,
           "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1), "threads": torch.get_num_threads(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(rec))
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
