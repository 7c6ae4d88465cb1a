"""The README's main command: decode the same held-out prompts under several objective weightings
and show how the per-objective rewards and the KL move, with the packaged default value model
(``packaged:default``) or with quick value models trained first for the default objectives
(iteration 0 of MAVIS, cached after the first run)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path

DEFAULT_DEMO_VALUES = "packaged:default"  # what `mavis-align demo` steers with unless told to train
# The tilt the demo uses with packaged:default: chosen on dev (val) prompts by the rule fixed in
# benchmarks/tail_sweep.py before its data (benchmarks/results/tail_sweep.md): the largest mean reward
# gain over pi_ref among the settings within 8 nats for every objective. Other value models: the tilt
# their provenance records.
DEMO_TILT = {"beta": 25.0, "normalize": False, "top_k": 15, "tail": "keep"}


TOP_K_ONLY = "top-k only (β = 0)"  # the steered rows' candidate set and temperature without the values


def steering_settings(objectives: list[str]) -> list[tuple[str, dict | None]]:
    """pi_ref, top-k sampling alone (what the tilt's top-k does without values), each objective alone,
    and each neighbouring pair at equal weight."""
    out: list[tuple[str, dict | None]] = [("pi_ref (no values)", None), (TOP_K_ONLY, None)]
    out += [(m, {m: 1.0}) for m in objectives]
    out += [(f"{a}+{b}", {a: 0.5, b: 0.5}) for a, b in zip(objectives, objectives[1:])]
    return out


def steering_z(steered: dict, ref: dict, samples: int = 1) -> float:
    """The rise of a reward over π_ref in standard errors.

    Paired by prompt when both summaries carry per-response ``values`` in the same prompt order
    (``samples`` responses per prompt): mean of the per-prompt differences / their standard error.
    Otherwise unpaired: (mean − mean_ref) / sqrt(se² + se_ref²).
    """
    a, b = steered.get("values"), ref.get("values")
    if a is not None and b is not None and len(a) == len(b) and len(a) >= 2 * samples:
        diffs = [sum(a[i : i + samples]) / samples - sum(b[i : i + samples]) / samples for i in range(0, len(a), samples)]
        n = len(diffs)
        mean = sum(diffs) / n
        sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
        se = sd / n**0.5
        return mean / se if se > 0 else float("nan")
    se = (steered["se"] ** 2 + ref["se"] ** 2) ** 0.5
    return (steered["mean"] - ref["mean"]) / se if se > 0 else float("nan")


def _critical(n_prompts: int) -> str:
    """The two-sided 5 % critical value of the paired z over ``n_prompts`` prompts, in words."""
    from .evaluate.summary import t_quantile

    if n_prompts < 2:
        return "one prompt: no interval"
    return f"beyond t(0.975, {n_prompts - 1} df) = {t_quantile(0.975, n_prompts - 1):.2f} is a rise at the 5 % level, two-sided"


def _kl_cell(kl: dict | None) -> str:
    return "-" if kl is None else f"{kl['mean']:.2f} ± {kl['se']:.2f}"


def balanced_prompts(items, per_category: int) -> list[str]:
    """The texts of the first ``per_category`` ordinary and the first ``per_category`` harmful prompts
    (:class:`~mavis_align.data.Prompt` items), ordinary ones first: the demo's steering prompts."""
    return [p.text for p in items if p.category != "harmful"][:per_category] + [p.text for p in items if p.category == "harmful"][:per_category]


def packaged_recipe(name: str = "demo") -> Path:
    return Path(str(resources.files("mavis_align") / "recipes" / f"{name}.yaml"))


def packaged_quality_table(vm) -> str:
    """The held-out quality a packaged value model recorded when it was trained (its ``provenance``)."""
    prov = vm.meta.get("provenance") or {}
    q = prov.get("held_out_quality") or {}
    rows = ["| objective | held-out R² | sibling concordance (pairs) |", "|---|---|---|"]
    rows += [f"| {m} | {q[m]['r2']:.3f} | {q[m]['concordance']:.3f} ± {q[m]['concordance_se']:.3f} ({q[m]['pairs']}) |" for m in vm.objectives if m in q]
    return "\n".join([f"Trained by `{prov.get('trained_by', '?')}` on {prov.get('trees', '?')}; measured then, on its held-out trees:", "", *rows, ""])


def run_demo(recipe_path: str | Path | None = None, out: str | Path | None = None, *, values: str | None = None, beta: float | None = None,
             n_prompts: int = 12, samples: int = 2, seed: int = 0, progress: bool = True) -> str:
    """Steer the recipe's held-out prompts under several objective weightings and print the table.

    ``values``: a value model with a head per objective of the recipe (e.g. ``packaged:default``),
    tilted as its ``provenance.tilt`` records unless ``beta`` is given; None: train the recipe's
    value models first (iteration 0 of MAVIS, cached after the first run) and tilt as its ``eval:``."""
    from .data import load_prompts
    from .decoding.decoder import MavisDecoder
    from .evaluate import DecoderPolicy, evaluate_policy, evaluate_weightings
    from .generation import SamplingConfig
    from .models import load_causal_lm
    from .paths import cache_dir
    from .rewards import get_rewards
    from .rewards.independent import independent_scorers, with_independent
    from .train.iterate import eval_config, load_recipe, run_iterations
    from .values import ValueModel

    recipe = load_recipe(recipe_path or packaged_recipe())
    cfg = eval_config(recipe)
    if values is None:
        key = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
        out = Path(out) if out else cache_dir() / "demo" / f"{recipe.name}-{key}"
        print(f"value models: {out} (reused when present)")
        summary = run_iterations(recipe, out, progress=progress)
        last = len(summary["iterations"]) - 1
        lines = ["## Value models (iteration %d)" % last, "", (out / "summary.md").read_text()]
        vms = [ValueModel.load(out / f"iter{last}" / m / "value" / "best") for m in recipe.objectives]
    else:
        vm = ValueModel.load(values)
        missing = [m for m in recipe.objectives if m not in vm.objectives]
        if missing:
            raise ValueError(f"value model {values!r} has heads {vm.objectives}; the demo steers {list(recipe.objectives)} (missing {missing})")
        tilt = DEMO_TILT if values == DEFAULT_DEMO_VALUES else (vm.meta.get("provenance") or {}).get("tilt") or {}
        cfg = dataclasses.replace(cfg, **{k: tilt[k] for k in ("beta", "normalize", "top_k", "tail") if k in tilt})
        key = hashlib.sha256(json.dumps([str(values), vm.meta.get("trunk_fingerprint"), recipe.to_dict()], sort_keys=True, default=str).encode()).hexdigest()[:10]
        out = Path(out) if out else cache_dir() / "demo" / f"{str(values).replace(':', '-').replace('/', '-')}-{key}"
        out.mkdir(parents=True, exist_ok=True)
        print(f"value model: {values} (heads {', '.join(vm.objectives)}); results in {out}")
        lines = [f"## Value model `{values}`", "", packaged_quality_table(vm)]
        vms = [vm]

    model, tok = load_causal_lm(recipe.model)
    decoder = MavisDecoder(model, tok, vms)
    half = max(1, n_prompts // 2)
    # the untouched final test split (data.py): no choice behind this demo was made on it; a small
    # user data set without one falls back to its test split, and the table says so
    split = "final"
    prompts = balanced_prompts(load_prompts(recipe.dataset, split, seed=recipe.data_seed, tokenizer=tok), half)
    if not prompts:
        split = "test"
        prompts = balanced_prompts(load_prompts(recipe.dataset, split, seed=recipe.data_seed, tokenizer=tok), half)
    if beta is not None:
        cfg = dataclasses.replace(cfg, beta=beta)
    b = cfg.beta
    plain = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    top_k_only = SamplingConfig(max_new_tokens=cfg.max_new_tokens, top_k=0 if cfg.tail == "keep" else cfg.top_k, temperature=cfg.temperature)
    rewards = get_rewards(with_independent(recipe.objectives))
    indep = independent_scorers(recipe.objectives)
    header = ("| weights λ | " + " | ".join(recipe.objectives) + " | KL (nats), eq. 7 | KL, Σ step KLs | fluency (ppl under π_ref) | distinct-2 "
              "| weighted objectives: z vs π_ref | z vs top-k only | independent scorers: z vs π_ref | z vs top-k only |")
    table = [header, "|---" * (len(recipe.objectives) + 9) + "|"]
    examples = []
    settings = steering_settings(list(recipe.objectives))
    # pi_ref and top-k sampling alone, then every weighting in the same decode batches (per-row λ; each weighting's row i
    # keeps row_generator(seed, i), so the weightings share their random draws with each other and with the plain rows)
    results = {}
    for label, c in ((settings[0][0], plain), (TOP_K_ONLY, top_k_only)):
        if c == plain and results:  # tail keep: top-k only at beta 0 is pi_ref itself, the same decode
            results[label] = {**results[settings[0][0]], "method": label}
            continue
        results[label] = evaluate_policy(DecoderPolicy(label, MavisDecoder(model, tok), c, chat=recipe.chat, batch_size=min(32, len(prompts) * samples)),
                                         prompts, rewards, model, tok, samples=samples, seed=seed, chat=recipe.chat, keep_examples=len(prompts) * samples)
    results.update(evaluate_weightings(decoder, cfg, [(label, w) for label, w in settings if w], prompts, rewards, model, tok, samples=samples, seed=seed,
                                       chat=recipe.chat, keep_examples=len(prompts) * samples, batch_size=64))
    ref, trunc = results[settings[0][0]]["rewards"], results[TOP_K_ONLY]["rewards"]
    for label, weights in settings:
        res = results[label]
        cells = [f"{res['rewards'][m]['mean']:.3f} ± {res['rewards'][m]['se']:.3f}" for m in recipe.objectives]
        zs = ", ".join(f"{m} {steering_z(res['rewards'][m], ref[m], samples):+.1f}" for m in (weights or {}))
        zt = ", ".join(f"{m} {steering_z(res['rewards'][m], trunc[m], samples):+.1f}" for m in (weights or {}))
        iz = ", ".join(f"{indep[m]} {steering_z(res['rewards'][indep[m]], ref[indep[m]], samples):+.1f}" for m in (weights or {}) if m in indep)
        it = ", ".join(f"{indep[m]} {steering_z(res['rewards'][indep[m]], trunc[indep[m]], samples):+.1f}" for m in (weights or {}) if m in indep)
        table.append(f"| {label} | " + " | ".join(cells) + f" | {_kl_cell(res['kl'])} | {_kl_cell(res.get('kl_steps'))} | {res['fluency_ppl_ref']:.1f} "
                     f"| {res['distinct_2']:.3f} | {zs or '-'} | {zt or '-'} | {iz or '-'} | {it or '-'} |")
        harmful = next((e for e in res["examples"] if e["prompt"] == prompts[-1]), None) or res["examples"][-1]
        examples.append(f"- **{label}**: {harmful['response'][:200]!r}")
    text = "\n".join(lines + [
        f"## Steering: {len(prompts)} prompts of the {split} split ({half} ordinary, {half} harmful) x {samples} samples, beta={b}, top-k={cfg.top_k}, "
        f"tilt on {'NORMALIZEd' if cfg.normalize else 'raw'} values, tail {cfg.tail}",
        "", "Mean reward ± standard error per objective; KL over the response in nats ± standard error, by paper eq. 7 (sampled "
        "log-ratios) and as the sum of each step's KL to π_ref (same expectation, less variance); fluency: perplexity of the responses "
        "under π_ref (lower reads more like the base model); distinct-2: unique word bigrams / all. z of each weighted objective's rise "
        f"(mean per-prompt difference / its standard error, paired by prompt; {_critical(len(prompts))}) over π_ref and over '{TOP_K_ONLY}': "
        "sampling from the same candidates without the values, so that its z shows what the values add beyond the top-k cut. Independent "
        "scorers (never used to label trees or select): the same z for a second signal of each weighted objective ("
        + ", ".join(f"{m}: {s}" for m, s in indep.items()) + "; `mavis_align.rewards.independent`): a labeller's rise without an independent "
        "rise is what reward hacking looks like.", "", *table, "",
        f"Responses to {prompts[-1]!r}:", "", *examples, "",
    ])
    from .provenance import write_run_record

    # the demo's own settings beside the result (a trained demo's folder also holds iterate's run.json)
    write_run_record(out, {"recipe": recipe.to_dict(), "values": values or "trained (iterate)", "sampling": dataclasses.asdict(cfg),
                           "n_prompts": len(prompts), "samples": samples}, seed, name="demo-run.json")
    (out / "demo.md").write_text(text)
    (out / "demo.json").write_text(json.dumps({"beta": b, "normalize": cfg.normalize, "prompts": prompts, "results": results}, indent=2, default=str) + "\n")
    print(text)
    return text
