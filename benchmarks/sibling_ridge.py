"""Does fitting the within-state differences help the value model order siblings?

The tilt compares the k candidates of one state, so what a value model must get right is the order
of continuations of the same prefix (sibling concordance), while ridge on the node values mostly
learns which prompts score high (R²). This benchmark adds the sibling differences to the ridge fit:

    minimise  Σ_i (z_i·w − y_i)²  +  s · Σ_{siblings i<j} ((z_i − z_j)·w − (y_i − y_j))²  +  α ||w||²

(z: standardised head inputs of the default model, frozen ``trunk:4`` with ``prompt+response`` heads;
s = ``--sibling-weights``; ``train.regression.fit_ridge`` with ``pairs``: α by 5-fold CV over trees on the level MSE), and scores
held-out R² and sibling concordance. Data and cached trunk features: the tree-budget benchmark's
(``python benchmarks/tree_budget.py`` first; value-backbones' two π_ref tree files, 328 train / 72 val
trees); budgets: 72 train trees (the demo's size, 3 subsample seeds) and all 328.

    python benchmarks/sibling_ridge.py [--out runs/tree_budget]  → benchmarks/results/sibling_ridge.{json,md}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tree_budget import FILES, OBJECTIVES, features  # noqa: E402

from mavis_align.collect.store import read_trees  # noqa: E402
from mavis_align.provenance import write_json, write_run_record  # noqa: E402
from mavis_align.train.quality import quality_report, sibling_pairs  # noqa: E402
from mavis_align.train.regression import fit_pool_centre, fit_ridge, head_inputs, split_examples  # noqa: E402
from mavis_align.values import build_value_model  # noqa: E402

WEIGHTS = [0.0, 1.0, 4.0, 16.0]
BUDGETS = [72, 328]
SEEDS = [0, 1, 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tree_budget", help="the tree-budget benchmark's folder (cached trunk features)")
    ap.add_argument("--sibling-weights", type=float, nargs="+", default=WEIGHTS)
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    for f in FILES:
        if not Path(f).exists():
            raise SystemExit(f"{f} is missing: run `python benchmarks/value_backbones.py` first")
    sources = [read_trees(f)[:2] for f in FILES]
    train_ex = split_examples(sources, "train", OBJECTIVES, False, 1.0, 0)
    val_ex = split_examples(sources, "val", OBJECTIVES, False, 1.0, 0)
    train_f, val_f = features(train_ex, out, "train"), features(val_ex, out, "val")
    write_run_record(Path("runs/sibling_ridge"), {"files": FILES, "weights": args.sibling_weights, "budgets": BUDGETS, "seeds": SEEDS}, 0)
    vm = build_value_model(OBJECTIVES, backbone="trunk:4", pool="prompt+response", seed=0)
    trees = sorted({e.tree for e in train_ex})
    by_tree: dict[int, list[int]] = {}
    for i, e in enumerate(train_ex):
        by_tree.setdefault(e.tree, []).append(i)
    val_target = np.stack([e.target() for e in val_ex])
    val_groups = [(e.tree, e.parent) for e in val_ex]
    rows = []
    for n in BUDGETS:
        seeds = SEEDS if n < len(trees) else [0]
        for s in args.sibling_weights:
            per_seed = []
            for seed in seeds:
                chosen = random.Random(seed).sample(trees, min(n, len(trees)))
                idx = sorted(i for t in chosen for i in by_tree[t])
                ex = [train_ex[i] for i in idx]
                f = train_f[idx]
                fit_pool_centre(vm, f)
                x = head_inputs(vm, f)
                y = torch.tensor(np.stack([e.target() for e in ex]), dtype=torch.float32)
                pairs = sibling_pairs([(e.tree, e.parent) for e in ex])
                w, b, _, _ = fit_ridge(x, y, [e.tree for e in ex], seed=0, pairs=pairs, pair_weight=s)
                pred = head_inputs(vm, val_f) @ w.T + b
                rep = quality_report(pred.numpy(), val_target, val_groups, OBJECTIVES)["per_objective"]
                per_seed.append(rep)
            row = {"train_trees": n, "sibling_weight": s, "seeds": len(seeds)}
            for m in OBJECTIVES:
                for k in ("r2", "concordance"):
                    row[f"{m}_{k}"] = statistics.mean(p[m][k] for p in per_seed)
                row[f"{m}_concordance_se"] = per_seed[0][m]["concordance_se"]
                row[f"{m}_pairs"] = per_seed[0][m]["pairs"]
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "sibling_ridge.json", {"files": FILES, "train_trees": len(trees), "val_trees": len({e.tree for e in val_ex}), "rows": rows})
    lines = [f"Default value model (trunk:4, prompt+response) by ridge with sibling differences weighted s; held out: "
             f"{len({e.tree for e in val_ex})} val trees. 72 train trees: mean over {len(SEEDS)} subsamples (se: of one fit).", "",
             "| train trees | s | R² helpful / harmless / humor | concordance helpful / harmless / humor (se) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['train_trees']} | {r['sibling_weight']:g} | " + " / ".join(f"{r[f'{m}_r2']:.3f}" for m in OBJECTIVES) + " | "
                     + " / ".join(f"{r[f'{m}_concordance']:.3f} ({r[f'{m}_concordance_se']:.3f})" for m in OBJECTIVES) + " |")
    (results / "sibling_ridge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
