"""The committed reproduction study read again at matched KL (issue 30), without decoding anything.

Reads the study's evaluations under ``results/data`` (the 2026-11-27 rerun: 16 hh-mix *test* prompts x 2
samples, the same prompts and seeds for every method) and compares every method at common KL budgets on
its own envelope, with 95 % paired-bootstrap intervals over prompts (``mavis_align.evaluate.matched``):

* single objectives (claim 1's data): each MAVIS iteration's beta > 0 points, top-k sampling alone
  (MAVIS's beta = 0 point) and each RL policy, per objective, pi_ref at KL 0 in every envelope;
* the two sweeps (claims 3, 7, 8's data): MAVIS-family methods at beta 0.5 and 5 (both on one envelope)
  and every baseline, at each lambda, plus hypervolume within KL budgets.

These evaluations predate per-response KLs, so each point's KL is its mean for every prompt: the
intervals carry the rewards' sampling noise over prompts, not the KL's. The prompts are the *test*
split that the study's choices were made on, not the untouched ``final`` split: read these as a
re-analysis, not as final verdicts.

    python benchmarks/matched_kl_study.py [--data results/data] [--out results] [--boot 2000]

Writes ``<out>/matched_kl.md``, ``<out>/matched_kl.json`` and ``<out>/reward_kl_matched.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OBJECTIVES = ["helpful", "harmless", "humor"]


def plot(single: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(single), figsize=(5 * len(single), 4))
    for ax, (m, table) in zip(axes, single.items()):
        for name, info in table["methods"].items():
            xs = [r["kl"] for r in info["at"] if r["reward"] is not None]
            ys = [r["reward"] for r in info["at"] if r["reward"] is not None]
            ax.plot(xs, ys, "o-", label=name, alpha=0.8)
        ax.axvline(table["rl_kl"], color="grey", lw=0.8, ls=":")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL budget (nats)")
        ax.set_ylabel(f"{m} reward on the envelope")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="results/data")
    ap.add_argument("--out", default="results")
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args()

    from mavis_align.evaluate.matched_study import study_matched_kl
    from mavis_align.provenance import run_record, write_json

    data, out = Path(args.data), Path(args.out)
    raw = {k: v["verdict"] for k, v in json.loads((out / "verdicts.json").read_text())["claims"].items()} if (out / "verdicts.json").exists() else {}
    judged, lines = study_matched_kl(data, OBJECTIVES, raw, n_boot=args.boot)
    write_json(out / "matched_kl.json", {"run": run_record(vars(args), 0), **judged})
    plot(judged["single"], out / "reward_kl_matched.png")
    text = ["# The reproduction study at matched KL", "",
            f"`python benchmarks/matched_kl_study.py --data {args.data} --out {args.out}` (no decoding; {args.boot} bootstrap replicates). "
            "Data: the 2026-11-27 study rerun (16 hh-mix test prompts × 2 samples, the same for every method; these prompts were read for "
            "earlier choices: a re-analysis, not a final-split verdict). Each point's KL is its mean (the evaluations predate per-response KLs): "
            "the intervals carry the rewards' noise over prompts only. MAVIS-family methods at β 0.5 (`sweep/`) and 5 (`sweep-beta5/`) share one envelope.", ""]
    (out / "matched_kl.md").write_text("\n".join(text + lines) + "\n")
    print("\n".join(text + lines))


if __name__ == "__main__":
    main()
