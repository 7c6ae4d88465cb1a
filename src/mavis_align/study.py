"""The reproduction study (issue 7): every claim of the paper re-measured from one recipe.

``mavis-align reproduce --recipe R --out D`` runs these stages into ``D``; each writes its results
whole, a rerun skips what is finished, and the long stages resume from their own checkpoints::

    mavis/                 value models: iteration 0 + policy-iteration rounds (train.iterate)
    baselines/rl-<m>/      RL fine-tuned policy per objective (LoRA + KL-penalised GRPO)
    baselines/rl-morlhf-<lambda_1>/  MORLHF policies on the `pair` objectives
    conditioned/           paper v3's preference-conditioned comparisons on the `pair` (when the recipe
                           has a `conditioned:` section): one value model V(s, λ) by soft policy
                           iteration (iter0 on the shared pi_ref trees, then rounds on MAVIS trees
                           collected at a grid of λ), and one prompt-conditioned policy (moodpo/)
    neighbours/            the neighbouring systems on the `pair` (when the recipe has a `neighbours:`
                           section): a MAHALO-style multi-head policy (mahalo/, DPO per head) and an
                           MVA-style adapter decorrelated from rl-<pair[0]> (mva-<pair[1]>/); in the sweep
                           with step-level value guidance (mavis-step, mahalo-step)
    single/points/*.json   claims 1-2: pi_ref, RL_m and MAVIS(V_m^i, beta) for every beta of the grid
    sweep/                 claims 3-4: Pareto sweep over lambda (mavis, beam, rsoup, mod, morlhf, best-of-N)
    distill/               claim 5: the final value models distilled into one multi-head model, compared
    stages.json            wall seconds of every stage (accumulated over resumed calls)
    REPORT.md + figures    verdict per claim (mavis_align.report)

Every policy goes through the one evaluator (:func:`mavis_align.evaluate.evaluate_policy`) on the
same held-out prompts (``evaluation``), so rewards and KL (eq. 7) are comparable across stages.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .generation import DEFAULT_TOP_K
from .provenance import write_json
from .schema import Shape, check, read_yaml_mapping, shape_of
from .study_layout import final_value_dir, load_points, point_name
from .train.iterate import Recipe, costing, extends_recipe, recipe_prompts

STAGES = ("mavis", "baselines", "conditioned", "neighbours", "single", "sweep", "distill", "report")


@dataclass
class StudySpec:
    """One reproduction study (see ``recipes/reproduce-default.yaml`` for every key, commented)."""

    name: str = "study"
    mavis: dict = field(default_factory=dict)  # a train.iterate Recipe
    baselines: dict = field(default_factory=lambda: {"prompts": 160, "rl": {}, "morlhf": ["0.5"]})
    pair: list[str] = field(default_factory=lambda: ["helpful", "harmless"])
    evaluation: dict = field(default_factory=dict)
    single: dict = field(default_factory=lambda: {"betas": [1.0, 2.0, 5.0]})
    sweep: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    conditioned: dict = field(default_factory=dict)  # empty: no preference-conditioned comparisons
    neighbours: dict = field(default_factory=dict)  # empty: no MAHALO / MVA / step-level comparisons

    def __post_init__(self) -> None:
        from .baselines import RLConfig
        from .evaluate.pareto import SINGLE_METHODS, SWEEP_METHODS

        check(self.to_dict(), study_shape())  # keys and types, with the key path in the error
        self.recipe = Recipe(**self.mavis)
        self.rl_config = RLConfig(**self.baselines.get("rl", {}))
        if len(self.pair) != 2 or any(o not in self.recipe.objectives for o in self.pair):
            raise ValueError(f"`pair` must name two of the objectives {self.recipe.objectives}, got {self.pair}")
        betas = self.single.get("betas") or []
        if not betas or any(float(b) < 0 for b in betas):
            raise ValueError(f"single.betas must be a non-empty list of numbers >= 0, got {betas}")
        beta = self.sweep.get("beta", "matched")
        if beta != "matched" and not isinstance(beta, (int, float)):
            raise ValueError(f"sweep.beta must be a number or 'matched', got {beta!r}")
        bad = [m for m in self.sweep.get("methods", []) if m not in SWEEP_METHODS | SINGLE_METHODS]
        if bad:
            raise ValueError(f"sweep.methods: unknown {bad}; known {sorted(SWEEP_METHODS | SINGLE_METHODS)}")
        for lam in self.baselines.get("morlhf", []):
            if not 0.0 <= float(lam) <= 1.0:
                raise ValueError(f"baselines.morlhf entries are lambda_1 in [0, 1], got {lam!r}")

    # ---- resolved settings
    @property
    def eval_split(self) -> str:
        return str(self.evaluation.get("split", "test"))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def study_shape() -> Shape:
    """The schema of a study recipe: :class:`StudySpec`'s fields with their nested settings."""
    from .baselines import MultiHeadConfig, RLConfig
    from .train.iterate import recipe_shape

    return shape_of(
        StudySpec, mavis=recipe_shape(),
        baselines=Shape({"prompts": int, "rl": shape_of(RLConfig), "morlhf": list[str | float]}, "baselines"),
        evaluation=Shape({"split": str, "prompts": int, "samples": int, "max_new_tokens": int, "top_k": int, "seed": int, "dataset": str,
                          "normalize": bool, "independent": bool}, "evaluation"),
        single=Shape({"betas": list[float]}, "single"),
        sweep=Shape({"grid_step": float, "beta": float | str, "extra_betas": list[float], "n": int, "methods": list[str], "betas": dict,
                     "judge": str, "judge_against": str, "criteria": list[str]}, "sweep"),
        distill=Shape({"backbone": str, "epochs": float, "beta": float, "lr": float, "batch_size": int, "method": str}, "distill"),
        conditioned=Shape({"head_hidden": int, "lr": float, "epochs": float, "round_epochs": float, "grid": list[float],
                           "prompts_per_weighting": int, "rounds": int, "policy_grid_step": float, "policy": bool}, "conditioned"),
        neighbours=Shape({"multihead": shape_of(MultiHeadConfig), "multihead_prompts": int, "mi_weight": float, "extrapolate": float,
                          "step_chunk": int, "step_candidates": int, "step_select": str}, "neighbours"),
    )


def load_study(path_or_name: str | Path) -> StudySpec:
    """A study recipe from a YAML path or a packaged name (``reproduce-default``, ``reproduce-paper``)."""
    from importlib import resources

    path = Path(path_or_name)
    if not path.is_file():
        packaged = Path(str(resources.files("mavis_align") / "recipes" / f"{path_or_name}.yaml"))
        if not packaged.is_file():
            raise FileNotFoundError(f"study recipe {path_or_name!r} is neither a file nor a packaged recipe")
        path = packaged
    raw = read_yaml_mapping(path, "study recipe")
    try:
        check(raw, study_shape())
        return StudySpec(**raw)
    except ValueError as err:
        raise ValueError(f"study recipe {path}: {err}") from None


def check_study(spec: StudySpec) -> list[str]:
    """What can be checked without running: every model, reward and data set resolves by name.

    Returns a list of lines (one per check). Hub names are reported as such, not downloaded.
    """
    from .data import DATASETS
    from .models import EMBEDDED_MODELS, resolve_model
    from .rewards import REWARDS

    r = spec.recipe
    lines = []
    for what, name in (("base model", r.model), ("value backbone", r.backbone)):
        if name in ("tiny", "tiny-256") or name.startswith("truncate:"):
            lines.append(f"{what}: {name} (built from the base model)")
            continue
        resolved = resolve_model(name)
        where = "embedded" if name in EMBEDDED_MODELS else ("local" if Path(resolved.source).exists() else "hub id (needs a hub or HF cache)")
        lines.append(f"{what}: {name} -> {where}")
    for m in r.objectives:
        if m.startswith("hf:"):
            lines.append(f"reward {m}: hub classifier spec")
        elif m not in REWARDS:
            raise ValueError(f"objective {m!r} is not a registered reward ({', '.join(REWARDS)}) nor an hf: spec")
        else:
            e = REWARDS[m]
            lines.append(f"reward {m}: {e.description} ({'offline' if e.offline else 'needs a hub or HF cache'})")
    ds = r.dataset
    if ds in DATASETS:
        lines.append(f"dataset {ds}: {DATASETS[ds].description}")
    elif ds.startswith("hf:") or Path(ds).suffix in (".jsonl", ".csv"):
        lines.append(f"dataset {ds}: field {r.prompt_field!r}")
    else:
        raise ValueError(f"dataset {ds!r} is not registered ({', '.join(DATASETS)}), a hub data set or a file")
    lines.append(f"RL baselines: {spec.rl_config}")
    lines.append(f"stages: {', '.join(STAGES)}")
    return lines


# ------------------------------------------------------------------------------------ helpers


def matched_beta(single_points: dict[str, dict], objectives: list[str], iteration_of: dict[str, int], betas: list[float]) -> float:
    """The beta of the grid whose MAVIS KL (mean over ``objectives``, final iterations) is closest to
    the mean KL of the objectives' RL policies -- the paper's 'similar KL' protocol.

    ``single_points`` maps point names (``rl-<m>``, ``iter<i>-<m>-beta<b>``) to evaluator results.
    """
    rl_kl = sum(single_points[f"rl-{m}"]["kl"]["mean"] for m in objectives) / len(objectives)

    def gap(b: float) -> float:
        kl = sum(single_points[point_name(iteration_of[m], m, b)]["kl"]["mean"] for m in objectives) / len(objectives)
        return abs(kl - rl_kl)

    steering = [float(b) for b in betas if float(b) > 0]  # beta 0 is top-k sampling of pi_ref: no steering
    if not steering:
        raise ValueError("matching the RL policies' KL needs a beta > 0 in single.betas")
    return min(steering, key=gap)


# ------------------------------------------------------------------------------------ stages


def run_study(spec: StudySpec, out: str | Path, *, stages: list[str] | None = None, progress: bool = True, report: str | Path | None = None) -> Path:
    """Run (or resume) the study into ``out``; returns the path of the written report. Every model
    loads on the recipe's (``mavis.device``/``dtype``/``device_map``) placement, else the caller's."""
    from .placement import using

    r = spec.recipe
    with using(r.device, r.dtype, r.device_map):
        return _run_study(spec, out, stages=stages, progress=progress, report=report)


def _run_study(spec: StudySpec, out: str | Path, *, stages: list[str] | None, progress: bool, report: str | Path | None) -> Path:
    from .provenance import write_run_record

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "study.json"
    spec_json = json.loads(json.dumps(spec.to_dict(), default=str))
    if saved.exists() and json.loads(saved.read_text()) != spec_json:
        old = json.loads(saved.read_text())
        changed = sorted(k for k in spec_json if old.get(k) != spec_json[k])
        if "mavis" in changed and extends_recipe(old.get("mavis", {}), spec_json["mavis"]):
            changed.remove("mavis")  # more policy-iteration rounds: run_iterations extends the run
        if any(k in ("mavis", "baselines", "pair") for k in changed):
            raise ValueError(f"{out} holds a study of another recipe (changed: {changed}); use another --out")
        # other evaluation settings: the points measured under the old ones are stale. (New betas
        # only add points; the sweep and distillation stages compare their own settings.)
        if "evaluation" in changed:
            for f in [*(out / "single" / "points").glob("*.json"), *(out / "distill" / "eval").glob("*.json")]:
                f.unlink()
    write_json(saved, spec_json)
    write_run_record(out, spec_json, spec.recipe.seed)
    todo = list(stages or STAGES)
    unknown = [s for s in todo if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {list(STAGES)}")
    runners = {"mavis": _stage_mavis, "baselines": _stage_baselines, "conditioned": _stage_conditioned, "neighbours": _stage_neighbours,
               "single": _stage_single, "sweep": _stage_sweep, "distill": _stage_distill}
    for stage in STAGES:
        if stage not in todo:
            continue
        if stage == "report":
            from .report import write_report

            command = f"mavis-align reproduce --recipe {spec.name} --out {out}" + (f" --report {report}" if report is not None else "")
            return write_report(out, spec, copy_to=report, command=command)
        if progress:
            print(f"[reproduce] stage {stage}", flush=True)
        with costing(out, stage):
            runners[stage](spec, out, progress)
    return out / "REPORT.md"


def _stage_mavis(spec: StudySpec, out: Path, progress: bool) -> None:
    from .train import run_iterations

    run_iterations(spec.recipe, out / "mavis", progress=progress)


def _stage_baselines(spec: StudySpec, out: Path, progress: bool) -> None:
    from .baselines import train_rl_policy

    r = spec.recipe
    prompts = recipe_prompts(r, "train", int(spec.baselines.get("prompts", 160)))
    jobs = [(f"rl-{m}", {m: 1.0}) for m in r.objectives]
    a, b = spec.pair
    jobs += [(f"rl-morlhf-{float(lam):g}", {a: float(lam), b: round(1 - float(lam), 6)}) for lam in spec.baselines.get("morlhf", [])]
    for name, weights in jobs:
        if progress:
            print(f"[reproduce] RL policy {name} {weights}", flush=True)
        train_rl_policy(r.model, prompts, weights, out / "baselines" / name, spec.rl_config, chat=r.chat, progress=progress)


def conditioned_value_dir(out: Path) -> Path | None:
    """The last finished preference-conditioned value model of a study (None: none yet)."""
    i, best = 0, None
    while (out / "conditioned" / f"iter{i}" / "value" / "best" / "meta.json").exists():
        best = out / "conditioned" / f"iter{i}" / "value" / "best"
        i += 1
    return best


def _stage_conditioned(spec: StudySpec, out: Path, progress: bool) -> None:
    """One preference-conditioned value model over the `pair`, trained like the per-objective ones
    (same iteration-0 trees, same rounds' beta and zeta, same tree shape and prompt budget per round)
    but at λ: iteration 0 at λ drawn from the simplex, round i on MAVIS(V^{i-1}(·, λ_j), λ_j) trees
    for each λ_j of ``grid`` (λ_1 values); and one preference-conditioned policy (GRPO, the RL
    baselines' settings and prompts)."""
    from .baselines import train_conditioned_policy
    from .train import TrainConfig, train_value_model
    from .train.iterate import collect_trees, value_model_options
    from .values import ValueModel, build_value_model

    c = spec.conditioned
    if not c:
        return
    r = spec.recipe
    a, b = spec.pair
    folder = out / "conditioned"
    folder.mkdir(parents=True, exist_ok=True)
    base_cfg = {"solver": "sgd", "keep_leaf_fraction": float(r.train.get("keep_leaf_fraction", 0.5)), "lr": float(c.get("lr", 1e-3)),
                "batch_size": 64, "eval_every": 0, "seed": r.seed}

    def train(dest: Path, trees: list[Path], init: Path | None, epochs: float, zeta: float) -> None:
        if (dest / "result.json").exists():
            return
        if init is None:
            opts = {**value_model_options(r), "head_hidden": int(c.get("head_hidden", 64))}
            vm = build_value_model([a, b], **opts, conditioned=True, seed=r.seed + 23)
        else:
            vm = ValueModel.load(init)
        cfg = TrainConfig(**{**base_cfg, "epochs": epochs, "zeta": zeta, "warmup_steps": 0 if init else 20})
        with costing(folder, f"train:{dest.relative_to(folder)}"):
            train_value_model(vm, trees, dest, cfg, resume=(dest / "checkpoint").exists(), progress=progress)

    train(folder / "iter0" / "value", [out / "mavis" / "iter0" / "trees.h5"], None, float(c.get("epochs", 20.0)), 0.0)
    grid = [float(x) for x in c.get("grid", [1.0, 0.5, 0.0])]
    n_prompts = int(c.get("prompts_per_weighting", max(1, r.train_prompts * 2 // len(grid))))
    prompts = recipe_prompts(r, "train", n_prompts)
    for i, round_ in enumerate(r.rounds[: int(c.get("rounds", len(r.rounds)))], start=1):
        prev = folder / f"iter{i - 1}" / "value" / "best"
        files = []
        for j, lam in enumerate(grid):
            path = folder / f"iter{i}" / f"trees-{lam:g}.h5"
            files.append(path)
            collect_trees(r, path, prompts, limit=n_prompts, values=[str(prev)], weights={a: lam, b: round(1 - lam, 6)}, beta=float(round_.beta),
                          rewards=[a, b], seed=r.seed + 1000 * i + j, cost_root=folder, progress=progress)
        train(folder / f"iter{i}" / "value", files, prev, float(c.get("round_epochs", 10.0)), float(round_.zeta))
    if c.get("policy", True):
        if progress:
            print(f"[reproduce] preference-conditioned policy over {spec.pair}", flush=True)
        train_conditioned_policy(r.model, recipe_prompts(r, "train", int(spec.baselines.get("prompts", 160))), [a, b], folder / "moodpo",
                                 spec.rl_config, grid_step=float(c.get("policy_grid_step", 0.2)), chat=r.chat, progress=progress)


def _stage_neighbours(spec: StudySpec, out: Path, progress: bool) -> None:
    """The neighbouring systems on the `pair` (a, b): an MVA-style adapter for b trained with the
    dependence penalty against the RL baseline rl-a (the first adapter of the sequence), with the RL
    baselines' settings and prompts; and a MAHALO-style multi-head policy (DPO per head on pairs of
    pi_ref samples of ``multihead_prompts`` train prompts)."""
    from .baselines import MultiHeadConfig, train_decorrelated_adapter, train_multihead_policy

    n = spec.neighbours
    if not n:
        return
    r = spec.recipe
    a, b = spec.pair
    folder = out / "neighbours"
    folder.mkdir(parents=True, exist_ok=True)
    first = out / "baselines" / f"rl-{a}"
    if not (first / "mavis_policy.json").exists():
        raise FileNotFoundError(f"{first} is missing: run the `baselines` stage first (the MVA sequence starts from it)")
    if progress:
        print(f"[reproduce] MVA-style adapter for {b}, decorrelated from rl-{a}", flush=True)
    with costing(folder, f"mva-{b}"):
        train_decorrelated_adapter(r.model, recipe_prompts(r, "train", int(spec.baselines.get("prompts", 160))), {b: 1.0}, folder / f"mva-{b}",
                                   spec.rl_config, against=[first], mi_weight=float(n.get("mi_weight", 1.0)), chat=r.chat, progress=progress)
    if progress:
        print(f"[reproduce] MAHALO-style multi-head policy over {spec.pair}", flush=True)
    with costing(folder, "mahalo"):
        train_multihead_policy(r.model, recipe_prompts(r, "train", int(n.get("multihead_prompts", 64))), [a, b], folder / "mahalo",
                               MultiHeadConfig(**n.get("multihead", {})), chat=r.chat, progress=progress)


class _Evaluation:
    """Base model, prompts and rewards loaded once; evaluates and stores named points."""

    def __init__(self, spec: StudySpec):
        from .data import load_prompts
        from .generation import SamplingConfig
        from .models import load_causal_lm
        from .rewards import get_rewards

        r, e = spec.recipe, spec.evaluation
        self.spec = spec
        self.model, self.tok = load_causal_lm(r.model)
        self.prompts = [p.text for p in load_prompts(e.get("dataset", r.dataset), spec.eval_split, seed=r.data_seed, tokenizer=self.tok,
                                                     limit=int(e.get("prompts", 16)), field=r.prompt_field)]
        if not self.prompts:
            raise ValueError(f"no {spec.eval_split} prompts in {r.dataset!r}")
        from .rewards.independent import with_independent

        # the labellers and, unless `evaluation: {independent: false}`, their independent scorers (never used to select)
        self.rewards = get_rewards(with_independent(r.objectives) if e.get("independent", True) else list(r.objectives))
        self.samples, self.seed = int(e.get("samples", 2)), int(e.get("seed", 0))
        self.max_new_tokens, self.top_k = int(e.get("max_new_tokens", 40)), int(e.get("top_k", DEFAULT_TOP_K))
        self.plain = SamplingConfig(max_new_tokens=self.max_new_tokens)

    def tilted(self, beta: float, **kw):
        from .generation import SamplingConfig

        return SamplingConfig(max_new_tokens=self.max_new_tokens, top_k=self.top_k, beta=float(beta),
                              normalize=bool(self.spec.evaluation.get("normalize", True)), **kw)

    def point(self, path: Path, make) -> dict:
        from .evaluate import evaluate_policy

        if not path.exists():
            res = evaluate_policy(make(), self.prompts, self.rewards, self.model, self.tok, samples=self.samples, seed=self.seed,
                                  chat=self.spec.recipe.chat)
            write_json(path, res)
        return json.loads(path.read_text())


def _stage_single(spec: StudySpec, out: Path, progress: bool) -> None:
    from .baselines import load_policy_model
    from .decoding.decoder import MavisDecoder
    from .evaluate import DecoderPolicy, ModelPolicy
    from .models import load_causal_lm
    from .values import ValueModel

    ev = _Evaluation(spec)
    folder = out / "single" / "points"
    folder.mkdir(parents=True, exist_ok=True)
    r = spec.recipe
    jobs = [("ref", lambda: DecoderPolicy("ref", MavisDecoder(ev.model, ev.tok), ev.plain, chat=r.chat))]
    for m in r.objectives:
        def rl(m=m):
            # a fresh base copy: merging the adapter changes the base weights in place
            model, _ = load_policy_model(out / "baselines" / f"rl-{m}", base_model=load_causal_lm(r.model))
            return ModelPolicy(f"rl-{m}", model, ev.tok, ev.plain, chat=r.chat)

        jobs.append((f"rl-{m}", rl))
        last, _ = final_value_dir(out / "mavis", m)
        for i in range(last + 1):
            vdir = out / "mavis" / f"iter{i}" / m / "value" / "best"
            for beta in spec.single["betas"]:
                def mav(vdir=vdir, m=m, beta=beta, i=i):
                    dec = MavisDecoder(ev.model, ev.tok, [ValueModel.load(vdir)])
                    return DecoderPolicy(f"mavis-iter{i}", dec, ev.tilted(beta), weights={m: 1.0}, chat=r.chat)

                jobs.append((point_name(i, m, beta), mav))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="single-objective", unit="point")
    for name, make in jobs:
        ev.point(folder / f"{name}.json", make)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def sweep_beta(spec: StudySpec, out: Path) -> float:
    """The sweep's MAVIS beta: the recipe's number, or the KL-matched one (:func:`matched_beta`)."""
    beta = spec.sweep.get("beta", "matched")
    if beta != "matched":
        return float(beta)
    points = load_points(out / "single" / "points")
    iteration_of = {m: final_value_dir(out / "mavis", m)[0] for m in spec.pair}
    return matched_beta(points, list(spec.pair), iteration_of, list(spec.single["betas"]))


def _stage_sweep(spec: StudySpec, out: Path, progress: bool) -> None:
    from .evaluate import SweepSpec

    r, e, s = spec.recipe, spec.evaluation, spec.sweep
    base = out / "baselines"
    sweep = SweepSpec(
        model=r.model, objectives=list(spec.pair),
        values={m: str(final_value_dir(out / "mavis", m)[1]) for m in spec.pair},
        policies={m: str(base / f"rl-{m}") for m in spec.pair},
        morlhf={f"{float(lam):g}": str(base / f"rl-morlhf-{float(lam):g}") for lam in spec.baselines.get("morlhf", [])},
        methods=list(s.get("methods", ["ref", "mavis", "rsoup", "mod", "morlhf"])), grid_step=float(s.get("grid_step", 0.5)),
        beta=sweep_beta(spec, out), betas=dict(s.get("betas", {})), n=int(s.get("n", 5)), dataset=e.get("dataset", r.dataset), split=spec.eval_split,
        prompts=int(e.get("prompts", 16)), samples=int(e.get("samples", 2)), max_new_tokens=int(e.get("max_new_tokens", 40)),
        top_k=int(e.get("top_k", DEFAULT_TOP_K)), seed=int(e.get("seed", 0)), chat=r.chat, normalize=bool(e.get("normalize", True)), independent=bool(e.get("independent", True)),
        judge=str(s.get("judge", "")), judge_against=str(s.get("judge_against", "ref")),
        criteria=list(s.get("criteria", ["helpful", "harmless", "balanced"])),
    )
    if spec.conditioned:  # paper v3's comparisons: one conditioned value model, one conditioned policy
        cond = conditioned_value_dir(out)
        if cond is None:
            raise FileNotFoundError(f"no preference-conditioned value model under {out / 'conditioned'}: run the `conditioned` stage first")
        sweep.conditioned = str(cond)
        sweep.methods += [m for m in ("mavis-conditioned",) if m not in sweep.methods]
        if spec.conditioned.get("policy", True):
            sweep.moodpo = str(out / "conditioned" / "moodpo")
            sweep.methods += [m for m in ("moodpo",) if m not in sweep.methods]
    if spec.neighbours:  # the neighbouring systems: MAHALO-style heads (+ step-level guidance), MVA-style adapters
        n = spec.neighbours
        a, b = spec.pair
        sweep.mahalo = str(out / "neighbours" / "mahalo")
        sweep.mva = {a: str(base / f"rl-{a}"), b: str(out / "neighbours" / f"mva-{b}")}
        sweep.extrapolate = float(n.get("extrapolate", 0.2))
        sweep.step_chunk, sweep.step_candidates = int(n.get("step_chunk", 10)), int(n.get("step_candidates", 4))
        sweep.step_select = str(n.get("step_select", "best"))
        sweep.methods += [m for m in ("mavis-step", "mahalo", "mahalo-step", "mva") if m not in sweep.methods]
        sweep.__post_init__()
    _sweep_into(out / "sweep", sweep, progress)
    for beta in s.get("extra_betas", []):
        # the same sweep with another MAVIS beta: only the MAVIS points differ, the others are copied
        extra = SweepSpec(**{**sweep.__dict__, "beta": float(beta)})
        _sweep_into(out / f"sweep-beta{float(beta):g}", extra, progress, reuse=out / "sweep")


def _sweep_into(folder: Path, sweep, progress: bool, reuse: Path | None = None) -> None:
    """Run ``sweep`` into ``folder``; with ``reuse``, the baselines' points of that folder (a sweep
    that differs only in MAVIS's settings) are copied instead of recomputed."""
    import shutil

    from .evaluate.pareto import MAVIS_ONLY_FIELDS, drop_stale_points, point_method, run_sweep, stale_methods

    drop_stale_points(folder, sweep)
    if reuse is not None and (reuse / "sweep.json").exists():
        old, new = json.loads((reuse / "sweep.json").read_text()), json.loads((folder / "sweep.json").read_text())

        def common(d: dict) -> dict:
            return {k: v for k, v in d.items() if k not in MAVIS_ONLY_FIELDS}

        if common(old) == common(new):
            # every point the differing MAVIS settings do not concern is the same measurement
            stale = stale_methods({k for k in MAVIS_ONLY_FIELDS if old.get(k) != new.get(k)}, sweep)
            (folder / "points").mkdir(exist_ok=True)
            for f in (reuse / "points").glob("*.json"):
                if stale is not None and point_method(f) not in stale and not (folder / "points" / f.name).exists():
                    shutil.copy(f, folder / "points" / f.name)
    run_sweep(sweep, folder, progress=progress)


def _stage_distill(spec: StudySpec, out: Path, progress: bool) -> None:
    from .decoding.decoder import MavisDecoder
    from .evaluate import DecoderPolicy
    from .train import DistillConfig, distill_auto
    from .values import ValueModel, build_value_model

    r, d = spec.recipe, spec.distill
    objs = list(r.objectives)
    folder = out / "distill"
    teachers_dirs = {m: final_value_dir(out / "mavis", m) for m in objs}
    method = str(d.get("method", "auto"))
    record = {"teachers": {m: str(p) for m, (_, p) in teachers_dirs.items()}, "settings": {k: v for k, v in d.items() if k != "beta"}, "method": method}
    if (folder / "teachers.json").exists() and json.loads((folder / "teachers.json").read_text()) != record:
        import shutil

        shutil.rmtree(folder)  # other teachers (more iterations) or settings: distil again
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "teachers.json", record)
    if not (folder / "result.json").exists():
        teachers = [ValueModel.load(teachers_dirs[m][1]) for m in objs]
        from .train.iterate import value_model_options

        opts = {**value_model_options(r), "backbone": str(d.get("backbone", r.backbone))}
        cfg = DistillConfig(epochs=float(d.get("epochs", 2.0)), **{k: d[k] for k in ("lr", "batch_size") if k in d})
        from .tracking import make_tracker

        tracker = make_tracker(r.report_to, project=f"mavis-align-{r.name}", run="distill", config=asdict(cfg), out=folder)
        try:
            distill_auto(teachers, lambda: build_value_model(objs, **opts, seed=r.seed + 11), [out / "mavis" / "iter0" / "trees.h5"], folder, cfg,
                         method=method, tracker=tracker)
        finally:
            tracker.finish()
    ev = _Evaluation(spec)
    beta = float(d.get("beta", 5.0))
    separate = MavisDecoder(ev.model, ev.tok, [ValueModel.load(teachers_dirs[m][1]) for m in objs])
    multi = MavisDecoder(ev.model, ev.tok, [ValueModel.load(folder / "student")])
    (folder / "eval").mkdir(exist_ok=True)
    eval_record = {"beta": beta, "evaluation": spec.evaluation}
    if (folder / "eval.json").exists() and json.loads((folder / "eval.json").read_text()) != eval_record:
        for f in (folder / "eval").glob("*.json"):
            f.unlink()  # another beta or evaluation: measure again
    write_json(folder / "eval.json", eval_record)
    for m in objs:
        ev.point(folder / "eval" / f"separate-{m}.json", lambda m=m: DecoderPolicy("separate", separate, ev.tilted(beta), weights={m: 1.0}, chat=r.chat))
        ev.point(folder / "eval" / f"distilled-{m}.json", lambda m=m: DecoderPolicy("distilled", multi, ev.tilted(beta), weights={m: 1.0}, chat=r.chat))
    # speed: every objective weighted, fixed length, the same prompts, one after the other in this process
    speed = folder / "eval" / "speed.json"
    if not speed.exists():
        w = {m: 1.0 for m in objs}
        fixed = ev.tilted(beta, min_new_tokens=ev.max_new_tokens)
        res = {}
        for name, dec in (("separate", separate), ("distilled", multi)):
            t0 = time.perf_counter()
            gens = dec.generate(ev.prompts[:8], weights=w, config=fixed, seed=ev.seed, chat=r.chat)
            res[name] = sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t0)
        res["speedup"] = res["distilled"] / res["separate"]
        res["note"] = "tokens/s of MAVIS with all objectives weighted, 8 prompts, fixed length, measured back to back"
        write_json(speed, res)
