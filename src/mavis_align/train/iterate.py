"""Soft policy iteration (paper Algorithm 1), one value model per objective, driven by a recipe.

    iteration 0:  N^0 = GET_DATA(pi_ref)  (shared by every objective, labelled with all rewards)
                  V_m^0 = new value model trained on N^0
    iteration i:  pi_m^i = MAVIS(pi_ref, V_m^{i-1}, k, beta_i)
                  N_m^i = GET_DATA(pi_m^i) labelled with R_m
                  V_m^i = V_m^{i-1} trained further on N_m^i with KL penalty zeta_i

After every iteration each V_m^i is evaluated: reward R_m and KL (eq. 7) of MAVIS with
lambda = {m: 1} on validation prompts, next to pi_ref. Every stage writes its output whole and is
skipped when rerun, and collection and training resume from their own checkpoints, so
``mavis-align iterate --recipe R --out D`` can be killed and rerun at any point.

Layout of ``D``::

    recipe.json, run.json
    iter0/trees.h5                    shared iteration-0 trees
    iter0/<objective>/value/          training folder (best/ is V_m^0)
    iter<i>/<objective>/trees.h5      trees of pi_m^i (i >= 1)
    iter<i>/<objective>/value/
    eval/ref.json                     pi_ref on the validation prompts
    eval/iter<i>-<objective>.json     MAVIS with V_m^i
    costs.json                        wall seconds of each collection and training stage
    summary.json, summary.md
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..generation import DEFAULT_TOP_K
from ..collect import CollectSpec, TreeConfig, collect
from ..schema import ListOf, Shape, check, read_yaml_mapping, shape_of
from .quality import format_concordance, format_r2
from .regression import TrainConfig, train_value_model

EVAL_BATCH = 16  # rows per decode batch when an iteration is evaluated (per-row generators: the draws do not depend on it)


@dataclass
class IterationSpec:
    """One policy-iteration round (i >= 1 uses ``beta`` for collection and ``zeta`` for training)."""

    beta: float = 1.0
    zeta: float = 0.0
    train: dict = field(default_factory=dict)  # TrainConfig overrides for this round
    objectives: list[str] | None = None  # subset to iterate this round (default: all)


@dataclass
class Recipe:
    """A whole run: base model, objectives, data, tree shape, value backbone, training, rounds."""

    name: str = "run"
    model: str = "smollm2-135m-instruct"
    objectives: list[str] = field(default_factory=lambda: ["helpful", "harmless", "humor"])
    dataset: str = "hh-mix"
    prompt_field: str = "prompt"  # column of user files / hub data sets holding the prompt
    data_seed: int = 0
    train_prompts: int = 64
    eval_prompts: int = 16
    chat: bool = True
    tree: dict = field(default_factory=dict)
    backbone: str = "trunk:4"
    value_head: dict = field(default_factory=dict)  # {"pool": last|mean|mean+last|prompt+response, "hidden": 0 (linear) or MLP width}
    train: dict = field(default_factory=dict)
    iterations: list[dict] = field(default_factory=list)  # rounds i >= 1
    eval: dict = field(default_factory=lambda: {"beta": 2.0, "top_k": DEFAULT_TOP_K, "max_new_tokens": 48, "samples": 1})
    seed: int = 0
    group_size: int = 4
    val_fraction: float = 0.1
    backend: str = "local"
    workers: int = 2
    device: str | None = None  # where every model runs, in which precision (None: the command's; see mavis_align.placement)
    dtype: str | None = None
    device_map: str | None = None  # "auto": shard the base model over the visible GPUs
    candidates: str = ""  # a candidate benchmark folder (`mavis-align candidates`): every iteration's models report on it
    report_to: str = "none"  # experiment logging of every training (mavis_align.tracking): none, trackio, wandb, tensorboard

    def __post_init__(self) -> None:
        check(self.to_dict(), recipe_shape())  # keys and types, with the key path in the error
        from ..placement import DEVICE_MAPS, resolve_dtype

        if self.dtype not in (None, "auto"):
            resolve_dtype(self.dtype)
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAPS)} or null, got {self.device_map!r}")
        from ..tracking import check_report_to

        check_report_to(self.report_to)
        TreeConfig(**self.tree)  # ranges
        TrainConfig(**self.train)
        self.rounds = [IterationSpec(**it) for it in self.iterations]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def recipe_shape() -> Shape:
    """The schema of a recipe: :class:`Recipe`'s fields with their nested settings."""
    train = shape_of(TrainConfig)
    return shape_of(
        Recipe, tree=shape_of(TreeConfig), train=train,
        iterations=ListOf(shape_of(IterationSpec, train=train)),
        value_head=Shape({"pool": str, "hidden": int}, "value_head"),
        eval=Shape({"beta": float, "top_k": int, "max_new_tokens": int, "samples": int, "temperature": float, "normalize": bool,
                                  "max_step_kl": float, "tail": str}, "eval"),
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe, validated against :func:`recipe_shape` (unknown keys and wrong types are
    errors with their key path: typos must not pass silently)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    raw = read_yaml_mapping(path, "recipe")
    try:
        check(raw, recipe_shape())
        return Recipe(**raw)
    except ValueError as err:
        raise ValueError(f"recipe {path}: {err}") from None


def value_model_options(recipe: Recipe) -> dict:
    """build_value_model keyword arguments of the recipe's value models."""
    return {"backbone": recipe.backbone, "base_model": recipe.model, "pool": recipe.value_head.get("pool"),
            "head_hidden": int(recipe.value_head.get("hidden", 0))}


def recipe_prompts(recipe: Recipe, split: str, n: int) -> list[str]:
    """The first ``n`` prompts of ``split`` of the recipe's data set (its seed, field, tokenizer)."""
    from ..data import load_prompts
    from ..models import load_tokenizer

    tok = load_tokenizer(recipe.model)
    return [p.text for p in load_prompts(recipe.dataset, split, seed=recipe.data_seed, tokenizer=tok, limit=n, field=recipe.prompt_field)]


def extends_recipe(old: dict, new: dict) -> bool:
    """True when recipe ``new`` (a ``to_dict``) continues the run of ``old``: the same but for its
    name, evaluation settings and policy-iteration rounds appended after the old ones."""
    def strip(d: dict) -> dict:  # where a run executes is not what it is: device and dtype may change on resume
        return {k: v for k, v in d.items() if k not in ("iterations", "eval", "name", "device", "dtype", "device_map", "report_to")}

    its_old, its_new = old.get("iterations", []), new.get("iterations", [])
    return strip(old) == strip(new) and its_new[: len(its_old)] == its_old


def add_cost(out: Path, key: str, seconds: float) -> None:
    """Add ``seconds`` of wall time to ``out/costs.json[key]`` (accumulates over resumed calls)."""
    path = out / "costs.json"
    costs = json.loads(path.read_text()) if path.exists() else {}
    costs[key] = round(costs.get(key, 0.0) + seconds, 1)
    path.write_text(json.dumps(costs, indent=2, sort_keys=True) + "\n")


@contextmanager
def costing(out: Path, key: str):
    """Time the block and :func:`add_cost` its wall seconds to ``out/costs.json[key]``, also when it fails or is interrupted."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add_cost(out, key, time.perf_counter() - t0)


def eval_config(recipe: Recipe):
    """The recipe's ``eval`` settings as the MAVIS decode's :class:`SamplingConfig` (iteration reports, the demo)."""
    from ..generation import SamplingConfig

    e = recipe.eval
    return SamplingConfig(max_new_tokens=int(e.get("max_new_tokens", 48)), top_k=int(e.get("top_k", DEFAULT_TOP_K)),
                          temperature=float(e.get("temperature", 1.0)), beta=float(e.get("beta", 2.0)), normalize=bool(e.get("normalize", True)),
                          max_step_kl=float(e.get("max_step_kl", 0.0)), tail=str(e.get("tail", "drop")))


def collect_trees(recipe: Recipe, path: Path, prompts: list, *, limit: int, values: list[str], weights, beta: float, rewards: list[str],
                  seed: int, cost_root: Path, progress: bool) -> None:
    """Collect (or resume) the recipe's trees for ``prompts`` (the first ``limit`` train prompts) into ``path``: from pi_ref without
    ``values``, else from MAVIS(values, weights, beta) at the recipe's evaluation top-k; the wall
    time is added to ``cost_root/costs.json`` as ``collect:<path relative to cost_root>``. Skips a
    finished file."""
    if path.exists():
        return
    tc = TreeConfig(**{**recipe.tree, **({"beta": beta, "top_k": int(recipe.eval.get("top_k", DEFAULT_TOP_K))} if values else {})})
    spec = CollectSpec(model=recipe.model, values=values, weights=weights, rewards=rewards, dataset=recipe.dataset, split="train",
                       limit=limit, data_seed=recipe.data_seed, prompt_field=recipe.prompt_field, chat=recipe.chat, tree=tc, seed=seed,
                       group_size=recipe.group_size, val_fraction=recipe.val_fraction, **placement_names())
    with costing(cost_root, f"collect:{path.relative_to(cost_root)}"):
        collect(spec, path, prompts, resume=True, backend=recipe.backend, workers=recipe.workers, progress=progress)


def run_iterations(recipe: Recipe, out: str | Path, *, progress: bool = True, stop_after_stage: int | None = None) -> dict:
    """Run (or resume) every stage of ``recipe`` into ``out``; returns the summary.

    Every model loads on the recipe's ``device`` in its ``dtype`` (:mod:`mavis_align.placement`).

    Args:
        stop_after_stage: return after this many stages did work in this call (tests / time boxes).
    """
    from ..placement import using

    with using(recipe.device, recipe.dtype, recipe.device_map):  # None: the caller's placement
        return _run_iterations(recipe, out, progress=progress, stop_after_stage=stop_after_stage)


def placement_names() -> dict[str, str]:
    """The current placement as CollectSpec fields (collection workers may be other processes)."""
    from ..placement import current, name_of

    place = current()
    return {"device": str(place.device), "dtype": name_of(place.dtype)}


def _run_iterations(recipe: Recipe, out: str | Path, *, progress: bool, stop_after_stage: int | None) -> dict:
    from ..decoding.decoder import MavisDecoder
    from ..evaluate import DecoderPolicy, evaluate_policy
    from ..models import load_causal_lm
    from ..provenance import write_run_record
    from ..rewards import get_rewards
    from ..values import ValueModel, build_value_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_json = json.dumps(recipe.to_dict(), sort_keys=True, default=str)
    saved = out / "recipe.json"
    if saved.exists():
        new = json.loads(recipe_json)
        # keys added to Recipe after a run was written take their defaults
        old = {**json.loads(json.dumps(Recipe().to_dict(), default=str)), **json.loads(saved.read_text())}
        if not extends_recipe(old, new):
            raise ValueError(f"{out} holds a run of a different recipe (recipe.json); use another --out (only appending iterations is allowed)")
        if old.get("eval") != new.get("eval"):
            for f in (out / "eval").glob("*.json") if (out / "eval").exists() else []:
                f.unlink()  # evaluation settings changed: evaluate again
    saved.write_text(recipe_json + "\n")
    write_run_record(out, recipe.to_dict(), recipe.seed)
    train_prompts = recipe_prompts(recipe, "train", recipe.train_prompts)
    eval_prompts = recipe_prompts(recipe, "val", recipe.eval_prompts)
    worked = 0

    def stage_done() -> bool:
        nonlocal worked
        worked += 1
        return stop_after_stage is not None and worked >= stop_after_stage

    def collect_into(path: Path, values: list[str], weights, beta: float, rewards: list[str], seed: int) -> None:
        collect_trees(recipe, path, train_prompts, limit=recipe.train_prompts, values=values, weights=weights, beta=beta, rewards=rewards, seed=seed, cost_root=out,
                      progress=progress)

    def train_into(folder: Path, trees: Path, objective: str, init: Path | None, round_: IterationSpec | None, seed: int) -> None:
        if (folder / "result.json").exists():
            return
        overrides = dict(recipe.train)
        if round_ is not None:
            overrides.update(round_.train)
            overrides["zeta"] = round_.zeta
            overrides.setdefault("warmup_steps", 0)
        cfg = TrainConfig(**{**overrides, "seed": seed, "objectives": [objective]})
        vm = ValueModel.load(init) if init is not None else build_value_model([objective], **value_model_options(recipe), seed=seed)
        from ..tracking import make_tracker

        tracker = make_tracker(recipe.report_to, project=f"mavis-align-{recipe.name}", run=str(folder.relative_to(out)),
                               config={"recipe": recipe.name, **asdict(cfg)}, out=folder)
        with costing(out, f"train:{folder.relative_to(out)}"):
            try:
                train_value_model(vm, [trees], folder, cfg, resume=(folder / "checkpoint").exists(), progress=progress, tracker=tracker)
            finally:
                tracker.finish()

    summary: dict = {"recipe": recipe.name, "iterations": []}
    (out / "eval").mkdir(exist_ok=True)
    rewards = get_rewards(list(recipe.objectives))
    cfg = eval_config(recipe)
    samples = int(recipe.eval.get("samples", 1))
    loaded: dict = {}

    def base():
        if "model" not in loaded:
            loaded["model"], loaded["tok"] = load_causal_lm(recipe.model)
        return loaded["model"], loaded["tok"]

    def evaluate_iteration(i: int, objs: list[str]) -> None:
        """Reward and KL of MAVIS with each V_m^i (lambda = {m: 1}) next to pi_ref; written per objective."""
        ref_path = out / "eval" / "ref.json"
        if not ref_path.exists():
            from ..generation import SamplingConfig

            m_, t_ = base()
            plain = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
            res = evaluate_policy(DecoderPolicy("ref", MavisDecoder(m_, t_), plain, chat=recipe.chat, batch_size=EVAL_BATCH), eval_prompts, rewards, m_, t_,
                                  samples=samples, seed=recipe.seed, chat=recipe.chat)
            ref_path.write_text(json.dumps(res, indent=2) + "\n")
        ref = json.loads(ref_path.read_text())
        row = {"iteration": i, "objectives": {}}
        for m in objs:
            vpath = out / f"iter{i}" / m / "value"
            epath = out / "eval" / f"iter{i}-{m}.json"
            if not epath.exists():
                m_, t_ = base()
                dec = MavisDecoder(m_, t_, [ValueModel.load(vpath / "best")])
                res = evaluate_policy(DecoderPolicy(f"mavis-{m}", dec, cfg, weights={m: 1.0}, chat=recipe.chat, batch_size=EVAL_BATCH), eval_prompts, rewards, m_, t_,
                                      samples=samples, seed=recipe.seed, chat=recipe.chat)
                epath.write_text(json.dumps(res, indent=2) + "\n")
            res = json.loads(epath.read_text())
            tr = json.loads((vpath / "result.json").read_text())
            q = ((tr.get("quality") or {}).get("per_objective") or {}).get(m, {})
            qr = ((tr.get("quality_reward") or {}).get("per_objective") or {}).get(m, {})  # with zeta > 0: against the rewards alone
            row["objectives"][m] = {
                "val_mse": tr.get("best_val_mse"), "train_seconds": tr.get("seconds_this_run"),
                "r2": q.get("r2"), "concordance": q.get("concordance"), "concordance_se": q.get("concordance_se"), "pairs": q.get("pairs"),
                "reward_concordance": qr.get("concordance"), "reward_concordance_se": qr.get("concordance_se"), "reward_pairs": qr.get("pairs"),
                "reward": res["rewards"][m]["mean"], "reward_se": res["rewards"][m]["se"], "kl": res["kl"]["mean"],
                "ref_reward": ref["rewards"][m]["mean"], "ref_kl": ref["kl"]["mean"], "beta": cfg.beta,
            }
            bench = Path(recipe.candidates) / "bench.json" if recipe.candidates else None
            if bench is not None and m in json.loads(bench.read_text())["objectives"]:  # the candidate-level benchmark (evaluate.candidates)
                from ..evaluate.candidates import score_benchmark

                cm = score_benchmark(recipe.candidates, str(vpath / "best"), write=False, partial=True)["metrics"].get(m)
                if cm is not None:
                    row["objectives"][m]["candidates"] = {k: cm[k] for k in ("resolved", "all_pairs", "value_vs_half", "half_vs_half")}
        summary["iterations"].append(row)
        write_summary()

    def write_summary() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = ["| iteration | objective | val MSE | held-out R² | sibling concordance (pairs) | concordance, rewards alone (pairs) | reward (MAVIS) "
                 "| reward (π_ref) | KL (MAVIS) | candidates: V on resolved pairs / V vs half / half vs half |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for row in summary["iterations"]:
            for m, r in row["objectives"].items():
                mse = f"{r['val_mse']:.4f}" if r["val_mse"] is not None else "-"
                conc = format_concordance(r) + (f" ({r['pairs']})" if r.get("concordance") is not None else "")
                r2 = format_r2(r)
                rc = r.get("reward_concordance")
                conc_r = "-" if rc is None else f"{rc:.3f} ± {r.get('reward_concordance_se') or 0:.3f} ({r.get('reward_pairs')})"
                c = r.get("candidates")
                cand = "-" if not c else " / ".join("-" if not c[k]["pairs"] else f"{c[k]['concordance']:.3f}" for k in ("resolved", "value_vs_half", "half_vs_half"))
                lines.append(f"| {row['iteration']} | {m} | {mse} | {r2} | {conc} | {conc_r} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['ref_reward']:.3f} "
                             f"| {r['kl']:.2f} | {cand} |")
        (out / "summary.md").write_text("\n".join(lines) + "\n")

    # ---- iteration 0
    trees0 = out / "iter0" / "trees.h5"
    if not trees0.exists():
        collect_into(trees0, [], None, 0.0, list(recipe.objectives), recipe.seed)
        if stage_done():
            return summary
    for m in recipe.objectives:
        folder = out / "iter0" / m / "value"
        if not (folder / "result.json").exists():
            train_into(folder, trees0, m, None, None, recipe.seed)
            if stage_done():
                return summary
    evaluate_iteration(0, list(recipe.objectives))
    # ---- iterations i >= 1
    for i, rnd in enumerate(recipe.rounds, start=1):
        objs = list(rnd.objectives or recipe.objectives)
        for m in objs:
            prev = out / f"iter{i - 1}" / m / "value" / "best"
            if not prev.exists():
                raise ValueError(f"iteration {i} of {m!r} needs {prev}, which iteration {i - 1} did not produce")
            trees = out / f"iter{i}" / m / "trees.h5"
            if not trees.exists():
                collect_into(trees, [f"{m}={prev}"], {m: 1.0}, rnd.beta, [m], recipe.seed + 1000 * i)
                if stage_done():
                    return summary
            folder = out / f"iter{i}" / m / "value"
            if not (folder / "result.json").exists():
                train_into(folder, trees, m, prev, rnd, recipe.seed + i)
                if stage_done():
                    return summary
        evaluate_iteration(i, objs)
    return summary
