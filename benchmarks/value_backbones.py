"""Value-model backbones compared on the same trees, the same held-out prompts and the same machine.

For each configuration (backbone, what the heads read, training settings) one 3-head value model
(helpful, harmless, humor) is trained on shared tree files (L=3, K_root=4, K=2, T=40; val split 0.2
by prompt): ``trees.h5`` holds hh-mix train prompts 0-160, ``trees-160-400.h5`` prompts 160-400
(configurations with ``"trees": "400"`` train on both). Each is reported with:

* held-out R² and sibling concordance per objective (``mavis_align.train.quality``) on the val trees of
  its files, training seconds; configurations trained on the first file alone are also scored on
  the second file's val trees ("fresh": prompts no configuration was chosen on);
* decode speed as a ratio to plain HF ``generate`` sampling measured in the same process, right
  before: MAVIS with M=3 separate value models of this configuration and with one 3-head model,
  batch 1 and 8, every sequence forced to the full length (equal work);
* steering (configurations in ``--steer``): each objective alone (λ = {m: 1}) at β ∈ {1, 2, 5},
  its reward and KL (eq. 7) on held-out test prompts, next to π_ref, with standard errors.

Every stage writes its result under ``--out`` and is skipped when rerun, so an interrupted run
resumes. ``--report`` writes ``benchmarks/results/value_backbones.{json,md}``.

    python benchmarks/value_backbones.py [--out runs/value_backbones] [--only a,b] [--steer a,b]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from mavis_align.collect import CollectSpec, TreeConfig, collect
from mavis_align.data import load_prompts
from mavis_align.decoding.decoder import MavisDecoder
from mavis_align.evaluate import DecoderPolicy, evaluate_policy
from mavis_align.generation import SamplingConfig, encode_batch
from mavis_align.models import format_prompts, load_causal_lm, load_tokenizer
from mavis_align.provenance import run_record, write_json
from mavis_align.rewards import get_rewards
from mavis_align.train import TrainConfig, train_value_model
from mavis_align.train.regression import held_out_quality
from mavis_align.values import ValueModel, build_value_model

OBJECTIVES = ["helpful", "harmless", "humor"]
TREES = {"prompts": 160, "val_fraction": 0.2, "tree": {"num_layers": 3, "k_root": 4, "k": 2, "max_new_tokens": 40, "max_rows": 64}}
MORE_TREES = {"prompts": [160, 400], "seed": 1}  # the second file: same settings, the next 240 prompts, another seed
SMALL_TRAIN = {"lr": 1e-3, "epochs": 3, "batch_size": 16, "warmup_steps": 10, "eval_every": 0, "keep_leaf_fraction": 0.5}
HEAD_TRAIN = {"lr": 1e-3, "epochs": 40, "batch_size": 64, "warmup_steps": 10, "eval_every": 0, "keep_leaf_fraction": 1.0}
CONFIGS = {
    "tiny": {"backbone": "tiny", "pool": "last", "train": SMALL_TRAIN},
    "tiny-256": {"backbone": "tiny-256", "pool": "last", "train": SMALL_TRAIN},
    "trunk:8 last": {"backbone": "trunk:8", "pool": "last", "train": HEAD_TRAIN},
    "trunk:2 mean": {"backbone": "trunk:2", "pool": "mean", "train": HEAD_TRAIN},
    "trunk:4 mean": {"backbone": "trunk:4", "pool": "mean", "train": HEAD_TRAIN},
    "trunk:8 mean": {"backbone": "trunk:8", "pool": "mean", "train": HEAD_TRAIN},
    "trunk:8 mean+last": {"backbone": "trunk:8", "pool": "mean+last", "train": HEAD_TRAIN},
    "trunk:16 mean": {"backbone": "trunk:16", "pool": "mean", "train": HEAD_TRAIN},
    "trunk:4 mean ridge": {"backbone": "trunk:4", "pool": "mean", "train": {"solver": "ridge", "keep_leaf_fraction": 1.0}},
    "truncate:2": {"backbone": "truncate:2", "pool": "last", "train": SMALL_TRAIN},
    "trunk:4 prompt+response ridge": {"backbone": "trunk:4", "pool": "prompt+response", "train": {"solver": "ridge", "keep_leaf_fraction": 1.0}},
    "trunk:4 mean ridge 400p": {"backbone": "trunk:4", "pool": "mean", "train": {"solver": "ridge", "keep_leaf_fraction": 1.0}, "trees": "400"},
    "trunk:4 prompt+response ridge 400p": {"backbone": "trunk:4", "pool": "prompt+response", "train": {"solver": "ridge", "keep_leaf_fraction": 1.0},
                                           "trees": "400"},
}
DEFAULT_RUN = ["tiny", "tiny-256", "trunk:8 last", "trunk:2 mean", "trunk:4 mean", "trunk:4 mean ridge", "trunk:8 mean", "trunk:8 mean+last",
               "trunk:16 mean", "trunk:4 prompt+response ridge", "trunk:4 mean ridge 400p", "trunk:4 prompt+response ridge 400p"]
STEER = ["tiny", "trunk:4 mean", "trunk:4 mean ridge", "trunk:8 mean", "trunk:4 prompt+response ridge 400p"]
BETAS = [1.0, 2.0, 5.0]
TOP_K = 15
EVAL = {"prompts": 16, "samples": 2, "max_new_tokens": 40, "seed": 0}


def slug(name: str) -> str:
    return name.replace(":", "").replace(" ", "-").replace("+", "_")


def trees_file(out: Path) -> Path:
    path = out / "trees.h5"
    if not path.exists():
        tok = load_tokenizer("smollm2-135m-instruct")
        prompts = [p.text for p in load_prompts("hh-mix", "train", seed=0, tokenizer=tok, limit=TREES["prompts"])]
        spec = CollectSpec(rewards=OBJECTIVES, dataset="hh-mix", split="train", limit=TREES["prompts"], tree=TreeConfig(**TREES["tree"]),
                           seed=0, val_fraction=TREES["val_fraction"])
        collect(spec, path, prompts, resume=True)
    return path


def more_trees_file(out: Path) -> Path:
    """Trees of hh-mix train prompts 160-400 (resumable, like the first file)."""
    start, stop = MORE_TREES["prompts"]
    path = out / f"trees-{start}-{stop}.h5"
    if not path.exists():
        tok = load_tokenizer("smollm2-135m-instruct")
        prompts = [p.text for p in load_prompts("hh-mix", "train", seed=0, tokenizer=tok, limit=stop)][start:]
        spec = CollectSpec(rewards=OBJECTIVES, dataset="hh-mix", split="train", limit=stop, tree=TreeConfig(**TREES["tree"]),
                           seed=MORE_TREES["seed"], val_fraction=TREES["val_fraction"])
        collect(spec, path, prompts, resume=True)
    return path


def tree_files(out: Path, name: str) -> list[Path]:
    return [trees_file(out)] + ([more_trees_file(out)] if CONFIGS[name].get("trees") == "400" else [])


def train(out: Path, name: str) -> dict:
    cfg = CONFIGS[name]
    folder = out / "models" / slug(name)
    if not (folder / "result.json").exists():
        vm = build_value_model(OBJECTIVES, backbone=cfg["backbone"], pool=cfg["pool"], seed=0)
        train_value_model(vm, tree_files(out, name), folder, TrainConfig(**cfg["train"], seed=0), resume=(folder / "checkpoint").exists())
    return json.loads((folder / "result.json").read_text())


def fresh_quality(out: Path, name: str) -> dict | None:
    """Held-out quality of a configuration trained on the first file, on the second file's val trees."""
    if CONFIGS[name].get("trees") == "400":
        return None
    path = out / "fresh" / f"{slug(name)}.json"
    if not path.exists():
        vm = ValueModel.load(out / "models" / slug(name) / "best")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, held_out_quality(vm, [more_trees_file(out)]))
    return json.loads(path.read_text())


def speed(out: Path, name: str, model, tok, n_tokens: int = 32, reps: int = 2) -> list[dict]:
    path = out / "speed" / f"{slug(name)}.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = CONFIGS[name]
    same = next((n for n in CONFIGS if n != name and (CONFIGS[n]["backbone"], CONFIGS[n]["pool"]) == (cfg["backbone"], cfg["pool"])
                 and (out / "speed" / f"{slug(n)}.json").exists()), None)
    if same is not None:  # the same architecture (only training differs): decoding costs the same
        rows = [{**r, "measured_as": same} for r in json.loads((out / "speed" / f"{slug(same)}.json").read_text())]
        write_json(path, rows)
        return rows
    path.parent.mkdir(parents=True, exist_ok=True)
    singles = [build_value_model([o], backbone=cfg["backbone"], pool=cfg["pool"], seed=i).eval() for i, o in enumerate(OBJECTIVES)]
    multi = build_value_model(OBJECTIVES, backbone=cfg["backbone"], pool=cfg["pool"], seed=7).eval()
    prompts_all = [p.text for p in load_prompts("hh-mix", "test", tokenizer=tok, limit=8)]
    rows = []
    for batch in (1, 8):
        prompts = prompts_all[:batch]
        ids, mask = encode_batch(tok, format_prompts(tok, prompts), "cpu")
        sc = SamplingConfig(max_new_tokens=n_tokens, min_new_tokens=n_tokens, top_k=TOP_K, beta=2.0)

        def hf(n):
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0, top_p=1.0,
                           temperature=1.0, pad_token_id=tok.pad_token_id)

        def sep(n):
            MavisDecoder(model, tok, singles).generate(prompts, weights={o: 1.0 for o in OBJECTIVES},
                                                       config=replace(sc, max_new_tokens=n, min_new_tokens=n), batch_size=batch)

        def head3(n):
            MavisDecoder(model, tok, [multi]).generate(prompts, weights={o: 1.0 for o in OBJECTIVES},
                                                       config=replace(sc, max_new_tokens=n, min_new_tokens=n), batch_size=batch)

        times = {}
        for label, fn in (("hf_generate", hf), ("mavis_M3_separate", sep), ("mavis_3head", head3)):
            fn(2)
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(n_tokens)
                best = min(best, time.perf_counter() - t0)
            times[label] = best
        for label, t in times.items():
            rows.append({"batch": batch, "method": label, "tokens_per_s": round(batch * n_tokens / t, 2),
                         "ratio_vs_hf_generate": round(times["hf_generate"] / t, 3)})
    write_json(path, rows)
    return rows


def steer(out: Path, name: str, model, tok, rewards, prompts: list[str]) -> dict:
    folder = out / "steer" / slug(name)
    folder.mkdir(parents=True, exist_ok=True)
    vm = ValueModel.load(out / "models" / slug(name) / "best")
    dec = MavisDecoder(model, tok, [vm])
    res = {}
    for beta in BETAS:
        for m in OBJECTIVES:
            path = folder / f"beta{beta:g}-{m}.json"
            if not path.exists():
                cfg = SamplingConfig(max_new_tokens=EVAL["max_new_tokens"], top_k=TOP_K, beta=beta)
                r = evaluate_policy(DecoderPolicy(name, dec, cfg, weights={m: 1.0}), prompts, rewards, model, tok, samples=EVAL["samples"], seed=EVAL["seed"])
                write_json(path, {"reward": r["rewards"][m], "kl": r["kl"], "rewards": r["rewards"]})
            res[f"beta{beta:g}-{m}"] = json.loads(path.read_text())
    return res


def reference(out: Path, model, tok, rewards, prompts: list[str]) -> dict:
    path = out / "steer" / "pi_ref.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        r = evaluate_policy(DecoderPolicy("pi_ref", MavisDecoder(model, tok), SamplingConfig(max_new_tokens=EVAL["max_new_tokens"])), prompts, rewards,
                            model, tok, samples=EVAL["samples"], seed=EVAL["seed"])
        write_json(path, {"rewards": r["rewards"], "kl": r["kl"]})
    return json.loads(path.read_text())


def report(out: Path, names: list[str], steered: list[str], results_dir: Path) -> None:
    rows, ref = [], None
    if (out / "steer" / "pi_ref.json").exists():
        ref = json.loads((out / "steer" / "pi_ref.json").read_text())
    for name in names:
        folder = out / "models" / slug(name)
        if not (folder / "result.json").exists():
            continue
        res = json.loads((folder / "result.json").read_text())
        row = {"name": name, **CONFIGS[name], "train_seconds": res["seconds_this_run"], "quality": res["quality"]}
        if (out / "fresh" / f"{slug(name)}.json").exists():
            row["fresh_quality"] = json.loads((out / "fresh" / f"{slug(name)}.json").read_text())
        sp = out / "speed" / f"{slug(name)}.json"
        if sp.exists():
            row["speed"] = json.loads(sp.read_text())
        if name in steered:
            st = {p.stem: json.loads(p.read_text()) for p in sorted((out / "steer" / slug(name)).glob("beta*.json"))}
            row["steering"] = st
        rows.append(row)
    meta = run_record({"trees": TREES, "more_trees": MORE_TREES, "configs": {n: CONFIGS[n] for n in names}, "betas": BETAS, "top_k": TOP_K, "eval": EVAL,
                       "threads": torch.get_num_threads()}, 0)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "value_backbones.json").write_text(json.dumps({"run": meta, "pi_ref": ref, "rows": rows}, indent=2) + "\n")
    L = ["Held-out quality (one 3-head model per configuration; held-out = the val trees of the files it trained on: 160 prompts' file, or "
         "both files = 400 prompts) and decode speed (× HF `generate` sampling measured in the same process right before; 32 new tokens forced).", "",
         "| configuration | trained on | held-out trees | train s | R² helpful / harmless / humor | sibling concordance helpful / harmless / humor (pairs) "
         "| M=3 b1 | M=3 b8 | 3-head b1 | 3-head b8 |",
         "|---|---|---|---|---|---|---|---|---|---|"]

    def quality_cells(quality: dict) -> str:
        q = quality["per_objective"]
        r2 = " / ".join(f"{q[o]['r2']:.2f}" for o in OBJECTIVES)
        conc = " / ".join(f"{q[o]['concordance']:.3f} ± {q[o]['concordance_se']:.3f} ({q[o]['pairs']})" for o in OBJECTIVES)
        return f"{quality['trees']} | {{train}} | {r2} | {conc}"

    for r in rows:
        sp = {(s["method"], s["batch"]): s["ratio_vs_hf_generate"] for s in r.get("speed", [])}
        cells = [f"{sp[(m, b)]:.2f}" if (m, b) in sp else "-" for m in ("mavis_M3_separate", "mavis_3head") for b in (1, 8)]
        files = "400 prompts" if r.get("trees") == "400" else "160 prompts"
        L.append(f"| {r['name']} | {files} | " + quality_cells(r["quality"]).format(train=f"{r['train_seconds']:.0f}") + " | " + " | ".join(cells) + " |")
    fresh = [r for r in rows if r.get("fresh_quality")]
    if fresh:
        L += ["", "The same models (trained on the 160 prompts' file) scored on the val trees of the second file (prompts 160-400, never used to "
              "choose a configuration):", "", "| configuration | held-out trees | - | R² helpful / harmless / humor | sibling concordance (pairs) |",
              "|---|---|---|---|---|"]
        L += [f"| {r['name']} | " + quality_cells(r["fresh_quality"]).format(train="-") + " |" for r in fresh]
    if ref:
        L += ["", f"Steering: λ = {{m: 1}}, top-k {TOP_K}, {EVAL['prompts']} held-out test prompts × {EVAL['samples']} samples, ≤ {EVAL['max_new_tokens']} tokens; "
              "reward of the steered objective ± se (z vs π_ref), KL (eq. 7, nats).", "",
              "| configuration | β | " + " | ".join(OBJECTIVES) + " |", "|---|---|" + "---|" * len(OBJECTIVES),
              "| π_ref | - | " + " | ".join(f"{ref['rewards'][o]['mean']:.3f} ± {ref['rewards'][o]['se']:.3f}" for o in OBJECTIVES) + " |"]
        for r in rows:
            for beta in BETAS:
                st = r.get("steering", {})
                cells = []
                for o in OBJECTIVES:
                    s = st.get(f"beta{beta:g}-{o}")
                    if s is None:
                        cells.append("-")
                        continue
                    z = (s["reward"]["mean"] - ref["rewards"][o]["mean"]) / max((s["reward"]["se"] ** 2 + ref["rewards"][o]["se"] ** 2) ** 0.5, 1e-9)
                    cells.append(f"{s['reward']['mean']:.3f} ± {s['reward']['se']:.3f} (z {z:+.1f}), KL {s['kl']['mean']:.1f}")
                if st:
                    L.append(f"| {r['name']} | {beta:g} | " + " | ".join(cells) + " |")
    (results_dir / "value_backbones.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/value_backbones")
    ap.add_argument("--only", default=",".join(DEFAULT_RUN), help=f"configurations (known: {', '.join(CONFIGS)})")
    ap.add_argument("--steer", default=",".join(STEER), help="configurations to steer with (slow)")
    ap.add_argument("--stages", default="train,fresh,speed,steer,report")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    steered = [n.strip() for n in args.steer.split(",") if n.strip()]
    unknown = sorted(set(names + steered) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    stages = set(args.stages.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "train" in stages:
        for name in names:
            res = train(out, name)
            print(name, json.dumps({o: (q["r2"], q["concordance"]) for o, q in res["quality"]["per_objective"].items()}), flush=True)
            gc.collect()
    if "fresh" in stages:
        for name in names:
            q = fresh_quality(out, name)
            if q:
                print(name, "fresh", json.dumps({o: (v["r2"], v["concordance"]) for o, v in q["per_objective"].items()}), flush=True)
            gc.collect()
    if stages & {"speed", "steer"}:
        model, tok = load_causal_lm()
        if "speed" in stages:
            for name in names:
                print(name, speed(out, name, model, tok), flush=True)
                gc.collect()
        if "steer" in stages:
            rewards = get_rewards(OBJECTIVES)
            prompts = [p.text for p in load_prompts("hh-mix", "test", seed=0, tokenizer=tok, limit=EVAL["prompts"])]
            reference(out, model, tok, rewards, prompts)
            for name in steered:
                steer(out, name, model, tok, rewards, prompts)
    report(out, names, steered, Path(args.results))


if __name__ == "__main__":
    main()
