"""Candidate-level value benchmark (issue 36): can a value model order the candidates the tilt ranks?

MAVIS tilts the top-k *next tokens* of each state by V(s ⊕ a), but value models are usually judged on
sibling tree nodes that differ by whole chunks. This benchmark measures the quantity the tilt uses.

Collection (:func:`collect_candidates`, resumable): for each held-out prompt, one π_ref response
prefix; at each of ``positions`` (response tokens already written) the state s = prompt + prefix; its
candidates: the top ``k`` next tokens of π_ref (``chunk`` 1), or ``k`` distinct chunks of ``chunk``
tokens sampled from π_ref; each candidate continued by ``rollouts`` π_ref rollouts to the response
budget and scored by every reward. One HDF5 group per state, written whole (``candidates.h5``); a
rerun skips finished states.

Scoring (:func:`candidate_metrics`): per objective, the candidates' Monte-Carlo means Q̂(s, a) (the
π_ref value the iteration-0 regression targets) with standard errors, against V(s ⊕ a):

* ``resolved``: V's concordance on candidate pairs whose MC difference exceeds 2 standard errors;
* ``all_pairs``: V's concordance with the MC means on every pair (ties of V count ½);
* ``value_vs_half`` / ``half_vs_half``: V against the mean of half the rollouts, and one half against
  the other (the split-half noise ceiling at the same number of rollouts);
* ``spearman``: mean over states of the rank correlation of V and the MC means;
* random effects per state (one-way ANOVA of rollouts by candidate): the candidates' true spread
  sd_between = sqrt(max(0, (MSB − MSW) / N)), and the fraction of states where it exceeds noise
  (permutation test of the F statistic, p < 0.05);
* ``value_sd``: the spread of V over the same candidates (what the tilt turns into KL), and
  ``spread_gate_spearman``: the rank correlation over states of V's spread with the candidates' true
  spread (whether V's own spread could gate the tilt to the states with something to rank).

Breakdowns by position, prompt category, candidate rank and the π_ref mass the candidates hold.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STORE = "candidates.h5"


@dataclass
class CandidateBenchConfig:
    """What :func:`collect_candidates` measures (recorded in the folder's ``bench.json``)."""

    model: str = "smollm2-135m-instruct"
    objectives: list[str] = field(default_factory=lambda: ["helpful", "harmless", "humor"])
    dataset: str = "hh-mix"
    split: str = "val"  # never the test splits: designs are chosen on these numbers
    prompts: int = 24
    data_seed: int = 0
    balance: bool = True  # as many harmful as ordinary prompts (harmless varies only on harmful ones)
    positions: list[int] = field(default_factory=lambda: [0, 4, 12])
    k: int = 8
    chunk: int = 1
    rollouts: int = 8
    max_new_tokens: int = 40
    chat: bool = True
    seed: int = 0
    max_rows: int = 64

    def __post_init__(self) -> None:
        for name in ("prompts", "k", "chunk", "rollouts", "max_new_tokens", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError("k must be >= 2: a state needs at least two candidates to order")
        if self.rollouts < 2:
            raise ValueError("rollouts must be >= 2 (standard errors and split halves)")
        if not self.positions or any(p < 0 or p + self.chunk >= self.max_new_tokens for p in self.positions):
            raise ValueError(f"positions must be in [0, max_new_tokens - chunk) = [0, {self.max_new_tokens - self.chunk}), got {self.positions}")


def _state_key(prompt_index: int, position: int) -> str:
    return f"p{prompt_index:05d}-t{position:03d}"


@torch.no_grad()
def collect_candidates(config: CandidateBenchConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Collect (or finish collecting) the benchmark into ``out`` -> the HDF5 path."""
    import h5py

    from ..collect.builder import GenPolicy, TreeConfig
    from ..data import load_prompts
    from ..decoding.engine import row_generator
    from ..generation import left_pad
    from ..models import format_prompts, load_causal_lm
    from ..provenance import write_json, write_run_record
    from ..rewards import get_rewards

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "bench.json"
    spec = asdict(config)
    if saved.exists() and json.loads(saved.read_text()) != spec:
        raise ValueError(f"{out} holds a benchmark of other settings ({saved}); use another folder")
    write_json(saved, spec)
    write_run_record(out, spec, config.seed)
    rewards = get_rewards(config.objectives)
    model, tok = load_causal_lm(config.model)
    policy = GenPolicy(model, tok, reuse_prefix_kv=False)
    items = load_prompts(config.dataset, config.split, seed=config.data_seed, tokenizer=tok)
    if config.balance:
        harmful = [p for p in items if p.category == "harmful"]
        other = [p for p in items if p.category != "harmful"]
        half = config.prompts // 2
        items = other[: config.prompts - min(half, len(harmful))] + harmful[:half]
    items = items[: config.prompts]
    if not items:
        raise ValueError(f"no {config.split} prompts in {config.dataset!r}")
    texts = format_prompts(tok, [p.text for p in items], chat=config.chat)
    eos = tok.eos_token_id
    device = next(model.parameters()).device
    store = out / STORE
    with h5py.File(store, "a") as h5:
        todo = [(i, t) for i in range(len(items)) for t in config.positions if _state_key(i, t) not in h5]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = len(items) * len(config.positions)
            bar = tqdm(total=total, initial=total - len(todo), desc="candidate states", unit="state")
        tree = TreeConfig(max_new_tokens=config.max_new_tokens)  # pi_ref sampling at temperature 1, whole vocabulary

        def skip(i: int, t: int, why: str) -> None:
            h5.create_group(_state_key(i, t)).attrs["skipped"] = why
            if bar is not None:
                bar.update(1)

        prefixes: dict[int, list[int]] = {}
        for i, t in todo:
            prompt_ids = tok(texts[i], add_special_tokens=False)["input_ids"]
            if i not in prefixes:  # one pi_ref response prefix per prompt, long enough for every position
                gen = row_generator(config.seed, 2 * i)
                row = policy.extend([prompt_ids], [0], [max(config.positions) or 1], tree, gen)[0]
                prefixes[i] = list(row.token_ids)
            prefix = prefixes[i][:t]
            if len(prefix) < t or (eos is not None and eos in prefix):
                skip(i, t, "the pi_ref response ended before this position")
                continue
            state = prompt_ids + prefix
            gen = row_generator(config.seed, 2 * i + 1 + 1000003 * t)
            ids, mask = left_pad([state], policy.pad_id, device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0, -1].float(), -1)
            if config.chunk == 1:
                lp, cand = logp.topk(config.k)
                chunks = [[int(a)] for a in cand]
                ref_logp = lp.tolist()
            else:  # k distinct chunks sampled from pi_ref (up to 4k draws)
                draws = policy.extend([state], [0] * (4 * config.k), [config.chunk] * (4 * config.k), tree, gen)
                seen: dict[tuple, float] = {}
                for d in draws:
                    key = tuple(d.token_ids)
                    if key not in seen and len(seen) < config.k:
                        seen[key] = float(sum(d.logprobs_ref))
                chunks, ref_logp = [list(c) for c in seen], list(seen.values())
                if len(chunks) < 2:
                    skip(i, t, "pi_ref gives fewer than two distinct chunks here")
                    continue
            budget = config.max_new_tokens - t
            responses: list[list[int]] = [[] for _ in range(len(chunks) * config.rollouts)]
            live = [c for c, ch in enumerate(chunks) if not (eos is not None and eos in ch) and len(ch) < budget]
            rows_src = [c for c in live for _ in range(config.rollouts)]
            for c, ch in enumerate(chunks):
                for n in range(config.rollouts):
                    responses[c * config.rollouts + n] = prefix + ch
            filled = dict.fromkeys(live, 0)
            for s in range(0, len(rows_src), config.max_rows):
                part = rows_src[s : s + config.max_rows]
                order = sorted(set(part))
                rows = policy.extend([state + chunks[c] for c in order], [order.index(c) for c in part],
                                     [budget - len(chunks[c]) for c in part], tree, gen)
                for c, row in zip(part, rows):
                    responses[c * config.rollouts + filled[c]] = prefix + chunks[c] + list(row.token_ids)
                    filled[c] += 1
            resp_text = [tok.decode(r, skip_special_tokens=True) for r in responses]
            prompts_rep = [items[i].text] * len(resp_text)
            scores = np.stack([np.asarray(r(prompts_rep, resp_text), dtype=np.float32) for r in rewards], -1)
            grp = h5.create_group(_state_key(i, t))
            width = max(len(ch) for ch in chunks)
            grp.create_dataset("state_ids", data=np.asarray(state, dtype=np.int64))
            grp.create_dataset("candidates", data=np.asarray([ch + [-1] * (width - len(ch)) for ch in chunks], dtype=np.int64))
            grp.create_dataset("ref_logp", data=np.asarray(ref_logp, dtype=np.float32))
            grp.create_dataset("rewards", data=scores.reshape(len(chunks), config.rollouts, len(rewards)))
            grp.attrs.update({"prompt": items[i].text, "category": items[i].category, "position": t, "prompt_len": len(prompt_ids),
                              "objectives": json.dumps(list(config.objectives)), "top_k_mass": float(np.exp(np.asarray(ref_logp)).sum())})
            h5.flush()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return store


@dataclass
class CandidateState:
    """One benchmark state read back: ``rewards`` [k, N, M], ``candidates`` [k, L] (−1 pads)."""

    key: str
    prompt: str
    category: str
    position: int
    prompt_len: int
    state_ids: np.ndarray
    candidates: np.ndarray
    ref_logp: np.ndarray
    rewards: np.ndarray
    top_k_mass: float


def read_candidates(folder: str | Path) -> tuple[list[str], list[CandidateState]]:
    """(objectives, the finished states in key order) of a benchmark folder."""
    import h5py

    folder = Path(folder)
    objectives = json.loads((folder / "bench.json").read_text())["objectives"]
    states = []
    with h5py.File(folder / STORE, "r") as h5:
        for key in sorted(h5):
            g = h5[key]
            if "rewards" not in g:
                continue
            a = g.attrs
            states.append(CandidateState(key, str(a["prompt"]), str(a["category"]), int(a["position"]), int(a["prompt_len"]), g["state_ids"][()],
                                         g["candidates"][()], g["ref_logp"][()], g["rewards"][()], float(a["top_k_mass"])))
    return objectives, states


@torch.no_grad()
def value_of_candidates(value_model, states: Sequence[CandidateState], objectives: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
    """V(s ⊕ a) of every candidate of every state for ``objectives`` -> per state [k, M]."""
    from ..generation import left_pad

    idx = [value_model.objective_index(m) for m in objectives]
    device = next(value_model.parameters()).device
    rows = [(si, list(s.state_ids) + [int(x) for x in c if x >= 0], s.prompt_len) for si, s in enumerate(states) for c in s.candidates]
    vals: list[np.ndarray] = []
    for b in range(0, len(rows), batch_size):
        part = rows[b : b + batch_size]
        ids, mask = left_pad([r for _, r, _ in part], 0, device)
        v = value_model.score(ids, mask, prompt_lengths=torch.tensor([p for _, _, p in part]))
        vals.append(v[:, idx].float().cpu().numpy())
    flat = np.concatenate(vals) if vals else np.zeros((0, len(idx)))
    out, at = [], 0
    for s in states:
        out.append(flat[at : at + len(s.candidates)])
        at += len(s.candidates)
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def random_effects(x: np.ndarray, rng: np.random.Generator, permutations: int = 199) -> tuple[float, float]:
    """One-way ANOVA of rollouts ``x`` [k, N] by candidate -> (sd_between, permutation p of F)."""
    k, n = x.shape

    def f_stat(y: np.ndarray) -> tuple[float, float, float]:
        means = y.mean(1)
        msb = n * ((means - y.mean()) ** 2).sum() / (k - 1)
        msw = ((y - means[:, None]) ** 2).sum() / (k * (n - 1))
        return msb, msw, (msb / msw if msw > 0 else (math.inf if msb > 0 else 0.0))

    msb, msw, f = f_stat(x)
    sd = math.sqrt(max(0.0, (msb - msw) / n))
    if f == 0.0:
        return sd, 1.0
    flat = x.reshape(-1)
    ge = sum(f_stat(rng.permutation(flat).reshape(k, n))[2] >= f for _ in range(permutations))
    return sd, (1 + ge) / (1 + permutations)


def _pooled(per_state: Sequence[tuple[np.ndarray, np.ndarray, Sequence[tuple[int, int]]]]) -> dict:
    """Concordance of pred with target over every state's pairs, pooled, with the standard error clustered
    by state (pairs of one state share candidates and rollouts): ``train.quality.sibling_concordance``
    on the states laid end to end. ``per_state``: (pred [k], target [k], pairs) per state."""
    from ..train.quality import sibling_concordance

    preds, targets, pairs, clusters, at = [], [], [], [], 0
    for si, (pred, target, prs) in enumerate(per_state):
        preds.append(np.asarray(pred, dtype=np.float64))
        targets.append(np.asarray(target, dtype=np.float64))
        pairs += [(at + i, at + j) for i, j in prs]
        clusters += [si] * len(pred)
        at += len(pred)
    if not at:
        return {"concordance": float("nan"), "se": float("nan"), "pairs": 0, "states": 0}
    out = sibling_concordance(np.concatenate(preds), np.concatenate(targets), pairs, clusters)
    return {"concordance": out["concordance"], "se": out["se"], "pairs": out["pairs"], "states": out["trees"]}


def candidate_metrics(states: Sequence[CandidateState], values: Sequence[np.ndarray] | None, objectives: Sequence[str], *, seed: int = 0) -> dict:
    """The benchmark's metrics per objective (see the module docstring); ``values`` None: only the
    data's own (noise ceiling, random effects)."""
    rng = np.random.default_rng(seed)
    out = {}
    for m, name in enumerate(objectives):
        acc: dict[str, list[tuple]] = {key: [] for key in ("resolved", "all_pairs", "value_vs_half", "half_vs_half", "resolved_top2", "resolved_rest")}
        rho, sd_b, sig, v_sd, resolved_pairs = [], [], [], [], 0
        for si, s in enumerate(states):
            x = s.rewards[:, :, m].astype(np.float64)  # [k, N]
            k, n = x.shape
            mean = x.mean(1)
            se = x.std(1, ddof=1) / math.sqrt(n)
            pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
            resolved = [(i, j) for i, j in pairs if abs(mean[i] - mean[j]) > 2 * math.hypot(se[i], se[j])]
            resolved_pairs += len(resolved)
            half_a, half_b = x[:, 0::2].mean(1), x[:, 1::2].mean(1)
            acc["half_vs_half"].append((half_a, half_b, pairs))
            b, p = random_effects(x, rng)
            sd_b.append(b)
            sig.append(p < 0.05)
            if values is None:
                continue
            v = values[si][:, m].astype(np.float64)
            v_sd.append(float(v.std(ddof=1)))
            for key, prs, target in (("resolved", resolved, mean), ("all_pairs", pairs, mean), ("value_vs_half", pairs, half_b),
                                     ("resolved_top2", [q for q in resolved if q[0] < 2 and q[1] < 2], mean),
                                     ("resolved_rest", [q for q in resolved if q[1] >= 2], mean)):
                acc[key].append((v, target, prs))
            r = _spearman(v, mean)
            if not math.isnan(r):
                rho.append(r)
        res = {key: _pooled(acc[key]) for key in acc if values is not None or key == "half_vs_half"}
        res.update({"states": len(states), "resolved_pairs": resolved_pairs,
                    "sd_between_median": float(np.median(sd_b)) if sd_b else float("nan"),
                    "states_with_signal": float(np.mean(sig)) if sig else float("nan")})
        if values is not None:
            # does V's own spread tell the states with something to rank from the rest? (a gate's premise)
            gate = _spearman(np.asarray(v_sd), np.asarray(sd_b)) if len(v_sd) > 2 else float("nan")
            res.update({"spearman": float(np.mean(rho)) if rho else float("nan"), "spearman_states": len(rho),
                        "value_sd_median": float(np.median(v_sd)) if v_sd else float("nan"), "spread_gate_spearman": gate})
        out[name] = res
    return out


def breakdowns(states: Sequence[CandidateState], values: Sequence[np.ndarray] | None, objectives: Sequence[str], *, seed: int = 0) -> dict:
    """:func:`candidate_metrics` on subsets: by position, by prompt category, by π_ref mass of the
    candidates (below / above the median state)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(states):
        groups.setdefault(f"position {s.position}", []).append(i)
        groups.setdefault(f"category {s.category}", []).append(i)
    if states:
        med = float(np.median([s.top_k_mass for s in states]))
        for i, s in enumerate(states):
            groups.setdefault("top-k mass <= median" if s.top_k_mass <= med else "top-k mass > median", []).append(i)
    return {g: candidate_metrics([states[i] for i in ix], None if values is None else [values[i] for i in ix], objectives, seed=seed)
            for g, ix in sorted(groups.items())}


def _cell(d: Mapping | None) -> str:
    if not d or not d.get("pairs"):
        return "-"
    return f"{d['concordance']:.3f} ± {d['se']:.3f} ({d['pairs']})"


def render(summary: Mapping) -> str:
    """Markdown tables of a :func:`score_benchmark` summary."""
    cfg = summary["config"]
    unit = "next tokens (top-k of π_ref)" if cfg["chunk"] == 1 else f"chunks of {cfg['chunk']} tokens sampled from π_ref"
    lines = [f"# Candidate-level value benchmark: `{summary['values']}`", "",
             f"{summary['states']} states of {cfg['prompts']} `{cfg['dataset']}` {cfg['split']} prompts (positions {cfg['positions']}), "
             f"{cfg['k']} candidates each ({unit}), {cfg['rollouts']} π_ref rollouts per candidate to {cfg['max_new_tokens']} tokens, "
             "scored by the labelling rewards. Concordance ± standard error clustered by state (pairs).", "",
             "| objective | V on resolved pairs (\\|Δ\\| > 2 se) | V, all pairs | V vs half the rollouts | half vs half (ceiling) | Spearman / state "
             "| candidates' true sd (median) | states with signal (p<0.05) | V's sd over candidates (median) | ρ(V's sd, true sd) over states |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in summary["metrics"].items():
        lines.append(f"| {m} | {_cell(r.get('resolved'))} | {_cell(r.get('all_pairs'))} | {_cell(r.get('value_vs_half'))} | {_cell(r['half_vs_half'])} "
                     f"| {r.get('spearman', float('nan')):.3f} | {r['sd_between_median']:.4f} | {r['states_with_signal']:.2f} | {r.get('value_sd_median', float('nan')):.4f} "
                     f"| {r.get('spread_gate_spearman', float('nan')):.2f} |")
    lines += ["", "## Where the signal is", "",
              "| subset | objective | V on resolved pairs | half vs half | true sd (median) | states with signal |", "|---|---|---|---|---|---|"]
    for g, per in summary["breakdowns"].items():
        for m, r in per.items():
            lines.append(f"| {g} | {m} | {_cell(r.get('resolved'))} | {_cell(r['half_vs_half'])} | {r['sd_between_median']:.4f} | {r['states_with_signal']:.2f} |")
    lines += ["", "By candidate rank (V on resolved pairs): both in π_ref's top 2 / at least one below rank 2:", ""]
    for m, r in summary["metrics"].items():
        lines.append(f"- {m}: {_cell(r.get('resolved_top2'))} / {_cell(r.get('resolved_rest'))}")
    return "\n".join(lines) + "\n"


def score_benchmark(folder: str | Path, value_spec: str | Sequence[str] | None, *, seed: int = 0, name: str | None = None,
                    write: bool = True, partial: bool = False) -> dict:
    """Metrics of a value model on a collected benchmark -> summary dict (also written as
    ``scores-<name>.json/.md`` unless ``write`` is False).

    ``value_spec``: a folder or ``packaged:NAME`` with a head per benchmark objective; or several
    (e.g. one single-head model per objective, as policy iteration trains them), each objective read
    from the first that has it; None: the data's own figures only (noise ceiling, random effects).
    ``partial``: score only the benchmark objectives the model(s) have instead of refusing."""
    from ..provenance import write_json
    from ..values import ValueModel

    folder = Path(folder)
    objectives, states = read_candidates(folder)
    if not states:
        raise ValueError(f"{folder} holds no finished states; run the collection first")
    specs = [value_spec] if isinstance(value_spec, (str, Path)) else list(value_spec or [])
    values = None
    if specs:
        models = [ValueModel.load(str(sp)) for sp in specs]
        missing = [m for m in objectives if not any(m in vm.objectives for vm in models)]
        if partial and len(missing) < len(objectives):  # score the benchmark's objectives the model has (train --candidates)
            keep = [j for j, m in enumerate(objectives) if m not in missing]
            objectives = [objectives[j] for j in keep]
            states = [dataclasses.replace(st, rewards=st.rewards[:, :, keep]) for st in states]
            missing = []
        if missing:
            raise ValueError(f"value model(s) {[str(sp) for sp in specs]} have heads {[vm.objectives for vm in models]}; the benchmark scores "
                             f"{objectives} (missing {missing})")
        cols = {}
        for m in objectives:
            vm = next(vm for vm in models if m in vm.objectives)
            cols[m] = [v[:, 0] for v in value_of_candidates(vm, states, [m])]
        values = [np.stack([cols[m][i] for m in objectives], -1) for i in range(len(states))]
    label = ", ".join(str(sp) for sp in specs) or "none"
    summary = {"values": label, "config": json.loads((folder / "bench.json").read_text()), "states": len(states),
               "metrics": candidate_metrics(states, values, objectives, seed=seed), "breakdowns": breakdowns(states, values, objectives, seed=seed)}
    if write:
        name = name or (str(specs[0]) if len(specs) == 1 else "none" if not specs else "models").replace(":", "-").replace("/", "-").strip("-.")
        write_json(folder / f"scores-{name}.json", summary)
        (folder / f"scores-{name}.md").write_text(render(summary))
    return summary
