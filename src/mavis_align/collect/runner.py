"""Collection driver: prompts -> groups -> labelled trees -> one HDF5 file, resumable and
optionally spread over Ray workers.

Prompts are cut into fixed groups of ``group_size``; a group is the unit of work, of
randomness (its own ``torch.Generator`` seeded from (seed, group)), and of durability: each
finished group is written whole as ``<out>.parts/part-<group>.h5`` (temp file + rename), so a
collection killed at any moment, even by ``kill -9``, resumes with every finished tree and no
duplicate. When all groups are done the parts are merged into ``<out>`` and removed. Because a
group's trees depend only on (seed, group, prompts), local and Ray runs give the same trees.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .builder import GenPolicy, TreeConfig, build_trees
from .store import LabelledTrees, TreeFileError, read_trees, write_trees
from .tree import Tree, label_tree


@dataclass
class CollectSpec:
    """Everything that determines a collection (stored with it; resume requires the same spec)."""

    model: str = "smollm2-135m-instruct"
    values: list[str] = field(default_factory=list)  # [NAME=]PATH of value models tilting pi_gen
    weights: dict[str, float] | None = None
    rewards: list[str] = field(default_factory=lambda: ["helpful", "harmless", "humor"])
    dataset: str = "hh-mix"
    split: str = "train"
    limit: int | None = None
    data_seed: int = 0
    prompt_field: str = "prompt"
    chat: bool = True
    tree: TreeConfig = field(default_factory=TreeConfig)
    seed: int = 0
    group_size: int = 4
    val_fraction: float = 0.1
    device: str = "auto"  # where the workers' models run (see mavis_align.placement); one GPU per Ray worker
    dtype: str = "auto"

    def __post_init__(self) -> None:
        from ..placement import resolve_dtype

        if isinstance(self.tree, dict):
            self.tree = TreeConfig(**self.tree)
        self.device, self.dtype = str(self.device), str(self.dtype)
        if self.dtype != "auto":
            resolve_dtype(self.dtype)  # a bad name fails here, not in a worker
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.rewards:
            raise ValueError("a collection needs at least one reward to label leaves")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tree"] = self.tree.to_dict()
        return d


def group_generator(seed: int, group: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + group * 7919 + 12345) % (2**63 - 1))


def split_of(seed: int, prompt_index: int, val_fraction: float) -> int:
    """0 (train) or 1 (val), a deterministic coin per prompt."""
    return int(random.Random(f"{seed}:{prompt_index}").random() < val_fraction)


def label_trees(trees: Sequence[Tree], rewards, tokenizer) -> tuple[list[np.ndarray], list[np.ndarray], list[list[str]]]:
    """Reward every leaf's full response with every reward (batched), then average upwards."""
    leaf_refs, prompts, texts = [], [], []
    node_texts = [[""] * len(t.nodes) for t in trees]
    for ti, tree in enumerate(trees):
        for leaf in tree.leaves():
            text = tokenizer.decode(tree.response(leaf), skip_special_tokens=True).strip()
            leaf_refs.append((ti, leaf))
            prompts.append(tree.prompt)
            texts.append(text)
            node_texts[ti][leaf] = text
    scores = np.array([r(prompts, texts) for r in rewards], dtype=np.float64).T.reshape(len(texts), len(rewards))
    per_tree: list[dict[int, np.ndarray]] = [{} for _ in trees]
    for (ti, leaf), row in zip(leaf_refs, scores):
        per_tree[ti][leaf] = row
    values, lprs = [], []
    for tree, leaves in zip(trees, per_tree):
        v, l = label_tree(tree, leaves)
        values.append(v)
        lprs.append(l)
    return values, lprs, node_texts


class GroupWorker:
    """Loads the models and rewards once; turns a group of prompts into an in-memory tree file."""

    def __init__(self, spec: dict, threads: int | None = None):
        from ..decoding.decoder import parse_value_spec
        from ..models import load_causal_lm
        from ..rewards import get_rewards
        from ..values import ValueModel

        from ..placement import resolve

        if threads:
            torch.set_num_threads(threads)
        self.spec = CollectSpec(**spec)
        self.place = resolve(self.spec.device, self.spec.dtype)
        self.rewards = get_rewards(self.spec.rewards, device=self.place.device, dtype=self.place.dtype)
        pairs = [parse_value_spec(v) for v in self.spec.values]
        vms = [ValueModel.load(Path(p), device=self.place.device, dtype=self.place.dtype) for _, p in pairs]
        model, tokenizer = load_causal_lm(self.spec.model, device=self.place.device, dtype=self.place.dtype)
        self.tokenizer = tokenizer
        self.policy = GenPolicy(model, tokenizer, vms, [n for n, _ in pairs] if pairs else None, self.spec.weights)

    def run(self, group: int, prompts: list[tuple[int, str]]) -> tuple[bytes, dict]:
        from ..models import format_prompts

        t0 = time.perf_counter()
        formatted = format_prompts(self.tokenizer, [p for _, p in prompts], chat=self.spec.chat)
        items = [(i, p, self.tokenizer(f, add_special_tokens=False)["input_ids"]) for (i, p), f in zip(prompts, formatted)]
        trees = build_trees(self.policy, items, self.spec.tree, group_generator(self.spec.seed, group))
        gen_s = time.perf_counter() - t0
        values, lprs, texts = label_trees(trees, self.rewards, self.tokenizer)
        splits = [split_of(self.spec.seed, t.prompt_index, self.spec.val_fraction) for t in trees]
        buf = io.BytesIO()
        write_trees(buf, LabelledTrees(trees, values, lprs, splits, texts), [r.name for r in self.rewards], {"group": group})
        n_tokens = sum(len(n.tokens) for t in trees for n in t.nodes)
        return buf.getvalue(), {"group": group, "trees": len(trees), "tokens": n_tokens, "generate_s": gen_s, "total_s": time.perf_counter() - t0}


def _part_path(parts: Path, group: int) -> Path:
    return parts / f"part-{group:06d}.h5"


def _write_part(parts: Path, group: int, payload: bytes) -> None:
    path = _part_path(parts, group)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _comparable_spec(spec: dict) -> dict:
    """A spec.json with local paths made absolute, so a run resumes from another working directory
    (``runs/x`` and ``/home/me/runs/x`` name the same value model), and tree settings added since it
    was written at their defaults (so an unfinished run of older code resumes)."""
    def absolute(path: str) -> str:
        p = Path(path).expanduser()
        return str(p.resolve()) if p.exists() else path

    out = {k: v for k, v in spec.items() if k not in ("device", "dtype")}  # where it runs: may change on resume
    values = []
    for v in spec.get("values", []):
        name, sep, path = v.partition("=") if "=" in v else ("", "", v)
        values.append(f"{name}{sep}{absolute(path)}")
    out["values"] = values
    if isinstance(out.get("tree"), dict):
        out["tree"] = {**TreeConfig().to_dict(), **out["tree"]}
    for key in ("model", "dataset"):
        if isinstance(out.get(key), str):
            out[key] = absolute(out[key])
    return out


def collect(
    spec: CollectSpec,
    out: str | Path,
    prompts: Sequence[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    backend: str = "local",
    workers: int = 2,
    ray_address: str | None = None,
    progress: bool = True,
    max_groups: int | None = None,
) -> Path | None:
    """Collect one tree per prompt into ``out``.

    Args:
        prompts: the user prompts, in order (their position is the prompt index).
        resume: continue a previous run of the same spec from its finished groups.
        overwrite: discard an existing ``out`` / unfinished run first.
        backend: ``"local"`` (this process) or ``"ray"`` (``workers`` actors; ``ray_address``
            joins an existing cluster).
        max_groups: stop after this many new groups (leaves the run resumable; for tests and
            time-boxed sessions). Returns None when stopped early.
    Returns:
        The path of the finished tree file.
    """
    from ..provenance import run_record

    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    spec_json = json.dumps(_comparable_spec(spec.to_dict()), sort_keys=True)
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        out.unlink(missing_ok=True)
    if out.exists():
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if parts.exists():
        saved = (parts / "spec.json").read_text() if (parts / "spec.json").exists() else None
        if not resume:
            raise FileExistsError(f"an unfinished collection is in {parts}: pass --resume to continue it or --overwrite to start over")
        if saved is not None:
            old, new = _comparable_spec(json.loads(saved)), json.loads(spec_json)
            if old != new:
                changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
                raise ValueError(f"--resume: the settings differ from the unfinished run in {parts} (its spec.json) in {', '.join(changed)}; "
                                 "use the same settings or --overwrite")
    parts.mkdir(parents=True, exist_ok=True)
    (parts / "spec.json").write_text(spec_json + "\n")
    for stale in parts.glob("*.tmp"):
        stale.unlink()  # a part being written when the run was killed: never renamed, so not done

    groups = [list(enumerate(prompts))[s : s + spec.group_size] for s in range(0, len(prompts), spec.group_size)]
    done = {g for g in range(len(groups)) if _part_path(parts, g).exists()}
    for g in sorted(done):  # a part only counts as done when it reads back whole (checksums included)
        try:
            read_trees(_part_path(parts, g))
        except TreeFileError as err:
            print(f"collect: part {g} is corrupt and will be collected again ({err})", flush=True)
            _part_path(parts, g).unlink()
            done.discard(g)
    todo = [g for g in range(len(groups)) if g not in done]
    if max_groups is not None:
        todo = todo[:max_groups]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), initial=sum(len(groups[g]) for g in done), desc="collect", unit="tree")
    t0, tokens = time.perf_counter(), 0

    def finished(payload: bytes, stats: dict) -> None:
        nonlocal tokens
        _write_part(parts, stats["group"], payload)
        tokens += stats["tokens"]
        if bar is not None:
            bar.update(stats["trees"])
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}")

    if backend == "local":
        if todo:
            worker = GroupWorker(spec.to_dict())
            for g in todo:
                finished(*worker.run(g, groups[g]))
    elif backend == "ray":
        _run_ray(spec, groups, todo, workers, ray_address, finished)
    else:
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if bar is not None:
        bar.close()
    remaining = [g for g in range(len(groups)) if not _part_path(parts, g).exists()]
    if remaining:
        return None
    merged = LabelledTrees.concat([read_trees(_part_path(parts, g))[0] for g in range(len(groups))])
    attrs = run_record(spec.to_dict(), spec.seed)
    from ..rewards import reward_name

    write_trees(out, merged, [reward_name(r) for r in spec.rewards], {**attrs, "n_trees": len(merged), "backend": backend})
    shutil.rmtree(parts)
    return out


def _run_ray(spec: CollectSpec, groups, todo, workers: int, address: str | None, finished) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
    except ImportError as err:
        raise ImportError("the ray backend needs Ray: pip install 'mavis-align[ray]'") from err
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        from ..placement import resolve_device

        # one GPU per worker when the spec's models run on CUDA (Ray sets each actor's visible GPU)
        gpus = 1 if resolve_device(spec.device).type == "cuda" else 0
        remote_cls = ray.remote(num_cpus=1, num_gpus=gpus)(GroupWorker)
        actors = [remote_cls.remote(spec.to_dict(), 1) for _ in range(min(workers, max(len(todo), 1)))]
        queue = list(todo)
        pending = {}
        for actor in actors:
            if queue:
                g = queue.pop(0)
                pending[actor.run.remote(g, groups[g])] = actor
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            actor = pending.pop(ref)
            payload, stats = ray.get(ref)
            finished(payload, stats)
            if queue:
                g = queue.pop(0)
                pending[actor.run.remote(g, groups[g])] = actor
    finally:
        if started:
            ray.shutdown()


def relabel(path: str | Path, rewards: Sequence[str], out: str | Path | None = None) -> Path:
    """Re-score the leaves of an existing tree file with ``rewards`` (no generation) and
    recompute inner values. Objectives already present are replaced; new ones are appended."""
    from ..rewards import get_rewards

    path = Path(path)
    data, objectives, attrs = read_trees(path)
    fns = get_rewards(list(rewards))
    new_obj = list(objectives) + [r.name for r in fns if r.name not in objectives]
    refs = [(ti, leaf) for ti, tree in enumerate(data.trees) for leaf in tree.leaves()]
    prompts = [data.trees[ti].prompt for ti, _ in refs]
    texts = [data.texts[ti][leaf] for ti, leaf in refs]
    scores = {r.name: r(prompts, texts) for r in fns}
    leaf_vals: list[dict[int, np.ndarray]] = [{} for _ in data.trees]
    for k, (ti, leaf) in enumerate(refs):
        row = np.zeros(len(new_obj))
        for j, name in enumerate(new_obj):
            row[j] = scores[name][k] if name in scores else data.values[ti][leaf, objectives.index(name)]
        leaf_vals[ti][leaf] = row
    data.values = [label_tree(tree, leaf_vals[ti])[0] for ti, tree in enumerate(data.trees)]
    attrs = dict(attrs)
    attrs["relabelled"] = {"rewards": list(rewards), "from_objectives": objectives}
    target = Path(out) if out else path
    write_trees(target, data, new_obj, attrs)
    return target
