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
    if what in ("all", "values"):
        import json

        from .hub import packaged_value_models, resolve_value_source

        print("Packaged value models (--value packaged:NAME; heads only, the trunk is rebuilt from the base model):")
        for name in packaged_value_models():
            meta = json.loads((resolve_value_source(f"packaged:{name}") / "meta.json").read_text())
            prov = meta.get("provenance") or {}
            q = prov.get("held_out_quality") or {}
            quality = ", ".join(f"{m} R² {q[m]['r2']:.2f} / concordance {q[m]['concordance']:.2f}" for m in meta["objectives"] if m in q)
            tilt = prov.get("tilt") or {}
            print(f"  {name:16s} {', '.join(meta['objectives'])} on {meta.get('backbone')} of {meta.get('base_model')}; {quality}; "
                  f"tilt beta {tilt.get('beta')}, normalize {tilt.get('normalize')}, top-k {tilt.get('top_k')}")
    return 0


def _with_placement(spec, args: argparse.Namespace):
    """A recipe/sweep with the command line's --device/--dtype/--device-map (and --report-to) over its own."""
    for key in ("device", "dtype", "device_map", "report_to"):
        if getattr(args, key, None) is not None and hasattr(spec, key):
            setattr(spec, key, getattr(args, key))
    return spec


def _cmd_generate(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .decoding.decoder import DEFAULT_TOP_K, MavisDecoder, parse_value_spec, parse_weights
    from .generation import SamplingConfig
    from .provenance import write_run_record
    from .rewards import get_rewards, score_all, weighted_reward

    # everything a user can get wrong is checked before any model loads
    specs = [parse_value_spec(v) for v in args.value]
    weights = parse_weights(args.weights) if args.weights else None
    if args.reward is None:  # score what is steered: the weighted objectives that are registered rewards
        from .rewards import DEFAULT_OBJECTIVES, REWARDS

        steered = [n for n, w in (weights or {}).items() if w > 0]
        args.reward = [n for n in steered if n in REWARDS] if steered else list(DEFAULT_OBJECTIVES)
        unscored = [n for n in steered if n not in REWARDS]
        if unscored:
            print(f"note: {', '.join(unscored)} is not a registered reward; pass --reward SPEC (e.g. file.py:NAME) to score it", file=sys.stderr)
    rewards = get_rewards(args.reward)
    if weights and not specs:
        raise ValueError("--weights needs value models (--value NAME=PATH)")
    if args.prompt is not None and any(not p.strip() for p in args.prompt):
        raise ValueError("--prompt must not be empty")
    if args.beam and not specs:
        raise ValueError("--beam ranks candidates by value: it needs value models (--value NAME=PATH)")
    top_k = args.top_k if args.top_k is not None else (DEFAULT_TOP_K if specs else 0)
    if specs and top_k < 1:
        raise ValueError(f"--top-k must be >= 1 with value models, got {top_k}")
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        top_k=top_k,
        greedy=args.greedy,
        stop_strings=tuple(args.stop),
        beta=args.beta,
        normalize=not args.no_normalize,
        max_step_kl=args.max_step_kl,
        tail=args.tail,
        tilt_tokens=args.tilt_tokens,
        candidate_p=args.candidate_p,
    )
    t0 = time.perf_counter()
    decoder = MavisDecoder.load(args.model, args.value)
    tokenizer = decoder.tokenizer
    load_s = time.perf_counter() - t0
    if args.prompt:
        prompts = list(args.prompt)
    else:
        prompts = [p.text for p in load_prompts(args.dataset, args.split, seed=args.data_seed, tokenizer=tokenizer, limit=args.limit, field=args.prompt_field)]
    if not prompts:
        print("no prompts to generate for", file=sys.stderr)
        return 2
    decoder.resolve(len(prompts), weights, None, config)  # unknown objectives / bad weights: fail now
    t0 = time.perf_counter()
    common = dict(weights=weights, config=config, seed=args.seed, chat=not args.no_chat, progress=len(prompts) > args.batch_size)
    if args.beam:
        rerank = None
        if args.rerank:
            lam = weights or {n: 1.0 for n in decoder.objectives}
            rerank = weighted_reward(get_rewards(list(lam)), lam)
        gens = decoder.beam_search(prompts, num_beams=args.beam, expand=args.expand, rerank=rerank, batch_size=args.batch_size, **common)
    else:
        gens = decoder.generate(prompts, batch_size=args.batch_size, **common)
    gen_s = time.perf_counter() - t0
    n_tokens = sum(len(g.token_ids) for g in gens)
    scores = score_all(rewards, [g.prompt for g in gens], [g.text for g in gens])

    for i, g in enumerate(gens):
        print(f"\n=== [{i}] {g.prompt}")
        print(g.text)
        kl = f", KL est {g.log_ratio:.2f}" if specs else ""
        print("   " + "  ".join(f"{name}={vals[i]:+.3f}" for name, vals in scores.items()) + f"  ({len(g.token_ids)} tokens, {g.finish_reason}{kl})")
    if rewards:
        print("\nmean reward: " + "  ".join(f"{n}={sum(v) / len(v):+.3f}" for n, v in scores.items()))
    if specs:
        print(f"mean KL estimate (eq. 7): {sum(g.log_ratio for g in gens) / len(gens):.3f} nats; weights {weights or 'equal'}; beta {args.beta}; top-k {top_k}"
              + (f"; per-step KL cap {args.max_step_kl:g}" if args.max_step_kl else "") + (f"; tail {args.tail}" if args.tail != "drop" else ""))
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
                if "candidates" in g.extras:
                    rec["candidates"] = g.extras["candidates"]
                f.write(json.dumps(rec) + "\n")
        tmp.replace(out)  # a reader never sees a half-written file
        write_run_record(out.parent, {"command": "generate", **{k: v for k, v in vars(args).items() if k != "func"}}, args.seed, name=f"{out.stem}.run.json")
        print(f"wrote {out}")
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from .collect import CollectSpec, TreeConfig, collect
    from .generation import DEFAULT_TOP_K
    from .train.iterate import placement_names
    from .data import load_prompts
    from .decoding.decoder import parse_value_spec, parse_weights
    from .models import load_tokenizer
    from .rewards import get_rewards

    get_rewards(args.reward)  # unknown reward names fail before anything loads
    for v in args.value:
        parse_value_spec(v)
    if args.weights and not args.value:
        raise ValueError("--weights needs value models (--value NAME=PATH): collection without them samples pi_ref")
    tree = TreeConfig(
        num_layers=args.layers, k_root=args.k_root, k=args.k, max_new_tokens=args.max_new_tokens,
        two_layer_rule=args.two_layer_rule, extra_children=args.extra_children, max_rows=args.max_rows,
        temperature=args.temperature, top_k=args.top_k if args.top_k is not None else (DEFAULT_TOP_K if args.value else 0),
        beta=args.beta, normalize=not args.no_normalize, max_step_kl=args.max_step_kl, tail=args.tail,
    )
    spec = CollectSpec(
        model=args.model, values=list(args.value), weights=parse_weights(args.weights) if args.weights else None,
        rewards=list(args.reward), dataset=args.dataset, split=args.split, limit=args.limit, data_seed=args.data_seed,
        prompt_field=args.prompt_field, chat=not args.no_chat, tree=tree, seed=args.seed, group_size=args.group_size,
        val_fraction=args.val_fraction, **placement_names(),
    )
    tokenizer = load_tokenizer(args.model)
    prompts = [p.text for p in load_prompts(args.dataset, args.split, seed=args.data_seed, tokenizer=tokenizer, limit=args.limit, field=args.prompt_field)]
    if not prompts:
        raise ValueError("no prompts to collect trees for")
    t0 = time.perf_counter()
    out = collect(spec, args.out, prompts, resume=args.resume, overwrite=args.overwrite, backend=args.backend,
                  workers=args.workers, ray_address=args.ray_address, max_groups=args.max_groups)
    if out is None:
        print(f"stopped after --max-groups {args.max_groups}; continue with --resume")
        return 0
    from .collect import read_trees

    data, objectives, _ = read_trees(out)
    n_nodes = sum(len(t.nodes) for t in data.trees)
    n_tok = sum(len(n.tokens) for t in data.trees for n in t.nodes)
    print(f"wrote {out}: {len(data)} trees, {n_nodes} nodes, {n_tok} tokens, objectives {objectives} ({time.perf_counter() - t0:.1f}s this run)")
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from .collect import relabel
    from .rewards import get_rewards

    get_rewards(args.reward)
    out = relabel(args.trees, args.reward, args.out)
    print(f"labelled {out} with {', '.join(args.reward)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train_value_model
    from .values import ValueModel, build_value_model

    for t in args.trees:
        if not Path(t).is_file():
            raise FileNotFoundError(f"tree file {t} does not exist")
    if args.init:
        vm = ValueModel.load(args.init)
        if vm.objectives != list(args.objective):
            raise ValueError(f"--init model has heads {vm.objectives}, not {list(args.objective)}")
    else:
        vm = build_value_model(args.objective, backbone=args.backbone, base_model=args.base_model, seed=args.seed, pool=args.pool,
                               head_hidden=args.head_hidden, conditioned=args.conditioned)
    # the measured choice (benchmarks/value_backbones.py, packaged:default): closed-form ridge heads on every
    # leaf for a frozen trunk with linear heads; SGD with half the leaves otherwise
    ridge_ok = vm.frozen_backbone and not vm.head_hidden and not vm.conditioned and args.lora_rank is None and args.sibling_weight == 0
    solver = args.solver or ("ridge" if ridge_ok else "sgd")
    keep_leaves = args.keep_leaf_fraction if args.keep_leaf_fraction is not None else (1.0 if solver == "ridge" else 0.5)
    cfg = TrainConfig(
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps, zeta=args.zeta, kl_target=args.kl_target, kl_estimator=args.kl_estimator, ridge_kl=args.ridge_kl,
        keep_leaf_fraction=keep_leaves, val_drop_leaves=args.val_drop_leaves, eval_every=args.eval_every,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, seed=args.seed,
        sibling_weight=args.sibling_weight, solver=solver, objectives=list(args.objective),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    from .tracking import make_tracker

    tracker = make_tracker(args.report_to, project=args.project, run=args.run_name or Path(args.out).name, config=vars(cfg) | {"trees": args.trees}, out=args.out)
    try:
        res = train_value_model(vm, args.trees, args.out, cfg, resume=args.resume, tracker=tracker)
    finally:
        tracker.finish()
    if "rank" not in res:  # under `accelerate launch`, process 0 reports
        print(json.dumps(res, indent=2))
        for line in not_learned(res.get("quality") or {}):
            print(f"WARNING: {line}", file=sys.stderr)
        if args.candidates:  # the candidate-level benchmark (evaluate.candidates) on the trained model
            from .evaluate.candidates import render, score_benchmark
            from .provenance import write_json

            summary = score_benchmark(args.candidates, str(Path(args.out) / "best"), write=False, partial=True)
            write_json(Path(args.out) / "candidates.json", summary)
            print(render(summary))
    return 0


def not_learned(quality: dict) -> list[str]:
    """One line per objective whose held-out quality says the value model has not learned it
    (R² <= 0, or sibling concordance within one standard error of chance)."""
    out = []
    for m, q in (quality.get("per_objective") or {}).items():
        r2, conc, se = q.get("r2"), q.get("concordance"), q.get("concordance_se")
        if r2 is not None and r2 <= 0:
            out.append(f"{m}: held-out R² {r2:.3f} <= 0: the value model predicts worse than the mean; do not steer with it "
                       "(more trees; with a trunk:N backbone, ridge heads: docs/value-models.md)")
        elif conc is not None and conc <= 0.5 + (se or 0.0):
            out.append(f"{m}: sibling concordance {conc:.3f} ± {se or 0:.3f} is at chance: it cannot tell sibling continuations apart")
    return out


def _cmd_iterate(args: argparse.Namespace) -> int:
    from .train import load_recipe, run_iterations

    summary = run_iterations(_with_placement(load_recipe(args.recipe), args), args.out)
    print((Path(args.out) / "summary.md").read_text() if summary["iterations"] else "stopped early")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .study import check_study, load_study, run_study

    spec = load_study(args.recipe)
    _with_placement(spec.recipe, args)
    for key in ("device", "dtype", "device_map", "report_to"):
        if getattr(args, key, None) is not None:
            spec.mavis[key] = getattr(args, key)
    if args.check:
        print("\n".join(check_study(spec)))
        return 0
    stages = args.stages.split(",") if args.stages else None
    report = run_study(spec, args.out, stages=stages, report=args.report)
    print(f"report: {report}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .decoding.decoder import parse_value_spec
    from .train import DistillConfig, distill_auto
    from .values import ValueModel, build_value_model

    teachers = []
    for spec in args.teacher:
        name, path = parse_value_spec(spec)
        vm = ValueModel.load(path)
        if name is not None:
            if len(vm.objectives) != 1:
                raise ValueError(f"--teacher {spec}: NAME= only renames single-head models")
            vm.objectives = [name]
        teachers.append(vm)
    names = [o for t in teachers for o in t.objectives]
    def make_student():
        return build_value_model(names, backbone=args.backbone, base_model=args.base_model, seed=args.seed, pool=args.pool, head_hidden=args.head_hidden)

    from .tracking import make_tracker

    cfg = DistillConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    tracker = make_tracker(args.report_to, project=args.project, run=args.run_name or Path(args.out).name, config=vars(cfg), out=args.out)
    try:
        res = distill_auto(teachers, make_student, args.trees, args.out, cfg, method=args.method, tracker=tracker)
    finally:
        tracker.finish()
    print(json.dumps(res, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_DEMO_VALUES, run_demo

    if args.train and args.values:
        raise ValueError("--train trains the recipe's value models; --values steers with a ready one: give one of them")
    # --recipe alone trains its value models, as before packaged models existed; nothing: the packaged default
    values = None if args.train else args.values or (None if args.recipe else DEFAULT_DEMO_VALUES)
    run_demo(args.recipe, args.out, values=values, beta=args.beta, n_prompts=args.prompts, samples=args.samples, seed=args.seed)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .decoding.decoder import DEFAULT_TOP_K, MavisDecoder, parse_weights
    from .evaluate import BestOfN, DecoderPolicy, ModelPolicy, evaluate_policy
    from .generation import SamplingConfig
    from .provenance import run_record
    from .rewards import get_rewards, weighted_reward
    from .rewards.independent import with_independent

    rewards = get_rewards(args.reward)
    weights = parse_weights(args.weights) if args.weights else None
    if args.method in ("mavis", "mavis-beam", "mavis-step") and not args.value:
        raise ValueError(f"--method {args.method} needs value models (--value NAME=PATH)")
    if args.method == "policy" and not args.policy:
        raise ValueError("--method policy needs --policy FOLDER (from `mavis-align finetune`)")
    decoder = MavisDecoder.load(args.model, args.value if args.method.startswith("mavis") else [])
    model, tok = decoder.model, decoder.tokenizer
    prompts = [p.text for p in load_prompts(args.dataset, args.split, seed=args.data_seed, tokenizer=tok, limit=args.limit)]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, top_k=args.top_k if args.top_k is not None else (DEFAULT_TOP_K if args.value else 0), beta=args.beta,
                         normalize=not args.no_normalize, max_step_kl=args.max_step_kl, tail=args.tail, tilt_tokens=args.tilt_tokens,
                         candidate_p=args.candidate_p)
    chat = not args.no_chat
    if args.method == "ref":
        policy = DecoderPolicy("ref", decoder, SamplingConfig(max_new_tokens=args.max_new_tokens), chat=chat)
    elif args.method in ("mavis", "mavis-beam"):
        decoder.resolve(1, weights, None, cfg)
        policy = DecoderPolicy(args.method, decoder, cfg, weights=weights, beam=args.n if args.method == "mavis-beam" else 0, chat=chat)
    elif args.method == "mavis-step":  # steps of --chunk tokens sampled from pi_ref (top-k only if --top-k), kept by value
        step_cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, top_k=args.top_k or 0, beta=args.beta, normalize=not args.no_normalize)
        decoder.resolve(1, weights, None, step_cfg, token_tilt=False)
        policy = DecoderPolicy("mavis-step", decoder, step_cfg, weights=weights, chat=chat, chunk=args.chunk, candidates=args.n, select=args.select)
    else:
        from .baselines import load_policy_model

        pmodel, _ = load_policy_model(args.policy)
        policy = ModelPolicy("policy", pmodel, tok, SamplingConfig(max_new_tokens=args.max_new_tokens), chat=chat)
    if args.best_of:
        lam = weights or {r.name: 1.0 for r in rewards}
        policy = BestOfN(f"bon-{policy.name}", policy, args.best_of, weighted_reward(get_rewards(list(lam)), lam))
    against = None
    if args.judge or args.judge_against:
        if not (args.judge and args.judge_against):
            raise ValueError("--judge and --judge-against go together: a judge, and the evaluate output to compare against")
        from .evaluate.judge import CRITERIA

        bad = [c for c in args.criteria.split(",") if c not in CRITERIA]
        if bad:
            raise ValueError(f"--criteria: unknown {bad}; choose from {', '.join(CRITERIA)}")
        against = json.loads(Path(args.judge_against).read_text())
        if "responses" not in against:
            raise ValueError(f"{args.judge_against} holds no per-response records (written by an older mavis-align evaluate); evaluate it again")
    scored = rewards if args.no_independent else get_rewards(with_independent(args.reward))
    res = evaluate_policy(policy, prompts, scored, model, tok, samples=args.samples, seed=args.seed, chat=chat)
    if against is not None:
        from .evaluate.judge import make_judge, win_rate

        mine, theirs = res["responses"], against["responses"]
        if [r["prompt"] for r in mine] != [r["prompt"] for r in theirs]:
            raise ValueError(f"{args.judge_against} answered other prompts (or another number of samples) than this run; use the same --dataset/--split/--limit/--samples")
        judge = make_judge(args.judge, api_key=args.judge_api_key)
        prompts_, a, b = [r["prompt"] for r in mine], [r["response"] for r in mine], [r["response"] for r in theirs]
        res["judge"] = {"judge": judge.name, "against": against.get("method"),
                        "win_rates": [win_rate(judge, prompts_, a, b, c) for c in args.criteria.split(",")]}
    res["run"] = run_record({k: v for k, v in vars(args).items() if k != "func"}, args.seed)
    print(json.dumps({k: v for k, v in res.items() if k not in ("examples", "run", "responses")}, indent=2))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    from .evaluate import load_sweep, run_sweep

    run_sweep(_with_placement(load_sweep(args.config), args), args.out)
    print((Path(args.out) / "fronts.md").read_text())
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .baselines import RLConfig, train_conditioned_policy, train_decorrelated_adapter, train_rl_policy
    from .data import load_prompts
    from .decoding.decoder import parse_weights
    from .models import load_tokenizer
    from .rewards import get_rewards

    if sum(map(bool, (args.weights, args.conditioned, args.multihead))) != 1:
        raise ValueError("give one of --weights (one policy for one weighting), --conditioned (one policy for every weighting) "
                         "or --multihead (one trunk, one head per objective)")
    if args.multihead:
        from .baselines import MultiHeadConfig, train_multihead_policy

        tok = load_tokenizer(args.model)
        get_rewards(list(args.multihead))
        prompts = [p.text for p in load_prompts(args.dataset, "train", seed=args.data_seed, tokenizer=tok, limit=args.limit)]
        mh = MultiHeadConfig(max_new_tokens=args.max_new_tokens, learning_rate=args.lr, lora_rank=args.lora_rank, seed=args.seed,
                             samples_per_prompt=args.num_generations)
        out = train_multihead_policy(args.model, prompts, list(args.multihead), args.out, mh, chat=not args.no_chat)
        print(f"policy in {out}: " + (Path(out) / "mavis_policy.json").read_text())
        return 0
    weights = parse_weights(args.weights) if args.weights else None
    get_rewards(list(weights or args.conditioned))
    tok = load_tokenizer(args.model)
    prompts = [p.text for p in load_prompts(args.dataset, "train", seed=args.data_seed, tokenizer=tok, limit=args.limit)]
    cfg = RLConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                   max_completion_length=args.max_new_tokens, learning_rate=args.lr, lora_rank=args.lora_rank, kl_beta=args.kl_beta, seed=args.seed)
    if args.decorrelate_against and args.conditioned:
        raise ValueError("--decorrelate-against trains one per-objective adapter: use it with --weights")
    if args.decorrelate_against:
        out = train_decorrelated_adapter(args.model, prompts, weights, args.out, cfg, against=list(args.decorrelate_against), mi_weight=args.mi_weight,
                                         chat=not args.no_chat, report_to=args.report_to)
    elif args.conditioned:
        out = train_conditioned_policy(args.model, prompts, list(args.conditioned), args.out, cfg, grid_step=args.grid_step, chat=not args.no_chat,
                                       report_to=args.report_to)
    else:
        out = train_rl_policy(args.model, prompts, weights, args.out, cfg, chat=not args.no_chat, report_to=args.report_to)
    print(f"policy in {out}: " + (Path(out) / "mavis_policy.json").read_text())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .decoding.decoder import MavisDecoder
    from .rewards import REWARDS, get_rewards
    from .serve import serve
    from .serve.app import check_listen

    check_listen(args.host, args.port)  # a busy or invalid port: one line, before the models load
    decoder = MavisDecoder.load(args.model, args.value)
    names = args.reward if args.reward is not None else [o for o in decoder.objectives if o in REWARDS and REWARDS[o].offline]
    rewards = get_rewards(names)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key", file=sys.stderr)
    print(f"serving {args.model} with objectives {decoder.objectives or '(none: plain sampling)'} on http://{args.host}:{args.port}/ (playground at /)")
    from .serve.scheduler import MemoryBudget

    at_least = args.max_prompt_tokens + args.max_tokens_limit
    budget = (MemoryBudget(args.max_kv_tokens, args.max_candidates) if args.max_kv_tokens
              else MemoryBudget.for_models(decoder.model, decoder.value_models, at_least=at_least, candidates=args.max_candidates))
    print(f"memory budget: {budget.kv_tokens} KV positions, {budget.candidates} candidate positions per step")
    serve(decoder, host=args.host, port=args.port, model_name=args.model_name or args.model, api_key=args.api_key,
          max_tokens_limit=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens, max_batch=args.max_batch, max_queue=args.max_queue,
          rewards=rewards, budget=budget, shutdown_grace=args.shutdown_grace)
    return 0


def _cmd_candidates(args: argparse.Namespace) -> int:
    from .evaluate.candidates import CandidateBenchConfig, collect_candidates, score_benchmark

    cfg = CandidateBenchConfig(model=args.model, objectives=args.reward, dataset=args.dataset, split=args.split, prompts=args.prompts,
                               data_seed=args.data_seed, positions=args.positions, k=args.k, chunk=args.chunk, rollouts=args.rollouts,
                               max_new_tokens=args.max_new_tokens, seed=args.seed, max_rows=args.max_rows)
    collect_candidates(cfg, args.out, progress=not args.no_progress)
    for spec in args.value or [None]:
        score_benchmark(args.out, spec, seed=args.seed)
        name = (spec or "none").replace(":", "-").replace("/", "-").strip("-.")
        print((Path(args.out) / f"scores-{name}.md").read_text())
    return 0


def _cmd_train_probes(args: argparse.Namespace) -> int:
    from .rewards.defaults import WEIGHTS_DIR
    from .rewards.train_probes import train_all

    train_all(Path(args.out) if args.out else WEIGHTS_DIR, seed=args.seed, only=args.only)
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from .hub import write_model_card

    print(f"wrote {write_model_card(args.value, repo_id=args.repo_id)}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    repo = push_to_hub(args.value, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.value} to {repo} (load it with --value NAME={repo})")
    return 0


def _cmd_export_trees(args: argparse.Namespace) -> int:
    from .collect.hfdata import export_trees

    out = export_trees(args.trees, args.out)
    if args.push:
        from .collect.hfdata import trees_to_dataset

        trees_to_dataset(args.trees).push_to_hub(args.push, private=args.private)
        print(f"pushed to the data set {args.push}")
    print(f"wrote {out}")
    return 0


def _cmd_import_trees(args: argparse.Namespace) -> int:
    from .collect import read_trees
    from .collect.hfdata import import_trees

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists (pass --overwrite to replace it)")
    out = import_trees(args.source, args.out)
    data, objectives, _ = read_trees(out)
    print(f"wrote {out}: {len(data)} trees, objectives {objectives}")
    return 0


# Help for options that many commands share or that need no more than their name says (filled in by
# _fill_help where an option was added without one, so `--help` and docs/cli.md document every option).
COMMON_HELP = {
    "--model": "base model pi_ref: an embedded alias, a .gguf file, a save_pretrained folder, or a hub id",
    "--base-model": "the base model pi_ref the value model's tokenizer (and a trunk:N backbone) come from",
    "--value": "value model: [NAME=]PATH, packaged:NAME or a hub id (repeatable; NAME renames a single head)",
    "--weights": "objective weight NAME=W (repeatable; normalised to sum 1)",
    "--beta": "tilt strength beta (>= 0)",
    "--top-k": "candidates per step: the top-k of pi_ref (0 = whole vocabulary)",
    "--reward": "reward: a registered name, hf:MODEL[#INDEX][@FORMAT] or file.py:NAME / module:NAME (repeatable)",
    "--dataset": "prompt data: a registered name (`mavis-align ls`), a .jsonl/.csv file, or hf:NAME",
    "--split": "data split: train / val (dev) / test / final (untouched; read once for verdicts)",
    "--prompt-field": "prompt column of a user file or hub data set",
    "--limit": "number of prompts",
    "--data-seed": "seed of the data split",
    "--samples": "responses per prompt",
    "--max-new-tokens": "response budget in tokens",
    "--min-new-tokens": "no end-of-sequence before this many tokens",
    "--temperature": "softmax temperature of pi_ref (> 0)",
    "--greedy": "take the most likely token instead of sampling",
    "--batch-size": "rows per batch",
    "--seed": "random seed (every output folder records it)",
    "--out": "output folder or file",
    "--no-chat": "feed the prompt as plain text instead of the chat template",
    "--method": "the method to evaluate",
    "--recipe": "a recipe: a packaged name (`mavis-align ls`) or a YAML file",
    "--config": "the sweep's YAML file (see mavis_align.evaluate.pareto.SweepSpec for its keys)",
    "--extra-children": "children added to a root child that ends in EOS (App. C two-layer rule; default k)",
    "--backend": "local, or ray (workers on a Ray cluster)",
    "--lr": "learning rate",
    "--weight-decay": "weight decay",
    "--warmup-steps": "linear warm-up steps",
    "--grad-accum": "gradient accumulation steps",
    "--epochs": "passes over the training examples",
    "--max-steps": "stop after this many optimiser steps",
    "--val-drop-leaves": "drop leaves from the held-out examples too (as from training)",
    "--eval-every": "steps between held-out evaluations (0: at the end only)",
    "--lora-rank": "train LoRA adapters of this rank on the backbone instead of all its weights",
    "--lora-alpha": "LoRA scaling alpha",
    "--lora-dropout": "LoRA dropout",
    "--resume": "continue an interrupted run from its last checkpoint",
    "--teacher": "a value model to distil (repeatable)",
    "--trees": "rollout tree file(s)",
    "--backbone": "backbone of the student (see `mavis-align ls backbones`)",
    "--pool": "what the heads read (see `train --help`)",
    "--head-hidden": "0: linear heads; d > 0: MLP heads of width d",
    "--judge-api-key": "API key of the judge's endpoint",
    "--steps": "GRPO optimiser steps",
    "--prompts-per-step": "prompts per GRPO step",
    "--num-generations": "responses per prompt in each GRPO group",
    "--kl-beta": "weight of the KL penalty to pi_ref",
    "--port": "TCP port",
    "--max-tokens-limit": "the largest max_tokens a request may ask for",
    "--max-prompt-tokens": "the longest prompt (in tokens) a request may send",
    "--max-rows": "decode rows per forward batch",
    "--no-progress": "no progress bar",
    "--private": "create the hub repository as private",
    "--overwrite": "replace an existing output",
    "what": "what to list",
    "source": "the data set to import (hub name or local folder)",
}


def _fill_help(parser: argparse.ArgumentParser) -> None:
    """Give every option without help its COMMON_HELP text, and show defaults in every command's --help."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in sub.choices.values():
        p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
        for a in p._actions:
            if a.help is None and not isinstance(a, argparse._HelpAction):
                key = a.option_strings[0] if a.option_strings else a.dest
                a.help = COMMON_HELP.get(key)


def build_parser() -> argparse.ArgumentParser:
    from .data import SPLITS
    from .demo import DEFAULT_DEMO_VALUES
    from .generation import TAILS
    from .models import DEFAULT_BASE_MODEL
    from .values import DEFAULT_VALUE_BACKBONE
    from .rewards import DEFAULT_OBJECTIVES

    parser = argparse.ArgumentParser(prog="mavis-align", description="MAVIS: multi-objective value-guided decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ls", help="list models, rewards, data sets, value backbones and packaged value models")
    p.add_argument("what", nargs="?", default="all", choices=["all", "models", "rewards", "datasets", "backbones", "values"])
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("generate", help="sample responses and score them with reward functions")
    p.add_argument("--model", default=DEFAULT_BASE_MODEL, help="embedded name, hub id, local folder or .gguf file")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); otherwise --dataset is used")
    p.add_argument("--dataset", default="hh-mix", help="data set name, .jsonl/.csv file, or hf:NAME")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--prompt-field", default="prompt", help="prompt column of a user file / hub data set")
    p.add_argument("--limit", type=int, default=6, help="number of data set prompts")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data split")
    p.add_argument("--reward", action="append", default=None, help=f"reward to score the responses with: a name, hf:MODEL or file.py:NAME (repeatable; default: the weighted objectives that are rewards, else {', '.join(DEFAULT_OBJECTIVES)})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="candidates per step: top-k of pi_ref (default: 15 with value models, else 0 = full vocabulary)")
    p.add_argument("--value", action="append", default=[], metavar="[NAME=]PATH", help="value model folder (repeatable); NAME renames a single-head model's objective")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=W", help="objective weight lambda (repeatable; normalised to sum 1; default equal)")
    p.add_argument("--beta", type=float, default=1.0, help="tilt strength beta (>= 0)")
    p.add_argument("--no-normalize", action="store_true",
                   help="tilt by raw beta * sum lambda V (the paper's v3 form: softmax over the top-k of logits/T + beta * sum lambda V) "
                        "instead of min-max normalised values; raw values make beta scale-dependent: ~1/eta (tens) for soft values, ~1-5 normalised")
    p.add_argument("--max-step-kl", type=float, default=0.0, metavar="NATS",
                   help="cap on the KL the tilt adds at each step: a step where beta would move pi further from pi_ref's top-k "
                        "distribution uses the largest smaller beta that does not (0 = no cap, the paper's tilt)")
    p.add_argument("--tail", choices=TAILS, default="drop",
                   help="tokens outside the top-k candidates: drop (the paper's tilt: no mass) or keep (pi_ref's mass, tilted by the "
                        "pi_ref-weighted mean of the candidates' values: beta 0 is exactly pi_ref)")
    p.add_argument("--tilt-tokens", type=int, default=0, metavar="N",
                   help="tilt only the first N response tokens, beta 0 after them (0 = every token, the paper's)")
    p.add_argument("--candidate-p", type=float, default=1.0, metavar="P",
                   help="candidates: the fewest of the top-k holding P of pi_ref's mass (a nucleus inside the top-k; 1 = all k, the paper's)")
    p.add_argument("--beam", type=int, default=0, metavar="N", help="value-guided beam search with N beams (needs value models)")
    p.add_argument("--expand", type=int, default=None, help="children per beam per step (default N)")
    p.add_argument("--rerank", action="store_true", help="beam search: re-rank the N finished candidates by the lambda-weighted rewards of the same names")
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--output", help="write JSONL records here (plus a .run.json with config and versions)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("collect", help="collect Monte-Carlo rollout trees (GET_DATA) into an HDF5 file")
    p.add_argument("--out", required=True, help="output .h5 file")
    p.add_argument("--model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--dataset", default="hh-mix")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--limit", type=int, default=None, help="number of prompts (trees)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--reward", action="append", default=None, help=f"leaf reward (repeatable; default: {', '.join(DEFAULT_OBJECTIVES)})")
    p.add_argument("--layers", type=int, default=3, help="tree depth L")
    p.add_argument("--k-root", type=int, default=4, help="children of the root")
    p.add_argument("--k", type=int, default=2, help="children of other expanded nodes")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response budget T")
    p.add_argument("--two-layer-rule", action="store_true", help="split root children that end in EOS (paper App. C)")
    p.add_argument("--extra-children", type=int, default=None)
    p.add_argument("--max-rows", type=int, default=64, help="decode rows per forward batch")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--value", action="append", default=[], metavar="[NAME=]PATH", help="value models: collect with a MAVIS policy")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=W")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--no-normalize", action="store_true", help="tilt of pi_gen by raw values (see `generate --help`)")
    p.add_argument("--max-step-kl", type=float, default=0.0, metavar="NATS", help="per-step KL cap of the tilt (see `generate --help`)")
    p.add_argument("--tail", choices=TAILS, default="drop", help="tokens outside the top-k: drop or keep (see `generate --help`)")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=4, help="prompts per work unit (the resumable unit)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of trees in the val split")
    p.add_argument("--resume", action="store_true", help="continue an interrupted collection")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output / unfinished run")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=int, default=2, help="Ray workers")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    p.add_argument("--max-groups", type=int, default=None, help="stop after this many groups (resumable)")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("label", help="(re)label an existing tree file with rewards, without generating")
    p.add_argument("trees", help="tree file (.h5)")
    p.add_argument("--reward", action="append", required=True, help="reward name (repeatable)")
    p.add_argument("--out", help="write here instead of replacing the input")
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("train", help="train a value model on rollout trees (eq. 6)")
    p.add_argument("--trees", action="append", required=True, help="tree file (repeatable)")
    p.add_argument("--objective", action="append", required=True, help="objective = head (repeatable: one multi-head model)")
    p.add_argument("--out", required=True)
    p.add_argument("--init", help="start from this value model (policy iteration)")
    p.add_argument("--backbone", default=DEFAULT_VALUE_BACKBONE, help="backbone of a new model (see `mavis-align ls backbones`)")
    p.add_argument("--pool", default=None, choices=["last", "mean", "mean+last", "prompt+response"],
                   help="what the heads read: the last state (paper), the mean state, or prompt and response means with their interaction "
                        "(prompt+response, frozen trunks only); default: prompt+response for trunk:N, else last")
    p.add_argument("--head-hidden", type=int, default=0, help="0: linear heads; d > 0: two-layer MLP heads of width d")
    p.add_argument("--conditioned", action="store_true",
                   help="one preference-conditioned model V(s, λ) over all --objective (λ enters the head; width --head-hidden, default 64); "
                        "trained at λ drawn from the simplex on pi_ref trees, at the collecting λ on MAVIS trees")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--zeta", type=float, default=0.0, help="KL penalty multiplier (eq. 6)")
    p.add_argument("--kl-target", default="future", choices=["future", "response"], help="log-ratio charged: tokens after s (default) or the whole response")
    p.add_argument("--kl-estimator", default="sampled", choices=["sampled", "expected"],
                   help="the log-ratio as sampled (eq. 6 as printed) or each step's KL (recorded at collection; less variance)")
    p.add_argument("--ridge-kl", default="joint", choices=["joint", "separate"],
                   help="with --solver ridge and --zeta > 0: one penalty for eq. 6's target, or the values and the KL term fitted apart")
    p.add_argument("--solver", default=None, choices=["sgd", "ridge"],
                   help="ridge: closed-form heads on a frozen trunk, penalty by cross-validation over train trees; default: ridge where it applies "
                        "(frozen trunk, linear heads, no LoRA: R² 0.42 vs -8.45 for sgd on 16 prompts' trees), else sgd")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute backbone activations in the backward pass (large trained backbones)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sibling-weight", type=float, default=0.0, help="weight of the added sibling-difference loss (within-state order)")
    p.add_argument("--weight-decay", type=float, default=0.002)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--keep-leaf-fraction", type=float, default=None,
                   help="fraction of leaves kept as training examples (default: 1.0 with ridge, 0.5 with sgd)")
    p.add_argument("--candidates", metavar="DIR", help="a candidate benchmark folder (`mavis-align candidates`): report the trained model's "
                                                          "candidate-level concordance beside its noise ceiling (the benchmark objectives it has heads for)")
    p.add_argument("--val-drop-leaves", action="store_true")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=256.0)
    p.add_argument("--lora-dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("iterate", help="policy iteration (Algorithm 1) from a YAML recipe; resumable")
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_iterate)

    p = sub.add_parser("reproduce", help="the paper's claims re-measured from one study recipe -> REPORT.md; resumable")
    p.add_argument("--recipe", default="reproduce-default", help="study YAML or packaged name (reproduce-default, reproduce-paper)")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--report", default=None, help="also copy REPORT.md and its figures into this folder (e.g. results)")
    p.add_argument("--stages", default=None, help="comma list of stages to run (default: all): mavis,baselines,conditioned,single,sweep,distill,report")
    p.add_argument("--check", action="store_true", help="only validate the recipe and resolve its models, rewards and data set")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("distill", help="distil value models into one multi-head model (App. E)")
    p.add_argument("--teacher", action="append", required=True, metavar="[NAME=]PATH")
    p.add_argument("--trees", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="auto", choices=["auto", "stack", "train"],
                   help="stack: the teachers' heads side by side on their shared frozen trunk (exact, no training); train: a student "
                        "regresses onto the teachers (--backbone, --lr, ...); auto (default): stack when the teachers share a frozen trunk")
    p.add_argument("--backbone", default=DEFAULT_VALUE_BACKBONE)
    p.add_argument("--pool", default=None, choices=["last", "mean", "mean+last", "prompt+response"])
    p.add_argument("--head-hidden", type=int, default=0)
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("demo", help="show steering under several objective weightings: with the packaged value model, or (--train) quick ones trained first (cached)")
    p.add_argument("--values", default=None,
                   help=f"value model to steer with (default without --train/--recipe: {DEFAULT_DEMO_VALUES}, trained on 400 prompts' trees; see README)")
    p.add_argument("--train", action="store_true",
                   help="train the recipe's value models first (iteration 0, ~9 min the first time on 2 CPU cores, cached) and steer with them")
    p.add_argument("--recipe", default=None,
                   help="recipe YAML: base model, objectives, prompts, tilt (default: the packaged demo recipe); alone it implies --train")
    p.add_argument("--out", default=None, help="run folder (default: under the cache dir)")
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--prompts", type=int, default=12, help="held-out test prompts (half ordinary, half harmful)")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("evaluate", help="evaluate one method: rewards, KL (eq. 7), fluency, diversity, length, speed")
    p.add_argument("--method", default="mavis", choices=["ref", "mavis", "mavis-beam", "mavis-step", "policy"])
    p.add_argument("--model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--value", action="append", default=[], metavar="[NAME=]PATH")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=W")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--no-normalize", action="store_true", help="tilt by raw values (see `generate --help`)")
    p.add_argument("--max-step-kl", type=float, default=0.0, metavar="NATS", help="per-step KL cap of the tilt (see `generate --help`)")
    p.add_argument("--tail", choices=TAILS, default="drop", help="tokens outside the top-k: drop or keep (see `generate --help`)")
    p.add_argument("--tilt-tokens", type=int, default=0, metavar="N", help="tilt only the first N response tokens (see `generate --help`)")
    p.add_argument("--candidate-p", type=float, default=1.0, metavar="P", help="nucleus of pi_ref's mass inside the top-k (see `generate --help`)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--policy", help="fine-tuned policy folder (method policy)")
    p.add_argument("--best-of", type=int, default=0, metavar="N", help="best-of-N by the lambda-weighted rewards")
    p.add_argument("--no-independent", action="store_true",
                   help="score only the --reward labellers, not their independent scorers (helpful-pmi, harmless-lm, humor-lexical; rewards.independent)")
    p.add_argument("--n", type=int, default=5, help="beams of mavis-beam; candidate steps of mavis-step")
    p.add_argument("--chunk", type=int, default=10, help="mavis-step: tokens per step (value-guided step-level decoding)")
    p.add_argument("--select", default="best", choices=["best", "tilt"], help="mavis-step: keep the best step or draw one by the tilt (--beta)")
    p.add_argument("--reward", action="append", default=None)
    p.add_argument("--dataset", default="hh-mix")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--output", help="write the full result JSON here")
    p.add_argument("--judge", metavar="SPEC", help="pairwise LLM judge: MODEL@URL (OpenAI-compatible endpoint) or a local model name/path")
    p.add_argument("--judge-against", metavar="FILE", help="an earlier `evaluate --output` on the same prompts: win rates of this run against it")
    p.add_argument("--criteria", default="helpful,harmless,balanced", help="comma-separated judge criteria (helpful, harmless, balanced)")
    p.add_argument("--judge-api-key", default=None)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("pareto", help="run or resume a Pareto sweep from a YAML file, then plot")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_pareto)

    p = sub.add_parser("finetune", help="RL fine-tune a LoRA policy on weighted rewards with a KL penalty (TRL GRPO)")
    p.add_argument("--weights", action="append", metavar="NAME=W", help="reward weights (one name: single objective; several: MORLHF)")
    p.add_argument("--conditioned", action="append", metavar="NAME",
                   help="instead: one preference-conditioned policy over these objectives (repeatable, >= 2), told its weights in a system "
                        "instruction, trained over weights on a grid (MOODPO-like; sweep method `moodpo`)")
    p.add_argument("--grid-step", type=float, default=0.2, help="--conditioned: grid of the training weights")
    p.add_argument("--multihead", action="append", metavar="NAME",
                   help="instead: a MAHALO-style multi-head policy, one LoRA trunk and one LM head per objective trained with DPO "
                        "on pairs of pi_ref samples ranked by that objective's reward (repeatable; sweep methods `mahalo`, `mahalo-step`; "
                        "--num-generations samples per prompt)")
    p.add_argument("--decorrelate-against", action="append", metavar="FOLDER",
                   help="MVA-style: penalise the dependence (Gaussian MI of the LoRA updates) between this adapter and these "
                        "earlier policies' adapters (repeatable; sweep method `mva` combines and extrapolates them)")
    p.add_argument("--mi-weight", type=float, default=1.0, help="--decorrelate-against: weight of the dependence penalty")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--dataset", default="hh-mix")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--kl-beta", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API with per-request objective weights, and a playground page")
    p.add_argument("--model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--value", action="append", default=[], metavar="[NAME=]PATH")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--model-name", default=None, help="model id reported by the API (default: --model)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get HTTP 429")
    p.add_argument("--max-tokens-limit", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--reward", action="append", default=None, help="rewards for return_rewards (default: offline rewards named like the objectives)")
    p.add_argument("--max-kv-tokens", type=int, default=0, metavar="N",
                   help="memory bound: live rows x the longest row's prompt + max_tokens, in KV positions; requests wait for room "
                        "(default 0: a quarter of the device's memory for the base and value-trunk caches)")
    p.add_argument("--max-candidates", type=int, default=4096, metavar="N",
                   help="memory bound: tilted rows x (1 + their largest top_k), the positions of one value forward (default 4096)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C: seconds the accepted requests may run before they end with finish_reason 'abort' (default 30)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("candidates", help="candidate-level value benchmark: do the value models order the tilt's candidates? (resumable)")
    p.add_argument("--out", required=True, help="benchmark folder (candidates.h5; a rerun finishes it)")
    p.add_argument("--value", action="append", default=[], metavar="SPEC", help="value model to score (folder or packaged:NAME; repeatable; none: the data's own ceiling)")
    p.add_argument("--model", default=DEFAULT_BASE_MODEL)
    p.add_argument("--reward", action="append", default=None, help=f"objectives (repeatable; default: {', '.join(DEFAULT_OBJECTIVES)})")
    p.add_argument("--dataset", default="hh-mix")
    p.add_argument("--split", default="val", choices=SPLITS, help="held-out prompts (default val: designs are chosen on these)")
    p.add_argument("--prompts", type=int, default=24, help="prompts (half ordinary, half harmful)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--positions", type=int, nargs="+", default=[0, 4, 12], help="response tokens written before each state")
    p.add_argument("--k", type=int, default=8, help="candidates per state")
    p.add_argument("--chunk", type=int, default=1, help="candidate length: 1 = the top-k next tokens; L > 1 = k distinct L-token chunks sampled from pi_ref")
    p.add_argument("--rollouts", type=int, default=8, help="pi_ref rollouts per candidate")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_candidates)

    p = sub.add_parser("train-probes", help="retrain the learned default-reward probes from shipped data")
    p.add_argument("--out", help="output folder (default: the package's reward weights folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", metavar="PROBE", help="retrain only these probes (the others' weights and probes.json entries are kept)")
    p.set_defaults(func=_cmd_train_probes)

    p = sub.add_parser("card", help="write the model card (README.md) of a value model folder")
    p.add_argument("value", help="value model folder (e.g. .../value/best)")
    p.add_argument("--repo-id", help="hub id the card's usage examples name")
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("push", help="upload a value model folder with a generated model card to a hub repo")
    p.add_argument("value", help="value model folder")
    p.add_argument("repo_id", help="OWNER/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None, help="hub token (default: the logged-in one)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("export-trees", help="a tree file as a Hugging Face data set (Parquet file or save_to_disk folder)")
    p.add_argument("trees", help="tree file (.h5)")
    p.add_argument("out", help="OUT.parquet, or a folder")
    p.add_argument("--push", metavar="OWNER/NAME", help="also push the data set to this hub repo")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=_cmd_export_trees)

    p = sub.add_parser("import-trees", help="a tree data set (Parquet, folder or hub id) back into a checksummed tree file")
    p.add_argument("source")
    p.add_argument("out", help="tree file to write (.h5)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_import_trees)
    for name, p in sub.choices.items():
        if name not in ("ls", "card", "push", "export-trees", "import-trees"):  # these load no model to place
            _add_placement(p, recipe=name in ("iterate", "reproduce", "pareto"))
        if name in ("train", "distill", "finetune", "iterate", "reproduce"):
            _add_report_to(p, recipe=name in ("iterate", "reproduce"))
    _fill_help(parser)
    return parser


def _add_report_to(p: argparse.ArgumentParser, *, recipe: bool) -> None:
    from .tracking import REPORT_TO

    g = p.add_argument_group("experiment logging (metrics.jsonl is always written)")
    g.add_argument("--report-to", default=None if recipe else "none", choices=REPORT_TO,
                   help="mirror training metrics to trackio (local, offline), wandb or tensorboard" + (" (overrides the recipe's)" if recipe else ""))
    if not recipe:
        g.add_argument("--project", default="mavis-align", help="tracker project (default: mavis-align)")
        g.add_argument("--run-name", default=None, help="tracker run name (default: the --out folder's name)")


def _add_placement(p: argparse.ArgumentParser, *, recipe: bool) -> None:
    from .placement import DEVICE_MAPS, DTYPE_CHOICES

    over = " (overrides the recipe's)" if recipe else ""
    g = p.add_argument_group("placement (see mavis_align.placement)")
    g.add_argument("--device", default=None, help=f"cpu, cuda, cuda:N, mps or auto (default: auto = CUDA when present){over}")
    g.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help=f"model parameters' dtype (default: auto = bf16 on a GPU that has it, else fp16; fp32 on the CPU){over}; "
                        "the decoding math and the value heads stay fp32")
    g.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                   help=f"shard the base model over the visible GPUs with accelerate (for a model larger than one GPU){over}")


def _terminate(signum, frame) -> None:
    """SIGTERM -> SystemExit, so `finally` blocks (checkpoints, cost records) run as on Ctrl-C."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":  # the server installs its own graceful-shutdown handlers
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
    if getattr(args, "reward", "unset") is None and args.command not in ("serve", "generate"):
        from .rewards import DEFAULT_OBJECTIVES

        args.reward = list(DEFAULT_OBJECTIVES)
    from .paths import MissingWheelError

    import yaml

    from .placement import using

    try:
        with using(getattr(args, "device", None), getattr(args, "dtype", None), getattr(args, "device_map", None)):
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, MissingWheelError, yaml.YAMLError) as err:
        # Anticipated user errors (unknown names, missing wheels, bad files): one clear line.
        print(f"mavis-align {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
