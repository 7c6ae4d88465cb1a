"""How value-model quality grows with the tree budget, and how to spend a fixed one.

Uses the value-backbones benchmark's two π_ref tree files (hh-mix train prompts 0-400, L=3,
K_root=4, K=2, T=40; run ``python benchmarks/value_backbones.py`` first) and the default value
model (frozen ``trunk:4``, ``prompt+response`` heads fitted by ridge). Held out: the val trees of
both files (72 prompts), as in that benchmark's ``400p`` rows. The train trees are subsampled:

* ``full``: n whole trees (n prompts);
* ``half``: 2n trees of which only the first two root children's subtrees are kept — the trees a
  collection with K_root=2 would have given, at about the same number of generated tokens as n
  whole trees but twice the prompts.

Every (layout, n) is fitted for several subsample seeds; R² and sibling concordance on the held-out
trees are averaged over them (the spread over seeds is reported as sd). The trunk features are
computed once for every node and cached (safetensors) under ``--out``.

    python benchmarks/tree_budget.py [--out runs/tree_budget]   → benchmarks/results/tree_budget.{json,md}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mavis_align.collect.store import read_trees
from mavis_align.models import load_tokenizer
from mavis_align.provenance import write_json, write_run_record
from mavis_align.train.quality import quality_report
from mavis_align.train.regression import split_examples, compute_trunk_features, fit_pool_centre, fit_ridge, head_inputs
from mavis_align.values import build_value_model

OBJECTIVES = ["helpful", "harmless", "humor"]
FILES = ["runs/value_backbones/trees.h5", "runs/value_backbones/trees-160-400.h5"]
BUDGETS = [36, 72, 108, 164]  # whole trees' worth of tokens (164 = half of the 328 train trees: the largest n with 2n halves)
SEEDS = [0, 1, 2]


def root_child(examples) -> list[int]:
    """For every example, the index (0, 1, ...) of its depth-1 ancestor among its tree's root children."""
    parent = {(e.tree, e.node): e.parent for e in examples}
    firsts: dict[int, list[int]] = {}
    for e in examples:
        if e.depth == 1:
            firsts.setdefault(e.tree, []).append(e.node)
    out = []
    for e in examples:
        node = e.node
        while parent.get((e.tree, node), 0) != 0:
            node = parent[(e.tree, node)]
        out.append(sorted(firsts[e.tree]).index(node))
    return out


def features(examples, out: Path, name: str) -> torch.Tensor:
    path = out / f"features-{name}.safetensors"
    if path.exists():
        return load_file(path)["features"]
    vm = build_value_model(OBJECTIVES, backbone="trunk:4", pool="prompt+response", seed=0)
    tok = load_tokenizer("smollm2-135m-instruct")
    f = compute_trunk_features(vm, examples, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, progress=True)
    save_file({"features": f.contiguous()}, str(path))
    return f


def fit_and_score(train_idx, train_ex, train_f, val_ex, val_f) -> dict:
    vm = build_value_model(OBJECTIVES, backbone="trunk:4", pool="prompt+response", seed=0)
    ex = [train_ex[i] for i in train_idx]
    f = train_f[train_idx]
    fit_pool_centre(vm, f)
    y = torch.tensor(np.stack([e.target() for e in ex]), dtype=torch.float32)
    w, b, _, _ = fit_ridge(head_inputs(vm, f), y, [e.tree for e in ex], seed=0)
    pred = head_inputs(vm, val_f) @ w.T + b
    target = np.stack([e.target() for e in val_ex])
    rep = quality_report(pred.numpy(), target, [(e.tree, e.parent) for e in val_ex], OBJECTIVES)
    return {m: {"r2": q["r2"], "concordance": q["concordance"], "pairs": q["pairs"]} for m, q in rep["per_objective"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tree_budget")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, {"files": FILES, "budgets": BUDGETS, "seeds": SEEDS}, 0)
    sources = []
    for f in FILES:
        if not Path(f).exists():
            raise SystemExit(f"{f} is missing: run `python benchmarks/value_backbones.py` first (it collects both tree files)")
        data, names, _ = read_trees(f)
        sources.append((data, names))
    train_ex = split_examples(sources, "train", OBJECTIVES, False, 1.0, 0)
    val_ex = split_examples(sources, "val", OBJECTIVES, False, 1.0, 0)
    t0 = time.perf_counter()
    train_f, val_f = features(train_ex, out, "train"), features(val_ex, out, "val")
    print(f"features: {len(train_ex)} train / {len(val_ex)} val nodes in {time.perf_counter() - t0:.0f} s", flush=True)
    child = root_child(train_ex)
    trees = sorted({e.tree for e in train_ex})
    by_tree: dict[int, list[int]] = {}
    for i, e in enumerate(train_ex):
        by_tree.setdefault(e.tree, []).append(i)
    rows = []
    for n in BUDGETS:
        for layout in ("full", "half"):
            count = n if layout == "full" else 2 * n
            if count > len(trees):
                continue
            per_seed = []
            for seed in SEEDS:
                chosen = random.Random(seed).sample(trees, count)
                idx = [i for t in chosen for i in by_tree[t] if layout == "full" or child[i] < 2]
                per_seed.append(fit_and_score(idx, train_ex, train_f, val_ex, val_f) | {"nodes": len(idx)})
            row = {"budget": n, "layout": layout, "prompts": count, "nodes": statistics.mean(p["nodes"] for p in per_seed)}
            for m in OBJECTIVES:
                for k in ("r2", "concordance"):
                    vals = [p[m][k] for p in per_seed]
                    row[f"{m}_{k}"] = statistics.mean(vals)
                    row[f"{m}_{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
                row[f"{m}_pairs"] = per_seed[0][m]["pairs"]
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "tree_budget.json", {"files": FILES, "seeds": SEEDS, "train_trees": len(trees), "val_trees": len({e.tree for e in val_ex}),
                                             "rows": rows})
    lines = [f"Default value model (trunk:4, prompt+response, ridge) trained on subsets of {len(trees)} train trees; held out: "
             f"{len({e.tree for e in val_ex})} val trees (both value-backbones files). Mean (sd) over {len(SEEDS)} subsample seeds. "
             "`half`: twice the prompts, only the first two root children's subtrees (≈ the same generated tokens as `full`).", "",
             "| tokens ≈ n whole trees | layout | prompts | train nodes | R² helpful / harmless / humor | concordance helpful / harmless / humor |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        r2 = " / ".join(f"{r[f'{m}_r2']:.2f} ({r[f'{m}_r2_sd']:.2f})" for m in OBJECTIVES)
        cc = " / ".join(f"{r[f'{m}_concordance']:.3f} ({r[f'{m}_concordance_sd']:.3f})" for m in OBJECTIVES)
        lines.append(f"| {r['budget']} | {r['layout']} | {r['prompts']} | {r['nodes']:.0f} | {r2} | {cc} |")
    (results / "tree_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
