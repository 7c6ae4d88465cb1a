"""Pareto sweeps: every method over a grid of objective weights, evaluated by the one evaluator,
resumable point by point, plotted, with hypervolumes.

A sweep is described by a YAML file (unknown keys are errors)::

    model: smollm2-135m-instruct
    objectives: [helpful, harmless]          # 2 (grid over lambda_1) or 3 (simplex grid)
    values: {helpful: PATH, harmless: PATH}  # MAVIS value models (any [NAME=]PATH spec works too)
    policies: {helpful: PATH, harmless: PATH}  # RL fine-tuned per-objective policies (rsoup, mod)
    morlhf: {"0.5": PATH}                    # MORLHF policies, keyed by the lambda they were trained for
    conditioned: PATH                        # one preference-conditioned value model V(s, λ) (method mavis-conditioned)
    moodpo: PATH                             # one preference-conditioned policy (baselines.train_conditioned_policy)
    mva: {helpful: PATH, harmless: PATH}     # decorrelated per-objective adapters (finetune --decorrelate-against), method mva:
    extrapolate: 0.2                         #   combined like rsoup on the grid, plus lambda_1 = 1 + e and -e (2 objectives)
    mahalo: PATH                             # a multi-head policy (finetune --multihead): heads mixed by lambda (mahalo),
                                             #   and as the proposal of step-level value guidance (mahalo-step)
    methods: [ref, mavis, mavis-beam, mavis-step, mavis-conditioned, moodpo, rsoup, mod, morlhf, bon-ref, bon-rsoup]
    step_chunk: 10                           # mavis-step: step-level guidance, steps of 10 tokens from pi_ref,
    step_candidates: 4                       #   4 candidates per step, the best kept (or `tilt`: drawn by beta)
    step_select: best
    grid_step: 0.2
    beta: 5.0                                # MAVIS beta, and per-lambda overrides (paper Table 9 style):
    betas: {"0.4": 3.0}
    n: 5                                     # beams of mavis-beam and N of best-of-N
    dataset: hh-mix
    split: test
    prompts: 16
    samples: 3
    max_new_tokens: 40
    top_k: 15
    seed: 0
    chat: true

Each point is written to ``out/points/<method>@<lambda>.json`` as soon as it is evaluated; a rerun
skips finished points, and drops those that changed settings (``out/sweep.json``) made stale.
With a ``judge``, every point also gets a ``judge`` record (win rates in both orders, see
:mod:`mavis_align.evaluate.judge`) against ``judge_against``, added to the point file (another judge
or criteria: judged again, the point itself kept), and ``out/judge.md`` tabulates them. ``out/fronts.json``, ``out/fronts.md``, ``out/front.png|svg`` and
``out/reward_kl.png|svg`` are (re)written at the end; with a ``ref`` point, also ``out/matched_kl.json``: every
method's Σλ·R at common KL levels and its hypervolume within KL budgets, with paired-bootstrap intervals over
prompts (:mod:`mavis_align.evaluate.matched`), tabulated in ``fronts.md``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..generation import DEFAULT_TOP_K
from .metrics import hypervolume, pareto_front

SWEEP_METHODS = {"mavis", "mavis-beam", "mavis-step", "mavis-conditioned", "moodpo", "mva", "mahalo", "mahalo-step", "rsoup", "mod", "bon-rsoup", "bon-mod"}
SINGLE_METHODS = {"ref", "bon-ref", "morlhf"}


@dataclass
class SweepSpec:
    model: str = "smollm2-135m-instruct"
    objectives: list[str] = field(default_factory=lambda: ["helpful", "harmless"])
    values: dict = field(default_factory=dict)
    policies: dict = field(default_factory=dict)
    morlhf: dict = field(default_factory=dict)
    conditioned: str = ""  # a preference-conditioned value model (train --conditioned) over the objectives
    moodpo: str = ""  # a preference-conditioned policy (train-policy --conditioned) over the objectives
    mva: dict = field(default_factory=dict)  # decorrelated per-objective adapters (finetune --decorrelate-against)
    mahalo: str = ""  # a multi-head policy (finetune --multihead) over the objectives
    extrapolate: float = 0.2  # mva: extra points lambda_1 = 1 + e and -e beyond the simplex (2 objectives; 0 = none)
    methods: list[str] = field(default_factory=lambda: ["ref", "mavis"])
    grid_step: float = 0.2
    beta: float = 5.0
    betas: dict = field(default_factory=dict)
    n: int = 5
    dataset: str = "hh-mix"
    split: str = "test"
    prompts: int = 16
    samples: int = 3
    max_new_tokens: int = 40
    top_k: int = DEFAULT_TOP_K
    seed: int = 0
    chat: bool = True
    device: str | None = None  # where the models run (None: the command's; see mavis_align.placement)
    dtype: str | None = None
    step_chunk: int = 10  # mavis-step: tokens per step (decoding.steplevel)
    step_candidates: int = 4  # mavis-step: candidate steps sampled from pi_ref per step
    step_select: str = "best"  # mavis-step: keep the best candidate, or draw one by the tilt (`tilt`, uses beta)
    independent: bool = True  # also score each objective's independent scorer (rewards.independent), never used to select
    normalize: bool = True  # MAVIS tilt: NORMALIZE the values to [0, 1] (paper v1/v2) or raw (v3: logits/T + beta * sum lambda V)
    max_step_kl: float = 0.0  # MAVIS token tilt: cap in nats on the KL it adds per step (0 = none; SamplingConfig.max_step_kl)
    tail: str = "drop"  # MAVIS token tilt: tokens outside the top-k dropped (the paper) or kept (SamplingConfig.tail)
    judge: str = ""  # pairwise LLM judge: MODEL@URL (OpenAI-compatible) or a local model name/path; "" = none
    judge_against: str = "ref"  # the method every point is judged against (its point at the same lambda; `ref`: the one ref point)
    criteria: list[str] = field(default_factory=lambda: ["helpful", "harmless", "balanced"])

    def __post_init__(self) -> None:
        if len(self.objectives) not in (2, 3):
            raise ValueError(f"a sweep needs 2 or 3 objectives, got {self.objectives}")
        unknown = [m for m in self.methods if m not in SWEEP_METHODS | SINGLE_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(SWEEP_METHODS | SINGLE_METHODS)}")
        if self.step_chunk < 1 or self.step_candidates < 1 or self.step_select not in ("best", "tilt"):
            raise ValueError(f"step_chunk and step_candidates must be >= 1 and step_select best or tilt, got "
                             f"{self.step_chunk}, {self.step_candidates}, {self.step_select!r}")
        needs = {"mavis": "values", "mavis-beam": "values", "mavis-step": "values", "mavis-conditioned": "conditioned", "moodpo": "moodpo", "mva": "mva", "mahalo": "mahalo", "mahalo-step": "mahalo", "rsoup": "policies", "mod": "policies", "bon-rsoup": "policies", "bon-mod": "policies", "morlhf": "morlhf"}
        for m in self.methods:
            if m in needs and not getattr(self, needs[m]):
                raise ValueError(f"method {m!r} needs `{needs[m]}` in the sweep file")
        if "mahalo-step" in self.methods and not self.values:
            raise ValueError("method 'mahalo-step' needs `values` in the sweep file (its process reward models)")
        if not self.extrapolate >= 0:
            raise ValueError(f"extrapolate must be >= 0, got {self.extrapolate}")
        for key in ("values", "policies", "mva"):
            have = getattr(self, key)
            if have and sorted(have) != sorted(self.objectives):
                raise ValueError(f"`{key}` must name exactly the objectives {self.objectives}, got {sorted(have)}")
        if not 0 < self.grid_step <= 1 or abs(round(1 / self.grid_step) * self.grid_step - 1) > 1e-9:
            raise ValueError(f"grid_step must divide 1, got {self.grid_step}")
        if self.judge:
            from .judge import CRITERIA

            bad = [c for c in self.criteria if c not in CRITERIA]
            if bad or not self.criteria:
                raise ValueError(f"criteria must be some of {list(CRITERIA)}, got {self.criteria}")
            if self.judge_against not in self.methods:
                raise ValueError(f"judge_against {self.judge_against!r} must be one of the sweep's methods {self.methods}")


def load_sweep(path: str | Path) -> SweepSpec:
    from ..schema import check, read_yaml_mapping, shape_of

    raw = read_yaml_mapping(path, "sweep file")
    try:
        check(raw, shape_of(SweepSpec))
        return SweepSpec(**raw)
    except ValueError as err:
        raise ValueError(f"sweep file {path}: {err}") from None


def weight_grid(n_objectives: int, step: float) -> list[tuple[float, ...]]:
    """All lambda with entries in {0, step, ..., 1} summing to 1 (a line for 2, a simplex for 3)."""
    k = round(1 / step)
    out = []
    for combo in itertools.product(range(k + 1), repeat=n_objectives - 1):
        if sum(combo) <= k:
            out.append(tuple(round(c / k, 6) for c in combo) + (round((k - sum(combo)) / k, 6),))
    return sorted(out, reverse=True)


def extrapolated(n_objectives: int, e: float) -> list[tuple[float, ...]]:
    """The weightings beyond the simplex that ``mva`` adds: (1 + e, -e) and (-e, 1 + e); none for e = 0 or 3 objectives."""
    if e <= 0 or n_objectives != 2:
        return []
    return [(round(1 + e, 6), round(-e, 6)), (round(-e, 6), round(1 + e, 6))]


def lam_key(lam) -> str:
    return "-".join(f"{x:g}" for x in lam)


def morlhf_lambda(key, n_objectives: int) -> tuple[float, ...]:
    """A ``morlhf`` key -> lambda: "0.4" means (0.4, 0.6) for two objectives; "a-b-c" for three."""
    parts = [float(x) for x in str(key).split("-")]
    if len(parts) == 1 and n_objectives == 2:
        return (parts[0], round(1 - parts[0], 6))
    if len(parts) != n_objectives or abs(sum(parts) - 1) > 1e-6:
        raise ValueError(f"morlhf key {key!r} is not a weighting of {n_objectives} objectives")
    return tuple(parts)


def morlhf_key(lam) -> str:
    return f"{lam[0]:g}" if len(lam) == 2 else lam_key(lam)


MAVIS_ONLY_FIELDS = ("beta", "betas", "values", "normalize", "max_step_kl", "tail", "conditioned")  # sweep settings that change the MAVIS points only
PLACEMENT_FIELDS = ("device", "dtype")  # where the points are computed: changing them keeps the points
JUDGE_FIELDS = ("judge", "judge_against", "criteria")  # the judge record is redone, the points kept
MAVIS_METHODS = ("mavis", "mavis-beam", "mavis-step", "mavis-conditioned")
# which methods' points a changed setting makes stale (any other changed setting: every point)
STEP_METHODS = ("mavis-step", "mahalo-step")
TILT_FIELDS = ("beta", "betas", "normalize")  # read by step-level methods only when they draw by the tilt
FIELD_METHODS = {"beta": MAVIS_METHODS + ("mahalo-step",), "betas": MAVIS_METHODS + ("mahalo-step",), "normalize": MAVIS_METHODS + ("mahalo-step",),
                 "values": ("mavis", "mavis-beam", "mavis-step", "mahalo-step"),
                 "max_step_kl": ("mavis", "mavis-beam", "mavis-conditioned"), "tail": ("mavis", "mavis-beam", "mavis-conditioned"),
                 "step_chunk": STEP_METHODS, "step_candidates": STEP_METHODS, "step_select": STEP_METHODS,
                 "conditioned": ("mavis-conditioned",), "moodpo": ("moodpo",), "mva": ("mva",), "extrapolate": ("mva",),
                 "mahalo": ("mahalo", "mahalo-step")}


def stale_methods(changed: set[str], spec: SweepSpec) -> set[str] | None:
    """The methods whose points the ``changed`` settings make stale (:data:`FIELD_METHODS`); None: every method."""
    if changed - set(FIELD_METHODS):
        return None
    out: set[str] = set()
    for k in changed:
        methods = set(FIELD_METHODS[k])
        if k in TILT_FIELDS and spec.step_select == "best":
            methods -= set(STEP_METHODS)  # keeping the best step reads neither beta nor NORMALIZE
        out |= methods
    return out


def point_method(path: Path) -> str:
    """The method of a point file ``<method>@<lambda>.json``."""
    return path.name.split("@", 1)[0]


def drop_stale_points(out: str | Path, spec: SweepSpec) -> None:
    """Record ``spec`` in ``out/sweep.json``; points measured under other settings are deleted
    (only those of the methods a setting concerns, see :data:`FIELD_METHODS`; a changed method list
    alone makes nothing stale), so a rerun re-evaluates exactly those."""
    from ..provenance import write_json

    out = Path(out)
    new = json.loads(json.dumps(spec.__dict__, default=str))
    saved = out / "sweep.json"
    if saved.exists():
        # settings added since the sweep was written take their defaults
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(SweepSpec)}
        old = {**json.loads(json.dumps(defaults, default=str)), **json.loads(saved.read_text())}
        changed = {k for k in new if k not in PLACEMENT_FIELDS + JUDGE_FIELDS and k != "methods" and old.get(k) != new[k]}
        stale = stale_methods(changed, spec)
        for f in (out / "points").glob("*.json") if changed else []:
            if stale is None or point_method(f) in stale:
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved, new)


def run_sweep(spec: SweepSpec, out: str | Path, *, progress: bool = True) -> dict:
    """Evaluate every (method, lambda) point not done yet, then write fronts, tables and plots
    (models on the spec's device and dtype, else the caller's placement)."""
    from ..placement import using

    with using(spec.device, spec.dtype):
        return _run_sweep(spec, out, progress=progress)


def _run_sweep(spec: SweepSpec, out: str | Path, *, progress: bool) -> dict:
    from ..data import load_prompts
    from ..decoding.decoder import MavisDecoder, parse_value_spec
    from ..generation import SamplingConfig
    from ..models import load_causal_lm
    from ..provenance import write_json, write_run_record
    from ..rewards import get_rewards, weighted_reward
    from ..rewards.independent import with_independent
    from ..values import ValueModel
    from .evaluator import evaluate_policy
    from .policies import BestOfN, DecoderPolicy, ModelPolicy, MODPolicy

    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    drop_stale_points(out, spec)
    write_run_record(out, spec.__dict__, spec.seed)
    ref_model, tok = load_causal_lm(spec.model)
    prompts = [p.text for p in load_prompts(spec.dataset, spec.split, tokenizer=tok, limit=spec.prompts)]
    rewards = get_rewards(spec.objectives)
    scored = get_rewards(with_independent(spec.objectives)) if spec.independent else rewards
    grid = weight_grid(len(spec.objectives), spec.grid_step)
    plain = SamplingConfig(max_new_tokens=spec.max_new_tokens)
    cache: dict = {}

    def scorer(lam):
        return weighted_reward(rewards, dict(zip(spec.objectives, lam)))

    def beta_for(lam) -> float:
        return float(spec.betas.get(f"{lam[0]:g}", spec.betas.get(lam_key(lam), spec.beta)))

    def decoder():
        if "decoder" not in cache:
            vms, names = [], []
            for obj in spec.objectives:
                name, path = parse_value_spec(str(spec.values[obj]))
                vms.append(ValueModel.load(path))
                names.append(obj if len(vms[-1].objectives) == 1 else None)
            cache["decoder"] = MavisDecoder(ref_model, tok, vms, names)
            cache["value_names"] = names
        return cache["decoder"]

    def conditioned_decoder():
        if "conditioned" not in cache:
            vm = ValueModel.load(spec.conditioned)
            missing = [o for o in spec.objectives if o not in vm.objectives]
            if not vm.conditioned or missing:
                raise ValueError(f"`conditioned: {spec.conditioned}` must be a preference-conditioned value model over {spec.objectives} "
                                 f"(it is {'conditioned' if vm.conditioned else 'not conditioned'}, objectives {vm.objectives})")
            cache["conditioned"] = MavisDecoder(ref_model, tok, [vm])
        return cache["conditioned"]

    def policy_model(obj):
        from ..baselines import load_policy_model

        if obj not in cache:
            cache[obj] = load_policy_model(spec.policies[obj], base_model=load_causal_lm(spec.model))[0]
        return cache[obj]

    def make(method: str, lam):
        if method == "ref":
            return DecoderPolicy("ref", MavisDecoder(ref_model, tok), plain, chat=spec.chat)
        w = dict(zip(spec.objectives, lam))
        cfg = SamplingConfig(max_new_tokens=spec.max_new_tokens, top_k=spec.top_k, beta=beta_for(lam), normalize=spec.normalize,
                             max_step_kl=spec.max_step_kl, tail=spec.tail)
        if method == "bon-ref":
            return BestOfN("bon-ref", DecoderPolicy("ref", MavisDecoder(ref_model, tok), plain, chat=spec.chat), spec.n, scorer(lam))
        if method == "mavis":
            return DecoderPolicy("mavis", decoder(), cfg, weights=w, chat=spec.chat)
        if method == "mavis-beam":
            return DecoderPolicy("mavis-beam", decoder(), cfg, weights=w, beam=spec.n, chat=spec.chat)
        if method == "mavis-step":  # steps sampled from pi_ref itself (full vocabulary), kept by value
            return DecoderPolicy("mavis-step", decoder(), SamplingConfig(max_new_tokens=spec.max_new_tokens, beta=beta_for(lam), normalize=spec.normalize),
                                 weights=w, chat=spec.chat, chunk=spec.step_chunk, candidates=spec.step_candidates, select=spec.step_select)
        if method == "mavis-conditioned":
            return DecoderPolicy("mavis-conditioned", conditioned_decoder(), cfg, weights=w, chat=spec.chat)
        if method in ("rsoup", "bon-rsoup"):
            from ..baselines import soup

            model, _ = soup([spec.policies[o] for o in spec.objectives], list(lam))
            pol = ModelPolicy("rsoup", model, tok, plain, chat=spec.chat)
            return BestOfN("bon-rsoup", pol, spec.n, scorer(lam)) if method == "bon-rsoup" else pol
        if method in ("mod", "bon-mod"):
            pol = MODPolicy("mod", [policy_model(o) for o in spec.objectives], tok, list(lam), plain, chat=spec.chat)
            return BestOfN("bon-mod", pol, spec.n, scorer(lam)) if method == "bon-mod" else pol
        if method == "moodpo":
            if "moodpo" not in cache:
                from ..baselines import load_policy_model

                folder = Path(spec.moodpo)
                meta = json.loads((folder / "mavis_policy.json").read_text()) if (folder / "mavis_policy.json").is_file() else {}
                trained_on = (meta.get("conditioned") or {}).get("objectives")
                if trained_on is None or sorted(trained_on) != sorted(spec.objectives):
                    raise ValueError(f"`moodpo: {spec.moodpo}` must be a preference-conditioned policy over {spec.objectives} "
                                     f"(trained over {trained_on})")
                cache["moodpo"] = load_policy_model(folder, base_model=load_causal_lm(spec.model))[0]
            from ..baselines.rl import preference_instruction

            # the instruction is read before the prompt; generations keep the user prompt, so KL is against pi_ref on it alone
            return ModelPolicy("moodpo", cache["moodpo"], tok, plain, chat=spec.chat, system=preference_instruction(w))
        if method in ("mahalo", "mahalo-step"):
            from ..baselines import load_multihead_policy

            trained_on = json.loads((Path(spec.mahalo) / "mavis_policy.json").read_text())["multihead"]["objectives"]
            if sorted(trained_on) != sorted(spec.objectives):
                raise ValueError(f"`mahalo: {spec.mahalo}` has heads {trained_on}, the sweep's objectives are {spec.objectives}")
            model, _ = load_multihead_policy(spec.mahalo, w, base_model=load_causal_lm(spec.model))
            if method == "mahalo":
                return ModelPolicy("mahalo", model, tok, plain, chat=spec.chat)
            # PRM-guided decoding: steps proposed by the multi-head policy at lambda, kept by the value models
            steps = MavisDecoder(model, tok, decoder().value_models, cache["value_names"])
            return DecoderPolicy("mahalo-step", steps, SamplingConfig(max_new_tokens=spec.max_new_tokens, beta=beta_for(lam), normalize=spec.normalize),
                                 weights=w, chat=spec.chat, chunk=spec.step_chunk, candidates=spec.step_candidates, select=spec.step_select)
        if method == "mva":
            from ..baselines import combine

            model, _ = combine([spec.mva[o] for o in spec.objectives], list(lam))
            return ModelPolicy("mva", model, tok, plain, chat=spec.chat)
        if method == "morlhf":
            from ..baselines import load_policy_model

            model, _ = load_policy_model(spec.morlhf[morlhf_key(lam)], base_model=load_causal_lm(spec.model))
            return ModelPolicy("morlhf", model, tok, plain, chat=spec.chat)
        raise ValueError(method)

    jobs = []
    for method in spec.methods:
        if method in SWEEP_METHODS or method == "bon-ref":
            jobs += [(method, lam) for lam in grid]
            if method == "mva":
                jobs += [(method, lam) for lam in extrapolated(len(spec.objectives), spec.extrapolate)]
        elif method == "ref":
            jobs.append((method, None))
        elif method == "morlhf":
            jobs += [(method, morlhf_lambda(key, len(spec.objectives))) for key in spec.morlhf]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="pareto", unit="point")
    for method, lam in jobs:
        path = out / "points" / f"{method}@{lam_key(lam) if lam else 'ref'}.json"
        if not path.exists():
            res = evaluate_policy(make(method, lam), prompts, scored, ref_model, tok, samples=spec.samples, seed=spec.seed, chat=spec.chat)
            res.update({"lambda": list(lam) if lam else None, "beta": beta_for(lam) if lam and method.startswith("mavis") else None})
            write_json(path, res)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if spec.judge:
        judge_points(out, spec, jobs)
    return write_fronts(out, spec)


def judge_points(out: Path, spec: SweepSpec, jobs: list) -> None:
    """Add a ``judge`` record to every point not yet judged with these settings: win rates per
    criterion against the ``judge_against`` point at the same lambda (the ref point for ``ref``);
    then write ``out/judge.md``."""
    from ..provenance import write_json
    from .judge import make_judge, win_rate

    settings = {"judge": spec.judge, "against": spec.judge_against, "criteria": list(spec.criteria)}
    judge = None

    def path_of(method, lam) -> Path:
        return out / "points" / f"{method}@{lam_key(lam) if lam else 'ref'}.json"

    rows = []
    for method, lam in jobs:
        if method == spec.judge_against:
            continue
        other = path_of(spec.judge_against, None if spec.judge_against == "ref" else lam)
        if not other.exists():
            continue  # e.g. a morlhf lambda off the grid of a swept method
        point, base = json.loads(path_of(method, lam).read_text()), json.loads(other.read_text())
        if (point.get("judge") or {}).get("settings") != settings:
            a, b = point.get("responses"), base.get("responses")
            if not a or not b or [x["prompt"] for x in a] != [x["prompt"] for x in b]:
                raise ValueError(f"{path_of(method, lam).name} and {other.name} lack per-response records on the same prompts; delete them to re-evaluate")
            judge = judge or make_judge(spec.judge)
            prompts = [x["prompt"] for x in a]
            point["judge"] = {"settings": settings, "judge": judge.name, "against": other.name,
                              "win_rates": [win_rate(judge, prompts, [x["response"] for x in a], [x["response"] for x in b], c) for c in spec.criteria]}
            write_json(path_of(method, lam), point)
        rows.append(point)
    lines = [f"Pairwise judge `{spec.judge}` against `{spec.judge_against}` (each pair judged in both orders; ties count in the denominator).", "",
             "| method | λ | criterion | win | loss | tie | consistency | invalid |", "|---|---|---|---|---|---|---|---|"]
    for p in rows:
        lam = "-" if p.get("lambda") is None else "/".join(f"{x:g}" for x in p["lambda"])
        for w in p["judge"]["win_rates"]:
            lines.append(f"| {p['method']} | {lam} | {w['criterion']} | {w['win']:.3f} | {w['loss']:.3f} | {w['tie']:.3f} | {w['consistency']:.3f} | {w['invalid']} |")
    (out / "judge.md").write_text("\n".join(lines) + "\n")


def point_kl(point: dict) -> float:
    """KL to pi_ref of an evaluated point. For best-of-N of a sampling policy pi_s,
    KL(BoN || ref) = E_BoN[log BoN/pi_s] + E_BoN[log pi_s/ref]: the first term is bounded by
    log N - (N-1)/N, the second is the eq. 7 log-ratio of the chosen responses under pi_s (what the
    evaluator measured for them)."""
    return point["kl"]["mean"] + point.get("kl_best_of_n_bound", 0.0)


def write_fronts(out: Path, spec: SweepSpec) -> dict:
    """Fronts per method, hypervolume against the stated reference point, markdown and plots."""
    # the listed methods only: points of a method dropped from the list stay on disk, out of the fronts
    points = [json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json")) if point_method(p) in spec.methods]
    objs = spec.objectives
    by_method: dict[str, list[dict]] = {}
    for p in points:
        by_method.setdefault(p["method"], []).append(p)
    coords = {m: [[p["rewards"][o]["mean"] for o in objs] for p in ps] for m, ps in by_method.items()}
    all_pts = [c for cs in coords.values() for c in cs]
    reference = [min(c[k] for c in all_pts) for k in range(len(objs))] if all_pts else [0.0] * len(objs)
    summary = {"objectives": objs, "reference_point": reference,
               "reference_point_rule": "componentwise minimum mean reward over every evaluated point of every method", "methods": {}}
    for m, ps in by_method.items():
        front = pareto_front(coords[m])
        summary["methods"][m] = {
            "hypervolume": hypervolume(coords[m], reference),
            "points": [{"lambda": p["lambda"], "rewards": dict(zip(objs, c)), "kl": point_kl(p), "on_front": i in front}
                       for i, (p, c) in enumerate(zip(ps, coords[m]))],
        }
    (out / "fronts.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"Reference point for hypervolume: {', '.join(f'{o}={r:.3f}' for o, r in zip(objs, reference))} (componentwise minimum over all points).", "",
             "| method | λ | " + " | ".join(objs) + " | KL | on own front |", "|---" * (len(objs) + 4) + "|"]
    for m, info in summary["methods"].items():
        for pt in info["points"]:
            lam = "-" if pt["lambda"] is None else "/".join(f"{x:g}" for x in pt["lambda"])
            lines.append(f"| {m} | {lam} | " + " | ".join(f"{pt['rewards'][o]:.3f}" for o in objs) + f" | {pt['kl']:.2f} | {'yes' if pt['on_front'] else ''} |")
    lines += ["", "KL: eq. 7 estimate; for best-of-N of a policy π_s: log N - (N-1)/N (the bound on KL(BoN || π_s)) plus the eq. 7 "
              "estimate of KL(π_s || π_ref) over the chosen responses (0 for best-of-N of π_ref).",
              "", "| method | hypervolume (no KL budget) |", "|---|---|"] + [f"| {m} | {info['hypervolume']:.4f} |" for m, info in summary["methods"].items()]
    if "ref" in by_method:  # the comparison that counts: every method at the same KL, with intervals over prompts
        from .matched import render_sweep_matched, sweep_matched_kl

        matched = sweep_matched_kl(points, objs, bon_n=spec.n, n_boot=1000, seed=spec.seed)
        (out / "matched_kl.json").write_text(json.dumps(matched, indent=2) + "\n")
        lines += [""] + render_sweep_matched(matched)
    (out / "fronts.md").write_text("\n".join(lines) + "\n")
    _plot(out, summary)
    return summary


def _plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs = summary["objectives"]
    fig, ax = plt.subplots(figsize=(6, 5))
    for m, info in summary["methods"].items():
        pts = sorted(info["points"], key=lambda p: p["rewards"][objs[0]])
        xs, ys = [p["rewards"][objs[0]] for p in pts], [p["rewards"][objs[1]] for p in pts]
        ax.plot(xs, ys, "o-" if len(pts) > 1 else "s", label=m)
    ax.set_xlabel(f"{objs[0]} reward")
    ax.set_ylabel(f"{objs[1]} reward")
    ax.set_title("Pareto fronts" + (f" (projected on {objs[0]}/{objs[1]})" if len(objs) > 2 else ""))
    ax.legend()
    ax.grid(alpha=0.3)
    for ext in ("png", "svg"):
        fig.savefig(out / f"front.{ext}", dpi=120, bbox_inches="tight")
    plt.close(fig)
    from .matched import envelope

    ref_pts = summary["methods"].get("ref", {}).get("points", [])
    fig, axes = plt.subplots(1, len(objs), figsize=(5 * len(objs), 4))
    for k, o in enumerate(objs):
        for m, info in summary["methods"].items():
            line = axes[k].plot([p["kl"] for p in info["points"]], [p["rewards"][o] for p in info["points"]], "o", label=m)[0]
            if m != "ref" and ref_pts:  # the method's envelope with pi_ref at KL 0 (evaluate.matched)
                hull = envelope([0.0] + [p["kl"] for p in info["points"]], [ref_pts[0]["rewards"][o]] + [p["rewards"][o] for p in info["points"]])
                axes[k].plot([h[0] for h in hull], [h[1] for h in hull], "-", color=line.get_color(), alpha=0.5)
        axes[k].set_xlabel("KL to π_ref (nats, eq. 7)")
        axes[k].set_ylabel(f"{o} reward")
        axes[k].grid(alpha=0.3)
    axes[0].legend()
    for ext in ("png", "svg"):
        fig.savefig(out / f"reward_kl.{ext}", dpi=120, bbox_inches="tight")
    plt.close(fig)
