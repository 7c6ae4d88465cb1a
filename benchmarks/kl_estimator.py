"""One policy-iteration round with the eq. 6 KL term estimated two ways, on the same trees (issue 12).

The round's targets are  value(s) − ζ · (log-ratio of the tokens after s). ``sampled`` takes the
sampled tokens' log-ratios log π_i(a_t|s_t)/π_ref(a_t|s_t) (eq. 6 as printed); ``expected`` takes
each step's KL(π_i(·|s_t) || π_ref(·|s_t)) instead, recorded at collection: the same expectation,
without the sampling noise that ``benchmarks/iteration_targets.py`` found as large as the rewards'
differences between siblings. Per objective, on one round's MAVIS trees (which must carry step
KLs), this benchmark

* describes the targets: over sibling pairs, the spread of Δvalue and of Δ(ζ · KL term) under each
  estimator, and how often each target orders a pair as the value alone does;
* fits V¹ both ways (ridge heads, initialised from V⁰ as the round is), and two further ways: step
  KLs with the values and the KL term fitted by separate ridge regressions (each its own penalty;
  V = V_values − ζ · V_KL), and the round without a KL term (ζ = 0); reports held-out R² and
  sibling concordance against the MC rewards alone and against each estimator's targets;
* steers with V⁰, V¹ (sampled) and V¹ (expected) on 24 hh-mix test prompts from #40 (12 ordinary,
  12 harmful; those of ``tilt_scale.py``) × 2 samples, λ = {m: 1}, with two tilts: the run's
  evaluation setting (the round's collection tilt), and the raw tilt at β = 1/ζ, under which eq. 6's
  soft values define the next policy (Theorem 1: no worse on reward − ζ · KL). Reward, z paired by
  prompt against π_ref and between the two V¹, KL (eq. 7), and J = reward − ζ · KL.

    python benchmarks/kl_estimator.py RUN [--out runs/kl_estimator]
        → benchmarks/results/kl_estimator.{json,md}

RUN holds ``recipe.json``, ``iter0/<m>/value/best`` and ``iter1/<m>/trees.h5`` (e.g.
``runs/reproduce-pr/mavis``). Objectives whose round-1 trees are missing are skipped; every fit and
every steering row is saved as it finishes, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from iteration_targets import target_parts  # noqa: E402
from tilt_scale import MAX_NEW, SAMPLES, SEED, TOP_K, dev_prompts  # noqa: E402

from mavis_align.collect import read_trees  # noqa: E402
from mavis_align.collect.dataset import KL_ESTIMATORS  # noqa: E402
from mavis_align.collect.tree import has_step_kl  # noqa: E402
from mavis_align.decoding.decoder import MavisDecoder  # noqa: E402
from mavis_align.demo import steering_z  # noqa: E402
from mavis_align.evaluate import DecoderPolicy, evaluate_policy  # noqa: E402
from mavis_align.generation import SamplingConfig  # noqa: E402
from mavis_align.models import load_causal_lm  # noqa: E402
from mavis_align.provenance import run_record, write_json, write_run_record  # noqa: E402
from mavis_align.rewards import get_rewards  # noqa: E402
from mavis_align.train import TrainConfig, train_value_model  # noqa: E402
from mavis_align.train.regression import held_out_quality  # noqa: E402
from mavis_align.values import ValueModel  # noqa: E402

QUALITY_KEYS = ("r2", "concordance", "concordance_se", "pairs")


# V¹ variants: (ζ factor, KL estimator, ridge_kl). "separate": the values and the KL term each get their
# own ridge penalty (V = V_values − ζ·V_KL); "rewards only": the round at ζ = 0 (no KL term at all).
ARMS = {"V1 sampled": (1.0, "sampled", "joint"), "V1 expected": (1.0, "expected", "joint"),
        "V1 expected, separate": (1.0, "expected", "separate"), "V1 rewards only": (0.0, "sampled", "joint")}


def slug(name: str) -> str:
    return name.replace(",", "").replace(" ", "-")


def fit(run: Path, m: str, trees: Path, zeta: float, arm: str, dest: Path) -> Path:
    """V¹ of objective m refitted on the round's trees (ridge heads from V⁰, as the round trains)."""
    factor, estimator, ridge_kl = ARMS[arm]
    if not (dest / "result.json").exists():
        shutil.rmtree(dest, ignore_errors=True)
        vm = ValueModel.load(run / "iter0" / m / "value" / "best")
        train_value_model(vm, [trees], dest, TrainConfig(solver="ridge", zeta=zeta * factor, kl_estimator=estimator, ridge_kl=ridge_kl,
                                                         keep_leaf_fraction=1.0, seed=0), progress=False)
    return dest / "best"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--out", default="runs/kl_estimator")
    ap.add_argument("--per-category", type=int, default=12)
    ap.add_argument("--objectives", nargs="+", default=None, help="only these (default: every objective with round-1 trees)")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    recipe = json.loads((run / "recipe.json").read_text())
    zeta = float(recipe["iterations"][0]["zeta"])
    ev = recipe.get("eval", {})
    tilts = {"run": SamplingConfig(max_new_tokens=MAX_NEW, top_k=TOP_K, beta=float(ev.get("beta", 2.0)), normalize=bool(ev.get("normalize", True))),
             "soft": SamplingConfig(max_new_tokens=MAX_NEW, top_k=TOP_K, beta=1.0 / zeta, normalize=False)}
    objectives = [m for m in recipe["objectives"] if (run / "iter1" / m / "trees.h5").exists() and (not args.objectives or m in args.objectives)]
    config = {"run": str(run), "zeta": zeta, "tilts": {k: {"beta": c.beta, "normalize": c.normalize} for k, c in tilts.items()}, "objectives": objectives,
              "per_category": args.per_category, "samples": SAMPLES, "top_k": TOP_K, "max_new_tokens": MAX_NEW}
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, config, SEED)
    model, tok = load_causal_lm(recipe["model"])
    prompts = dev_prompts(tok, args.per_category)
    rewards = get_rewards(list(recipe["objectives"]))

    def steer(name: str, value_model: Path | None, m: str | None, cfg: SamplingConfig | None) -> dict:
        path = out / f"steer-{name}.json"
        if not path.exists():
            dec = MavisDecoder(model, tok, [ValueModel.load(value_model)]) if value_model else MavisDecoder(model, tok)
            res = evaluate_policy(DecoderPolicy(name, dec, cfg or SamplingConfig(max_new_tokens=MAX_NEW), weights={m: 1.0} if m else None,
                                                chat=True), prompts, rewards, model, tok, samples=SAMPLES, seed=SEED, chat=True, keep_examples=0)
            write_json(path, {"rewards": res["rewards"], "kl": res["kl"]})
        return json.loads(path.read_text())

    ref = steer("pi_ref", None, None, None)
    entry: dict = {"config": config, "objectives": {}}
    for m in objectives:
        trees = run / "iter1" / m / "trees.h5"
        data, _, _ = read_trees(trees)
        if not all(has_step_kl(t) for t in data.trees):
            print(f"{m}: {trees} has no per-step KLs (collected before they were recorded); skipped", flush=True)
            continue
        rec: dict = {"targets": {e: target_parts(trees, m, zeta, kl_estimator=e) for e in KL_ESTIMATORS}, "quality": {}, "steering": {}}
        models = {"V0": run / "iter0" / m / "value" / "best"}
        for arm in ARMS:
            models[arm] = fit(run, m, trees, zeta, arm, out / f"{m}-{slug(arm)}")
        for name, path in models.items():
            vm = ValueModel.load(path)
            q = {"rewards": held_out_quality(vm, [trees])["per_objective"][m]}
            for e in KL_ESTIMATORS:
                q[f"targets {e}"] = held_out_quality(vm, [trees], zeta=zeta, kl_estimator=e)["per_objective"][m]
            rec["quality"][name] = q
            print(m, name, {k: {x: q[k][x] for x in QUALITY_KEYS} for k in q}, flush=True)
            for tilt, cfg in tilts.items():
                r = steer(f"{m}-{slug(name)}" + ("" if tilt == "run" else f"-{tilt}"), path, m, cfg)
                row = {"reward": r["rewards"][m]["mean"], "se": r["rewards"][m]["se"], "z": steering_z(r["rewards"][m], ref["rewards"][m], SAMPLES),
                       "kl": r["kl"]["mean"], "kl_se": r["kl"].get("se"), "values": r["rewards"][m].get("values")}
                row["objective"] = row["reward"] - zeta * row["kl"]
                rec["steering"].setdefault(tilt, {})[name] = row
                print(m, name, tilt, {k: v for k, v in row.items() if k != "values"}, flush=True)
        rec["z_expected_vs_sampled"] = {}
        for tilt, rows in rec["steering"].items():
            s, e = rows["V1 sampled"], rows["V1 expected"]
            rec["z_expected_vs_sampled"][tilt] = steering_z({"values": e["values"], "mean": e["reward"], "se": e["se"]},
                                                            {"values": s["values"], "mean": s["reward"], "se": s["se"]}, SAMPLES)
        rec["ref"] = ref["rewards"][m]["mean"]
        entry["objectives"][m] = rec
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "kl_estimator.json", {**entry, "record": run_record(config, SEED)})
    (results / "kl_estimator.md").write_text(report(entry, len(prompts)))
    print(report(entry, len(prompts)))


def report(entry: dict, n_prompts: int) -> str:
    c = entry["config"]
    lines = [f"One round of policy iteration, KL term of eq. 6 sampled vs expected (step KLs); run `{c['run']}`, ζ = {c['zeta']:g}.", "",
             "Targets over sibling pairs of the round's MAVIS trees: sd of Δvalue and of Δ(ζ · KL term), and the share of pairs "
             "(with different values) that the target orders as the value alone does.", "",
             "| objective | estimator | pairs | sd Δvalue | sd Δ(ζ·KL) | target orders as value |", "|---|---|---|---|---|---|"]
    for m, rec in entry["objectives"].items():
        for e, t in rec["targets"].items():
            lines.append(f"| {m} | {e} | {t['pairs']} | {t['value_diff_sd']:.3f} | {t['kl_term_diff_sd']:.3f} | {t['target_orders_as_value']:.2f} |")
    lines += ["", "Held-out quality on the round's val trees: R² / sibling concordance ± se (pairs), against the MC rewards alone and "
              "against the model's own eq. 6 targets.", "",
              "| objective | model | vs rewards | vs sampled targets | vs expected targets |", "|---|---|---|---|---|"]

    def q(x: dict) -> str:
        r2 = "-" if x["r2"] is None else f"{x['r2']:.3f}"
        conc = "-" if x["concordance"] is None else f"{x['concordance']:.3f} ± {x['concordance_se'] or 0:.3f} ({x['pairs']})"
        return f"{r2} / {conc}"

    for m, rec in entry["objectives"].items():
        for name, qs in rec["quality"].items():
            lines.append(f"| {m} | {name} | {q(qs['rewards'])} | {q(qs['targets sampled'])} | {q(qs['targets expected'])} |")
    lines += ["", f"Steering, λ = {{m: 1}}, {n_prompts} hh-mix test prompts from #40 × {c['samples']}, top-k {c['top_k']}, "
              f"≤ {c['max_new_tokens']} tokens: reward (z paired by prompt vs π_ref), KL (eq. 7, nats) and J = reward − ζ·KL; "
              "last column: z of V¹ expected vs V¹ sampled, paired.", "",
              "| objective | tilt | π_ref | V⁰ | " + " | ".join(ARMS) + " | z (exp. vs samp.) |", "|---|---|---|---|" + "---|" * len(ARMS) + "---|"]
    for m, rec in entry["objectives"].items():
        for tilt, rows in rec["steering"].items():
            t = c["tilts"][tilt]
            name = f"{'NORMALIZE' if t['normalize'] else 'raw'} β = {t['beta']:g}"
            cells = [f"{s['reward']:.3f} ({s['z']:+.1f}), KL {s['kl']:.1f}, J {s['objective']:.3f}" if s else "-"
                     for s in (rows.get(k) for k in ("V0", *ARMS))]
            lines.append(f"| {m} | {name} | {rec['ref']:.3f} | " + " | ".join(cells) + f" | {rec['z_expected_vs_sampled'][tilt]:+.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
