"""Where a MAVIS decoding step spends its time (batch 1, embedded default, k=15, tiny value model).

Times, each the median of many repetitions at a prefix of ``--prefix`` tokens:
the base model's cached step, its uncached forward of the whole prefix, one cached value-model
forward over k candidates (the fast path), and k uncached value-model forwards of the
prefix + candidate (the naive path).

    python benchmarks/decode_profile.py [--prefix 64] [--reps 20]

Writes ``benchmarks/results/decode_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mavis_align.decoding.steppers import CachedBase, CachedValueScorer, bind_objectives
from mavis_align.models import load_causal_lm
from mavis_align.provenance import run_record
from mavis_align.values import build_value_model


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_profile.json"))
    args = ap.parse_args()
    model, tok = load_causal_lm()
    vm = build_value_model(["helpful"], seed=0).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, args.prefix), generator=g)
    mask = torch.ones_like(ids)
    cands = torch.randint(100, 40000, (1, args.k), generator=g)
    nxt = torch.tensor([123])
    res = {}

    def base_cached():
        b = CachedBase(model)
        b.start(ids, mask)
        return b

    b = base_cached()

    def base_step():
        b.step(nxt)
        b.cache.crop(-1)
        b.mask = b.mask[:, :-1]
        b.next_pos = b.next_pos - 1

    res["base_cached_step_ms"] = median_ms(base_step, args.reps)
    res["base_uncached_forward_ms"] = median_ms(lambda: model(input_ids=ids), args.reps)
    sc = CachedValueScorer([vm], bind_objectives([vm]))
    sc.start(ids, mask)
    res["value_cached_k_candidates_ms"] = median_ms(lambda: sc.score(cands), args.reps)
    seqs = [torch.cat([ids, cands[:, j : j + 1]], dim=1) for j in range(args.k)]
    res["value_naive_k_forwards_ms"] = median_ms(lambda: [vm(s) for s in seqs], args.reps)
    res["naive_step_estimate_ms"] = round(res["base_uncached_forward_ms"] + res["value_naive_k_forwards_ms"], 2)
    res["fast_step_estimate_ms"] = round(res["base_cached_step_ms"] + res["value_cached_k_candidates_ms"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run_record(vars(args), 0), "results": res}, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
