"""Tree collection speed on the embedded default: GET_DATA trees vs plain batched sampling of the
same number of tokens, and the Ray backend (2 workers) vs the local backend, all in one run.

    python benchmarks/collect.py [--prompts 8] [--layers 3] [--k-root 4] [--k 2] [--tokens 64]

* ``trees_generate``: ``build_trees`` alone (generation only, one process, all threads), prompts in
  groups of ``--group-size`` as ``collect`` grows them.
* ``prefix_kv``: A/B of ``build_trees`` keeping each node's base-model keys/values for its children
  (the default) against prefilling every node's prompt and response again, ``--ab-pairs`` pairs
  run back to back in alternating order; the ratio is the median of the pairs' speed ratios, and
  the share of tree tokens that came out identical (float rounding of the two paths differs).
* ``plain_sampling``: ``MavisDecoder`` without values, batch ``--plain-batch``, every row forced to
  T tokens, repeated until it has produced as many tokens as the trees hold.
* ``collect_local`` / ``collect_ray``: the whole ``collect`` (model loading, generation, labelling
  with the default rewards, part files, merge), local backend vs Ray with 2 single-thread workers.

Writes ``benchmarks/results/collect.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mavis_align.collect import CollectSpec, GenPolicy, TreeConfig, build_trees, collect, read_trees
from mavis_align.data import load_prompts
from mavis_align.decoding.decoder import MavisDecoder
from mavis_align.generation import SamplingConfig
from mavis_align.models import format_prompts, load_causal_lm
from mavis_align.provenance import run_record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--k-root", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--plain-batch", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--ab-pairs", type=int, default=2)
    ap.add_argument("--skip-backends", action="store_true", help="only the tree-growing measurements (no plain sampling, no Ray)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "collect.json"))
    args = ap.parse_args()

    model, tok = load_causal_lm()
    prompts = [p.text for p in load_prompts("hh-mix", "train", tokenizer=tok, limit=args.prompts)]
    cfg = TreeConfig(num_layers=args.layers, k_root=args.k_root, k=args.k, max_new_tokens=args.tokens)
    items = [(i, p, tok(f, add_special_tokens=False)["input_ids"]) for i, (p, f) in enumerate(zip(prompts, format_prompts(tok, prompts)))]
    policy = GenPolicy(model, tok)
    build_trees(policy, items[:1], TreeConfig(num_layers=1, k_root=2, max_new_tokens=2), torch.Generator().manual_seed(0))  # warm-up

    def grow(pol: GenPolicy) -> tuple[list, float]:
        t0, out = time.perf_counter(), []
        for g in range(0, len(items), args.group_size):
            out += build_trees(pol, items[g : g + args.group_size], cfg, torch.Generator().manual_seed(g))
        return out, time.perf_counter() - t0

    trees, tree_s = grow(policy)
    n_tokens = sum(len(n.tokens) for t in trees for n in t.nodes)
    n_nodes = sum(len(t.nodes) - 1 for t in trees)
    records = {"trees_generate": {"tokens": n_tokens, "nodes": n_nodes, "seconds": round(tree_s, 2), "tokens_per_s": round(n_tokens / tree_s, 2)}}
    print(json.dumps(records["trees_generate"]), flush=True)
    full = GenPolicy(model, tok, reuse_prefix_kv=False)
    pairs, same = [], []
    for i in range(args.ab_pairs):
        timed = {}
        for name in (("full", "reuse") if i % 2 == 0 else ("reuse", "full")):
            t, sec = grow(policy if name == "reuse" else full)
            timed[name] = (sum(len(n.tokens) for x in t for n in x.nodes) / sec, t)
        pairs.append(timed["reuse"][0] / timed["full"][0])
        a = [tk for x in timed["reuse"][1] for n in x.nodes for tk in n.tokens]
        b = [tk for x in timed["full"][1] for n in x.nodes for tk in n.tokens]
        same.append(sum(x == y for x, y in zip(a, b)) / max(len(a), len(b)))
        print(f"pair {i}: reuse {timed['reuse'][0]:.1f} tok/s, full prefill {timed['full'][0]:.1f} tok/s, ratio {pairs[-1]:.3f}, "
              f"identical tokens {same[-1]:.3f}", flush=True)
    records["prefix_kv"] = {"pairs": [round(x, 3) for x in pairs], "median_ratio": round(statistics.median(pairs), 3),
                            "identical_token_share": [round(x, 3) for x in same]}
    if args.skip_backends:
        records.pop("trees_generate")
        return _write(args, records, partial=True)

    dec = MavisDecoder(model, tok)
    rows = [prompts[i % len(prompts)] for i in range(args.plain_batch)]
    done, t0 = 0, time.perf_counter()
    while done < n_tokens:
        dec.generate(rows, config=SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens), batch_size=args.plain_batch, seed=done)
        done += args.plain_batch * args.tokens
    plain_s = time.perf_counter() - t0
    records["plain_sampling"] = {"tokens": done, "seconds": round(plain_s, 2), "tokens_per_s": round(done / plain_s, 2), "batch": args.plain_batch}
    records["trees_vs_plain"] = round(records["trees_generate"]["tokens_per_s"] / records["plain_sampling"]["tokens_per_s"], 3)
    print(json.dumps(records["plain_sampling"]), "ratio", records["trees_vs_plain"], flush=True)
    del model, dec, policy

    work = Path(tempfile.mkdtemp(prefix="mavis-collect-bench-"))
    try:
        spec = CollectSpec(tree=cfg, group_size=args.group_size, seed=0)
        for backend in ("local", "ray"):
            t0 = time.perf_counter()
            out = collect(spec, work / f"{backend}.h5", prompts, backend=backend, workers=2, progress=False)
            wall = time.perf_counter() - t0
            data, _, _ = read_trees(out)
            tok_count = sum(len(n.tokens) for t in data.trees for n in t.nodes)
            records[f"collect_{backend}"] = {"trees": len(data), "tokens": tok_count, "seconds": round(wall, 2), "tokens_per_s": round(tok_count / wall, 2)}
            print(backend, json.dumps(records[f"collect_{backend}"]), flush=True)
        a, _, _ = read_trees(work / "local.h5")
        b, _, _ = read_trees(work / "ray.h5")
        records["ray_equals_local"] = all([n.tokens for n in x.nodes] == [n.tokens for n in y.nodes] for x, y in zip(a.trees, b.trees))
        records["ray_vs_local"] = round(records["collect_ray"]["tokens_per_s"] / records["collect_local"]["tokens_per_s"], 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(args, records)


def _write(args, records: dict, partial: bool = False) -> None:
    """Results JSON; ``partial`` (--skip-backends) updates only the records measured, keeping the others."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if partial and out.exists() else {}
    merged = {**old.get("records", {}), **records}
    earlier = old.get("runs") or ({"all": old["run"]} if "run" in old else {})
    runs = {**earlier, ("prefix_kv" if partial else "all"): run_record(vars(args), 0)}
    out.write_text(json.dumps({"runs": runs, "records": merged}, indent=2) + "\n")
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
