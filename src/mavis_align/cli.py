"""Command line: ``mavis-align <command>``. One subcommand per stage."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_ls(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .models import EMBEDDED_MODELS, embedded_cache_path
    from .rewards import list_rewards
    from .values import BACKBONES

    what = args.what
    if what in ("all", "models"):
        print("Base models (embedded; any hub id, local folder or .gguf file also works):")
        for m in EMBEDDED_MODELS.values():
            cached = "cached" if (embedded_cache_path(m.name) / "model.safetensors").exists() else "not converted yet"
            print(f"  {m.name:28s} {m.description} [{cached}]")
    if what in ("all", "rewards"):
        print("Rewards (--reward NAME, or hf:NAME_OR_PATH[#INDEX][@FORMAT]):")
        for r in list_rewards():
            lo, hi = r.value_range
            where = "offline" if r.offline else "needs hub"
            print(f"  {r.name:16s} [{lo:g}, {hi:g}] {'higher' if r.higher_is_better else 'lower'} is better, {where}: {r.description}")
    if what in ("all", "datasets"):
        print("Prompt data sets (--dataset NAME, a .jsonl/.csv file, or hf:NAME):")
        for d in DATASETS.values():
            print(f"  {d.name:16s} {d.description} (prompt tokens {d.min_tokens}-{d.max_tokens})")
    if what in ("all", "backbones"):
        print("Value-model backbones:")
        for name, desc in BACKBONES.items():
            print(f"  {name:16s} {desc}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .generation import SamplingConfig, generate
    from .models import load_causal_lm
    from .provenance import write_run_record
    from .rewards import get_rewards, score_all

    rewards = get_rewards(args.reward)  # fail on unknown names before loading anything big
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        greedy=args.greedy,
        stop_strings=tuple(args.stop),
    )
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model)
    load_s = time.perf_counter() - t0
    if args.prompt:
        prompts = list(args.prompt)
    else:
        prompts = [p.text for p in load_prompts(args.dataset, args.split, seed=args.data_seed, tokenizer=tokenizer, limit=args.limit, field=args.prompt_field)]
    if not prompts:
        print("no prompts to generate for", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    gens = generate(model, tokenizer, prompts, config, seed=args.seed, batch_size=args.batch_size, chat=not args.no_chat, progress=len(prompts) > args.batch_size)
    gen_s = time.perf_counter() - t0
    n_tokens = sum(len(g.token_ids) for g in gens)
    scores = score_all(rewards, [g.prompt for g in gens], [g.text for g in gens])

    for i, g in enumerate(gens):
        print(f"\n=== [{i}] {g.prompt}")
        print(g.text)
        print("   " + "  ".join(f"{name}={vals[i]:+.3f}" for name, vals in scores.items()) + f"  ({len(g.token_ids)} tokens, {g.finish_reason})")
    if rewards:
        print("\nmean reward: " + "  ".join(f"{n}={sum(v) / len(v):+.3f}" for n, v in scores.items()))
    print(f"model load {load_s:.1f}s; generated {n_tokens} tokens in {gen_s:.1f}s ({n_tokens / max(gen_s, 1e-9):.1f} tok/s)")

    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        with tmp.open("w") as f:
            for i, g in enumerate(gens):
                rec = {
                    "prompt": g.prompt,
                    "response": g.text,
                    "finish_reason": g.finish_reason,
                    "n_tokens": len(g.token_ids),
                    "log_ratio": g.log_ratio,
                    "rewards": {n: v[i] for n, v in scores.items()},
                }
                f.write(json.dumps(rec) + "\n")
        tmp.replace(out)  # a reader never sees a half-written file
        write_run_record(out.parent, {"command": "generate", **{k: v for k, v in vars(args).items() if k != "func"}}, args.seed, name=f"{out.stem}.run.json")
        print(f"wrote {out}")
    return 0


def _cmd_train_probes(args: argparse.Namespace) -> int:
    from .rewards.defaults import WEIGHTS_DIR
    from .rewards.train_probes import train_all

    train_all(Path(args.out) if args.out else WEIGHTS_DIR, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_BASE_MODEL
    from .rewards import DEFAULT_OBJECTIVES

    parser = argparse.ArgumentParser(prog="mavis-align", description="MAVIS: multi-objective value-guided decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ls", help="list models, rewards, data sets and value backbones")
    p.add_argument("what", nargs="?", default="all", choices=["all", "models", "rewards", "datasets", "backbones"])
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("generate", help="sample responses and score them with reward functions")
    p.add_argument("--model", default=DEFAULT_BASE_MODEL, help="embedded name, hub id, local folder or .gguf file")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); otherwise --dataset is used")
    p.add_argument("--dataset", default="hh-mix", help="data set name, .jsonl/.csv file, or hf:NAME")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--prompt-field", default="prompt", help="prompt column of a user file / hub data set")
    p.add_argument("--limit", type=int, default=6, help="number of data set prompts")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data split")
    p.add_argument("--reward", action="append", default=None, help=f"reward name (repeatable; default: {', '.join(DEFAULT_OBJECTIVES)})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample from the top-k tokens only (0 = full vocabulary)")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--output", help="write JSONL records here (plus a .run.json with config and versions)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("train-probes", help="retrain the learned default-reward probes from shipped data")
    p.add_argument("--out", help="output folder (default: the package's reward weights folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train_probes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "reward", "unset") is None:
        from .rewards import DEFAULT_OBJECTIVES

        args.reward = list(DEFAULT_OBJECTIVES)
    from .paths import MissingWheelError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, MissingWheelError) as err:
        # Anticipated user errors (unknown names, missing wheels, bad files): one clear line.
        print(f"mavis-align {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
