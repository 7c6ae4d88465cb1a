"""Why one round of policy iteration loses the within-state ordering (issue 12).

Reads a finished run of ``mavis-align iterate`` / the study's ``mavis`` stage (iteration 0 on π_ref
trees, iteration 1 on MAVIS(V⁰, β) trees with KL penalty ζ) and measures, per objective:

* the held-out quality (R², sibling concordance) of V⁰ and V¹ on the val trees of both tree files,
  against the raw Monte-Carlo values (ζ = 0) and against the round's eq. 6 targets
  (value − ζ · log-ratio of the tokens after s);
* V¹ refitted on the round's trees by ridge with the round's ζ and with ζ = 0 (pure MC values),
  to separate the two suspects: noise that the ζ · log-ratio term adds to the targets, or MAVIS
  trees whose siblings V⁰ already sorted (what is left between siblings is what V⁰ cannot see);
* what the round's targets are made of: over sibling pairs of the MAVIS trees, the spread of the
  difference in MC value and of the difference in ζ · future log-ratio, their correlation, and how
  often the target orders a pair as the value alone does; and the whole responses' log-ratio.

    python benchmarks/iteration_targets.py RUN [--zeta 0.03] [--label NAME]
        → benchmarks/results/iteration_targets.{json,md} (one entry per label, appended)

RUN is the folder holding ``iter0/trees.h5``, ``iter0/<m>/value/best``, ``iter1/<m>/trees.h5`` and
``iter1/<m>/value/best`` (e.g. ``runs/reproduce/mavis``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mavis_align.collect.dataset import node_examples
from mavis_align.provenance import run_record, write_json
from mavis_align.train import TrainConfig, train_value_model
from mavis_align.train.regression import held_out_quality
from mavis_align.values import ValueModel


def target_parts(tree_file: Path, objective: str, zeta: float, kl_estimator: str = "sampled") -> dict:
    """Sibling-pair statistics of the eq. 6 target's two parts on one tree file (all trees)."""
    ex, names = node_examples(tree_file, None, keep_leaf_fraction=1.0, kl_estimator=kl_estimator)
    j = names.index(objective)
    groups: dict[tuple[int, int], list] = {}
    for e in ex:
        groups.setdefault((e.tree, e.parent), []).append(e)
    dv, dk = [], []
    for g in groups.values():
        for a in range(len(g)):
            for b in range(a + 1, len(g)):
                dv.append(g[a].value[j] - g[b].value[j])
                dk.append(zeta * (g[a].future_lpr - g[b].future_lpr))
    dv, dk = np.array(dv), np.array(dk)
    moved = np.abs(dv) > 1e-9
    leaves = [e.lpr for e in ex if e.is_leaf]
    return {
        "pairs": int(len(dv)),
        "value_diff_sd": float(dv.std()),
        "kl_term_diff_sd": float(dk.std()),
        "corr": float(np.corrcoef(dv, dk)[0, 1]) if dk.std() > 0 and dv.std() > 0 else None,
        "target_orders_as_value": float((np.sign(dv - dk) == np.sign(dv))[moved].mean()) if moved.any() else None,
        "response_log_ratio_mean": float(np.mean(leaves)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--zeta", type=float, default=0.03, help="the round's KL penalty multiplier (the recipe's iterations[0].zeta)")
    ap.add_argument("--label", default=None)
    ap.add_argument("--work", default="runs/iteration_targets", help="folder for the refitted value models")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    run = Path(args.run)
    label = args.label or str(run)
    objectives = [p.name for p in sorted((run / "iter1").iterdir()) if (p / "trees.h5").exists() and (p / "value" / "best").exists()]
    entry: dict = {"run": str(run), "zeta": args.zeta, "objectives": {}}
    for m in objectives:
        files = {"pi_ref trees (iter0)": run / "iter0" / "trees.h5", "MAVIS trees (iter1)": run / "iter1" / m / "trees.h5"}
        rec: dict = {"quality": {}, "targets": target_parts(files["MAVIS trees (iter1)"], m, args.zeta)}
        for it in ("iter0", "iter1"):
            vm = ValueModel.load(run / it / m / "value" / "best")
            for fname, f in files.items():
                for z in (0.0, args.zeta):
                    q = held_out_quality(vm, [f], zeta=z)["per_objective"][m]
                    rec["quality"][f"V{it[-1]} on {fname}, zeta {z:g}"] = q
                    print(m, f"V{it[-1]}", fname, f"zeta {z:g}", {k: q[k] for k in ("r2", "concordance", "concordance_se", "pairs")}, flush=True)
        for z in (args.zeta, 0.0):
            dest = Path(args.work) / f"{m}-refit-zeta{z:g}"
            if not (dest / "result.json").exists():
                import shutil

                shutil.rmtree(dest, ignore_errors=True)
                vm = ValueModel.load(run / "iter0" / m / "value" / "best")  # the round's init (keeps the pool centre)
                train_value_model(vm, [files["MAVIS trees (iter1)"]], dest, TrainConfig(solver="ridge", zeta=z, keep_leaf_fraction=1.0, seed=0),
                                  progress=False)
            vm = ValueModel.load(dest / "best")
            for zq in (0.0, args.zeta):
                q = held_out_quality(vm, [files["MAVIS trees (iter1)"]], zeta=zq)["per_objective"][m]
                rec["quality"][f"V1 refit at zeta {z:g} on MAVIS trees (iter1), zeta {zq:g}"] = q
                print(m, f"V1 refit zeta {z:g}", f"zeta {zq:g}", {k: q[k] for k in ("r2", "concordance", "concordance_se", "pairs")}, flush=True)
        print(m, rec["targets"], flush=True)
        entry["objectives"][m] = rec
    results = Path(args.results)
    path = results / "iteration_targets.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old[label] = {**entry, "record": run_record({"run": str(run), "zeta": args.zeta}, 0)}
    write_json(path, old)
    lines = []
    for lab, e in old.items():
        lines += [f"## {lab} (ζ = {e['zeta']:g})", "", "| objective | model | held-out trees | target | R² | concordance (pairs) |", "|---|---|---|---|---|---|"]
        for m, rec in e["objectives"].items():
            for key, q in rec["quality"].items():
                model, rest = key.split(" on ", 1)
                trees, z = rest.rsplit(", ", 1)
                conc = "-" if q["concordance"] is None else f"{q['concordance']:.3f} ± {q['concordance_se'] or 0:.3f} ({q['pairs']})"
                r2 = "-" if q["r2"] is None else f"{q['r2']:.3f}"
                lines.append(f"| {m} | {model} | {trees} | {'MC value' if z == 'zeta 0' else 'eq. 6 (' + z.replace('zeta', 'ζ') + ')'} | {r2} | {conc} |")
        lines += ["", "Sibling pairs of the MAVIS trees: sd of the difference in MC value and in ζ · future log-ratio, their correlation, "
                  "the share of pairs (with different values) the eq. 6 target orders as the value does, mean log-ratio of a whole response (nats).", "",
                  "| objective | pairs | sd Δvalue | sd Δ(ζ·LPR) | corr | target orders as value | response log-ratio |", "|---|---|---|---|---|---|---|"]
        for m, rec in e["objectives"].items():
            t = rec["targets"]
            lines.append(f"| {m} | {t['pairs']} | {t['value_diff_sd']:.3f} | {t['kl_term_diff_sd']:.3f} | {t['corr']:.2f} | "
                         f"{t['target_orders_as_value']:.2f} | {t['response_log_ratio_mean']:.1f} |")
        lines.append("")
    (results / "iteration_targets.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
