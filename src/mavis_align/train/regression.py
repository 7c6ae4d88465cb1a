"""Value regression on rollout trees (paper eq. 6, App. F.4):

    L(x, s, Y) = (V(s) - mean_{y in Y}[R(y|x) - zeta · log(pi_gen(y|x) / pi_ref(y|x))])^2

read at the last token of s, one head per objective, MSE averaged over heads. Adafactor with
weight decay (transformers' implementation), linear warm-up then linear decay, gradient
accumulation, optional LoRA, validation MSE per objective (optionally on incomplete sequences
only), the best checkpoint kept, resume from the latest checkpoint, metrics as JSONL, a progress
bar. Checkpoints hold safetensors + JSON only (no pickle).

Output folder::

    out/
      best/            value model with the lowest validation MSE (ValueModel folder)
      final/           value model after the last step
      checkpoint/      latest resumable state: model.safetensors, optimizer.safetensors,
                       optimizer.json, trainer.json
      metrics.jsonl    {"step", "epoch", "loss", "lr"} per step, {"step", "val_mse", ...} per eval
      run.json         resolved config, seed, versions, git commit
      result.json      summary (best val MSE per objective, steps, seconds)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..collect.dataset import KL_ESTIMATORS, NodeExample, collate, node_examples
from ..collect.store import LabelledTrees, read_trees
from ..values import ValueModel


@dataclass
class TrainConfig:
    """Value-model regression settings (defaults suit the small from-scratch default backbone).

    Attributes:
        lr: peak learning rate (paper: 2e-5 / 4e-5 for LoRA on TinyLlama; a 6.8M model trained
            from scratch needs far more).
        weight_decay: Adafactor weight decay (paper 0.002).
        warmup_steps: linear warm-up (paper: 100 batches for iteration 0, none later).
        batch_size, grad_accum: examples per optimizer step = batch_size · grad_accum.
        epochs: passes over the training nodes (fractions allowed).
        max_steps: stop after this many optimizer steps (overrides epochs when smaller).
        zeta: KL penalty multiplier of eq. 6.
        kl_target: which log-ratio zeta multiplies: "future" (tokens after s; the soft Q-function
            of the theory, default) or "response" (the whole response, eq. 6 as printed); see
            :mod:`mavis_align.collect.dataset`.
        kl_estimator: how that log-ratio is estimated: "sampled" (the sampled tokens' log-ratios, eq. 6
            as printed) or "expected" (each token's log-ratio replaced by its step's KL, recorded at
            collection: same expectation, less variance); only read when zeta > 0.
        ridge_kl: with solver "ridge" and zeta > 0: "joint" fits each head to eq. 6's target with one
            cross-validated penalty; "separate" fits the MC values and the KL term each with its own
            penalty and combines the linear heads as w_values - zeta · w_KL (the same eq. 6 target,
            which is linear in both; the reward part is then not shrunk with the larger KL part).
        keep_leaf_fraction: fraction of leaves kept in training (App. F.5: one half).
        val_drop_leaves: validate on incomplete sequences only.
        eval_every: optimizer steps between validations and checkpoints (0: only at the end).
        sibling_weight: weight of an added loss on sibling differences,
            ((V(a) - V(b)) - (t(a) - t(b)))² over pairs of training nodes with one parent: the
            within-state order that the tilt uses (0: plain eq. 6).
        sibling_pairs: sibling pairs per optimizer step for that loss.
        solver: "sgd" (Adafactor steps, any model) or "ridge": for a frozen trunk with linear heads,
            the heads in closed form (ridge regression on standardised features), the penalty of each
            head chosen by 5-fold cross-validation over train trees (held-out trees are not used).
        gradient_checkpointing: recompute the backbone's activations in the backward pass instead
            of storing them (large trained backbones; no effect on a frozen trunk).
        lora_rank: add LoRA adapters of this rank (None: train all weights); lora_alpha, lora_dropout.
        seed: data order, leaf subsampling, dropout.
    """

    lr: float = 1e-3
    weight_decay: float = 0.002
    warmup_steps: int = 20
    batch_size: int = 16
    grad_accum: int = 1
    epochs: float = 2.0
    max_steps: int | None = None
    zeta: float = 0.0
    kl_target: str = "future"
    kl_estimator: str = "sampled"
    ridge_kl: str = "joint"
    keep_leaf_fraction: float = 0.5
    val_drop_leaves: bool = False
    eval_every: int = 50
    sibling_weight: float = 0.0
    sibling_pairs: int = 64
    solver: str = "sgd"
    gradient_checkpointing: bool = False
    lora_rank: int | None = None
    lora_alpha: float = 256.0
    lora_dropout: float = 0.2
    seed: int = 0
    objectives: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.zeta < 0:
            raise ValueError(f"zeta must be >= 0, got {self.zeta}")
        if self.solver not in ("sgd", "ridge"):
            raise ValueError(f"solver must be 'sgd' or 'ridge', got {self.solver!r}")
        if self.sibling_weight < 0 or self.sibling_pairs < 1:
            raise ValueError(f"sibling_weight must be >= 0 and sibling_pairs >= 1, got {self.sibling_weight}, {self.sibling_pairs}")
        if self.kl_target not in ("future", "response"):
            raise ValueError(f"kl_target must be 'future' or 'response', got {self.kl_target!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {list(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.ridge_kl not in ("joint", "separate"):
            raise ValueError(f"ridge_kl must be 'joint' or 'separate', got {self.ridge_kl!r}")


def _lpr_estimator(zeta: float, kl_estimator: str) -> str:
    """The estimator examples are built with: LPR only enters the targets when zeta > 0 (so pi_ref
    trees from before per-step KLs were recorded still train and score at zeta = 0)."""
    return kl_estimator if zeta > 0 else "sampled"


def _load_examples(trees: Sequence[str | Path | LabelledTrees], split: str, cfg: TrainConfig, objectives: list[str], drop_leaves: bool, keep: float):
    """Examples of ``split`` from every tree file, with targets restricted to ``objectives``."""
    sources = []
    for src in trees:
        if isinstance(src, LabelledTrees):
            data, names = src, list(objectives)
        else:
            data, names, _ = read_trees(src)
        missing = [o for o in objectives if o not in names]
        if missing:
            raise ValueError(f"tree file {src} has no labels for {missing} (it has {names}); run `mavis-align label` first")
        sources.append((data, names))
    return split_examples(sources, split, objectives, drop_leaves, keep, cfg.seed, _lpr_estimator(cfg.zeta, cfg.kl_estimator))


def weights_vector(weights: dict[str, float] | str | None, objectives: Sequence[str]) -> np.ndarray | None:
    """A tree file's collecting weights (:attr:`LabelledTrees.weights`) as [M] over ``objectives``
    (summing to 1); None for pi_ref trees; NaNs when the λ is unknown or puts weight on other
    objectives (then the trees belong to no λ of this model: an error for a conditioned model)."""
    if weights is None:
        return None
    if isinstance(weights, str) or any(w > 0 and n not in objectives for n, w in weights.items()):
        return np.full(len(objectives), np.nan)
    v = np.array([float(weights.get(o, 0.0)) for o in objectives])
    return v / v.sum() if v.sum() > 0 else np.full(len(objectives), np.nan)


def split_examples(sources: Sequence[tuple[LabelledTrees, list[str]]], split: str, objectives: list[str], drop_leaves: bool, keep: float,
                   seed: int, kl_estimator: str = "sampled") -> list[NodeExample]:
    """Examples of ``split`` from loaded (trees, label names) pairs, targets restricted to ``objectives``
    (LPR by ``kl_estimator``, see :func:`~mavis_align.collect.dataset.node_examples`)."""
    out: list[NodeExample] = []
    tree_offset = 0  # tree ids unique across files (siblings are grouped by tree and parent)
    for i, (data, names) in enumerate(sources):
        cols = [names.index(o) for o in objectives]
        lam = weights_vector(getattr(data, "weights", None), objectives)
        ex, _ = node_examples(data, split, keep_leaf_fraction=keep, drop_leaves=drop_leaves, seed=seed + i, kl_estimator=kl_estimator)
        out.extend(replace(e, value=e.value[cols], tree=e.tree + tree_offset, weights=lam) for e in ex)
        tree_offset += len(data.trees)
    return out


def sample_simplex(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """[n, m] objective weights for training a preference-conditioned model on pi_ref trees: a
    vertex of the simplex (one objective) with probability 1/4, else uniform on the simplex
    (Dirichlet(1): normalised exponentials)."""
    e = -torch.log(torch.rand(n, m, generator=generator, dtype=torch.float64).clamp(min=1e-12))
    lam = e / e.sum(-1, keepdim=True)
    vertex = torch.rand(n, generator=generator) < 0.25
    pick = torch.nn.functional.one_hot(torch.randint(m, (n,), generator=generator), m).double()
    return torch.where(vertex[:, None], pick, lam).float()


def example_weights(examples: Sequence[NodeExample], m: int, generator: torch.Generator) -> torch.Tensor:
    """[N, M] the λ each example is trained (or scored) at: its tree's collecting λ, or one drawn by
    :func:`sample_simplex` for pi_ref trees (a value of pi_ref holds at every λ)."""
    drawn = sample_simplex(len(examples), m, generator)
    rows = []
    for e, d in zip(examples, drawn):
        if e.weights is None:
            rows.append(d)
        elif np.isnan(e.weights).any():
            raise ValueError("trees collected by MAVIS at unrecorded weights, or with weight on objectives this model lacks, "
                             "cannot train a preference-conditioned value model (collect with explicit --weights over its objectives)")
        else:
            rows.append(torch.tensor(e.weights, dtype=torch.float32))
    return torch.stack(rows) if rows else torch.zeros(0, m)


EVAL_WEIGHTS_SEED = 20260226  # the fixed λ draw a conditioned model is validated at (same for every run)


def _last_token_values(model: ValueModel, batch: dict, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, M] values at the last real token of right-padded sequences (``weights`` [B, M]: the λ of
    a preference-conditioned model)."""
    mask = batch["attention_mask"]
    values = model(batch["input_ids"], attention_mask=mask, weights=weights, prompt_lengths=batch.get("prompt_length")).values
    last = mask.sum(-1) - 1
    return values[torch.arange(values.shape[0]), last]


def prefix_carriers(examples: Sequence[NodeExample]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Few sequences that hold every example as a prefix: a causal trunk's hidden state at the last
    token of an example equals its state at that position of any longer sequence it starts.

    Returns:
        (carriers, where): carrier token lists, and per example (carrier index, position).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    carriers: list[list[int]] = []
    by_tree: dict[int, list[int]] = {}
    where: list[tuple[int, int]] = [(0, 0)] * len(examples)
    for i in order:
        ids = examples[i].input_ids
        for c in by_tree.get(examples[i].tree, []):
            if carriers[c][: len(ids)] == ids:
                where[i] = (c, len(ids) - 1)
                break
        else:
            carriers.append(list(ids))
            by_tree.setdefault(examples[i].tree, []).append(len(carriers) - 1)
            where[i] = (len(carriers) - 1, len(ids) - 1)
    return carriers, where


_FEATURE_MEMO: dict[tuple, torch.Tensor] = {}  # (trunk fingerprint, examples digest) -> features; the last few only


def _examples_digest(examples: Sequence[NodeExample]) -> str:
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def trunk_features(model: ValueModel, examples: Sequence[NodeExample], pad_id: int, *, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """:func:`compute_trunk_features`, remembered for a frozen trunk: the value models of several
    objectives on one trunk and one tree file (iteration 0) compute the features once."""
    if model.trunk_key is None:
        return compute_trunk_features(model, examples, pad_id, batch_size=batch_size, progress=progress)
    key = (model.trunk_key, _examples_digest(examples))
    if key not in _FEATURE_MEMO:
        while len(_FEATURE_MEMO) >= 4:
            _FEATURE_MEMO.pop(next(iter(_FEATURE_MEMO)))
        _FEATURE_MEMO[key] = compute_trunk_features(model, examples, pad_id, batch_size=batch_size, progress=progress)
    return _FEATURE_MEMO[key]


@torch.no_grad()
def compute_trunk_features(model: ValueModel, examples: Sequence[NodeExample], pad_id: int, *, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Backbone states at the last token of every example -> [N, 4, H] float32: the state itself,
    the mean state of the example's tokens, the mean state of its prompt and of its response tokens
    (what :attr:`ValueModel.pool` reads).

    Runs each root-to-leaf sequence once (see :func:`prefix_carriers`), longest first.
    """
    from ..values import prompt_response_means, running_mean

    carriers, where = prefix_carriers(examples)
    prompt_length = [0] * len(carriers)
    wanted: list[list[int]] = [[] for _ in carriers]
    for e, (c, pos) in zip(examples, where):
        prompt_length[c] = e.prompt_length
        wanted[c].append(pos)
    device = next(model.backbone.parameters()).device
    picked: list[dict[int, torch.Tensor]] = [{} for _ in carriers]
    was_training = model.training
    model.eval()
    order = sorted(range(len(carriers)), key=lambda c: -len(carriers[c]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="trunk features", unit="seq")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = len(carriers[idx[0]])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, c in enumerate(idx):
            ids[r, : len(carriers[c])] = torch.tensor(carriers[c])
            mask[r, : len(carriers[c])] = 1
        mask = mask.to(device)
        out = model.backbone(input_ids=ids.to(device), attention_mask=mask).last_hidden_state
        mean = running_mean(out, mask)
        prompt, response = prompt_response_means(out, mask, torch.tensor([prompt_length[c] for c in idx]))
        for r, c in enumerate(idx):
            pos = torch.tensor(sorted(set(wanted[c])), device=out.device)
            rows = torch.stack([out[r, pos].float(), mean[r, pos], prompt[r, pos], response[r, pos]], dim=1).cpu()
            picked[c] = dict(zip(pos.tolist(), rows))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return torch.stack([picked[c][p] for c, p in where])


def values_from_features(model: ValueModel, features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 4, H] from :func:`trunk_features` -> [N, M] (``weights`` [N, M]: λ of a conditioned model)."""
    return model.values_from_hidden(features[:, 0], features[:, 1], weights, features[:, 2], features[:, 3])


def head_inputs(model: ValueModel, features: torch.Tensor) -> torch.Tensor:
    """[N, 4, H] from :func:`trunk_features` -> what ``model``'s heads read, [N, D]."""
    return model.head_input(features[:, 0], features[:, 1], features[:, 2], features[:, 3])


def fit_pool_centre(model: ValueModel, features: torch.Tensor) -> None:
    """A "prompt+response" model trained for the first time centres its interaction features on
    the training features' mean prompt and response states (kept when it is trained further, so a
    model initialised from the previous iteration reads the same features)."""
    if model.needs_pool_centre:
        model.set_pool_centre(features[:, 2].mean(0), features[:, 3].mean(0))


@torch.no_grad()
def predict_values(model: ValueModel, examples: Sequence[NodeExample], pad_id: int, *, batch_size: int = 32, features: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """V at the last token of every example -> [N, M] float32 (from ``features`` [N, 4, H] of
    :func:`trunk_features` when given; ``weights`` [N, M]: the λ of a conditioned model)."""
    if not examples:
        return torch.zeros(0, len(model.objectives))
    was_training = model.training
    model.eval()
    if features is not None:
        head_device = next(model.head.parameters()).device
        out = values_from_features(model, features.to(head_device), None if weights is None else weights.to(head_device)).cpu()
    else:
        device = next(model.parameters()).device
        parts = []
        for s in range(0, len(examples), batch_size):
            b = collate(examples[s : s + batch_size], pad_id)
            w = None if weights is None else weights[s : s + batch_size].to(device)
            parts.append(_last_token_values(model, {k: v.to(device) for k, v in b.items()}, w).cpu())
        out = torch.cat(parts)
    model.train(was_training)
    return out


@torch.no_grad()
def objective_values(model: ValueModel, examples: Sequence[NodeExample], pad_id: int, *, features: torch.Tensor | None = None) -> torch.Tensor:
    """Each objective's own value of every example -> [N, M]: the heads of a per-objective model;
    for a preference-conditioned one, column m is V(s, e_m) (all weight on objective m)."""
    if not model.conditioned:
        return predict_values(model, examples, pad_id, features=features)
    m = len(model.objectives)
    cols = []
    for j in range(m):
        onehot = torch.zeros(len(examples), m)
        onehot[:, j] = 1.0
        cols.append(predict_values(model, examples, pad_id, features=features, weights=onehot)[:, j])
    return torch.stack(cols, dim=1) if examples else torch.zeros(0, m)


def example_targets(examples: Sequence[NodeExample], zeta: float, kl_target: str = "future") -> torch.Tensor:
    """[N, M] regression targets of eq. 6."""
    return torch.tensor(np.stack([e.target(zeta, kl_target) for e in examples]), dtype=torch.float32)


@torch.no_grad()
def evaluate_mse(model: ValueModel, examples: Sequence[NodeExample], pad_id: int, zeta: float, batch_size: int = 32, kl_target: str = "future",
                 features: torch.Tensor | None = None) -> dict:
    """Validation MSE per objective and overall (mean over heads)."""
    if not examples:
        return {}
    if model.conditioned:  # the combined value at a fixed draw of λ (collecting λ for MAVIS trees)
        lam = example_weights(examples, len(model.objectives), torch.Generator().manual_seed(EVAL_WEIGHTS_SEED))
        pred = predict_values(model, examples, pad_id, batch_size=batch_size, features=features, weights=lam)
        err = ((lam * (pred - example_targets(examples, zeta, kl_target))).sum(-1) ** 2).mean().item()
        return {"val_mse": err, "val_mse_per_objective": {}, "val_examples": len(examples)}
    pred = predict_values(model, examples, pad_id, batch_size=batch_size, features=features)
    per = ((pred - example_targets(examples, zeta, kl_target)) ** 2).mean(0).tolist()
    return {"val_mse": float(np.mean(per)), "val_mse_per_objective": dict(zip(model.objectives, per)), "val_examples": len(examples)}


@torch.no_grad()
def value_quality(model: ValueModel, examples: Sequence[NodeExample], pad_id: int, *, zeta: float = 0.0, kl_target: str = "future",
                  features: torch.Tensor | None = None) -> dict:
    """Held-out R² and sibling concordance per objective (:mod:`mavis_align.train.quality`)."""
    from .quality import quality_report

    if not examples:
        return {"examples": 0, "trees": 0, "per_objective": {}}
    pred = objective_values(model, examples, pad_id, features=features)
    groups = [(e.tree, e.parent) for e in examples]
    targets = example_targets(examples, zeta, kl_target)
    report = quality_report(pred.numpy(), targets.numpy(), groups, model.objectives)
    if model.conditioned:  # also of the combined value V(s, λ) at the validation draw of λ
        lam = example_weights(examples, len(model.objectives), torch.Generator().manual_seed(EVAL_WEIGHTS_SEED))
        mixed = (lam * predict_values(model, examples, pad_id, features=features, weights=lam)).sum(-1, keepdim=True)
        rep = quality_report(mixed.numpy(), (lam * targets).sum(-1, keepdim=True).numpy(), groups, ["mixed"])
        report["mixed_weights"] = rep["per_objective"]["mixed"]
    return report


def reward_quality(model: ValueModel, examples: Sequence[NodeExample], pad_id: int, config: TrainConfig, *,
                   features: torch.Tensor | None = None) -> dict | None:
    """With a KL penalty (``config.zeta`` > 0), the quality against the Monte-Carlo reward values
    alone (ζ = 0) beside the one against the eq. 6 targets: siblings' targets also differ by ζ times
    the sampled log-ratios of their continuations, which can hide whether V still orders the
    rewards of one state's continuations (benchmarks/iteration_targets.py). None without a penalty."""
    if not examples or not config.zeta:
        return None
    return value_quality(model, examples, pad_id, zeta=0.0, kl_target=config.kl_target, features=features)


def print_quality(quality: dict, quality_reward: dict | None) -> None:
    """The console lines of a training run's held-out quality (and, with ζ > 0, against the rewards alone)."""
    from .quality import format_quality

    print(format_quality(quality))
    if quality_reward:
        print("against the MC reward values alone (ζ = 0):\n" + format_quality(quality_reward))


def held_out_quality(model: ValueModel, trees: Sequence[str | Path], *, zeta: float = 0.0, kl_target: str = "future",
                     kl_estimator: str = "sampled") -> dict:
    """:func:`value_quality` of every head of ``model`` on the val split of the tree files that carry
    that head's labels (files of later iterations are often labelled with one objective only).
    Heads whose labels live in the same files share one prediction pass."""
    from .quality import quality_report

    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    report: dict = {"examples": 0, "trees": 0, "per_objective": {}}
    loaded = [read_trees(path)[:2] for path in trees]
    preds: dict[tuple[int, ...], torch.Tensor] = {}
    for m, name in enumerate(model.objectives):
        files = tuple(i for i, (_, names) in enumerate(loaded) if name in names)
        examples = split_examples([loaded[i] for i in files], "val", [name], False, 1.0, 0, _lpr_estimator(zeta, kl_estimator))
        if not examples:
            continue
        if files not in preds:
            preds[files] = objective_values(model, examples, pad_id)
        rep = quality_report(preds[files][:, [m]].numpy(), example_targets(examples, zeta, kl_target).numpy(),
                             [(e.tree, e.parent) for e in examples], [name])
        report["per_objective"][name] = rep["per_objective"][name]
        report["examples"] = max(report["examples"], rep["examples"])
        report["trees"] = max(report["trees"], rep["trees"])
    return report


def recover_dir(target: Path) -> None:
    """Finish a swap of :func:`_atomic_dir` that a kill interrupted between its two renames: then
    ``target`` is missing and ``target.old`` holds its last complete version, which goes back."""
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)


def _atomic_dir(target: Path, write) -> None:
    """Replace the directory ``target`` by what ``write(tmp)`` writes, so that at every instant either
    ``target`` or ``target.old`` is a complete version (see :func:`recover_dir`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        old = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, groups: Sequence[int], alphas: Sequence[float] = RIDGE_ALPHAS, *, folds: int = 5,
              seed: int = 0, pairs: Sequence[tuple[int, int]] = (), pair_weight: float = 0.0,
              ) -> tuple[torch.Tensor, torch.Tensor, list[float], list[list[float]]]:
    """Ridge regression of ``y`` [N, M] on ``x`` [N, D] with one penalty per output column, each chosen
    by ``folds``-fold cross-validation over ``groups`` (examples of one group stay in one fold).

    Features are standardised before the penalty applies; the returned weight [M, D] and bias [M]
    act on raw ``x`` (pred = x @ weight.T + bias). With ``pair_weight`` s > 0 the fit also minimises
    s · Σ over ``pairs`` (i, j) of ((x_i − x_j)·w − (y_i − y_j))² (pairs with both ends in the training
    fold), e.g. sibling differences (``benchmarks/sibling_ridge.py``); the CV score stays the level MSE.
    Returns:
        (weight, bias, chosen alpha per column, CV MSE [alpha][column]).
    """
    x, y = x.double(), y.double()
    ids = sorted(set(int(g) for g in groups))
    if len(ids) < 2:
        raise ValueError("ridge cross-validation needs examples from at least 2 trees")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {ids[j]: i % min(folds, len(ids)) for i, j in enumerate(order)}
    fold = torch.tensor([fold_of[int(g)] for g in groups])
    pi = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    pj = torch.tensor([b for _, b in pairs], dtype=torch.long)

    def solve(keep: torch.Tensor, ys: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xs = x[keep]
        mu, sd = xs.mean(0), xs.std(0).clamp(min=1e-6)
        z = (xs - mu) / sd
        ym = ys[keep].mean(0)
        lhs, rhs = z.T @ z, z.T @ (ys[keep] - ym)
        both = keep[pi] & keep[pj] if pair_weight > 0 else torch.zeros(0, dtype=torch.bool)
        if bool(both.any()):
            d = (x[pi[both]] - x[pj[both]]) / sd
            lhs, rhs = lhs + pair_weight * d.T @ d, rhs + pair_weight * d.T @ (ys[pi[both]] - ys[pj[both]])
        w = torch.linalg.solve(lhs + alpha * torch.eye(z.shape[1], dtype=z.dtype), rhs)
        return w, mu, sd, ym

    cv = []
    for alpha in alphas:
        sq = torch.zeros(y.shape[1], dtype=torch.float64)
        for f in range(int(fold.max()) + 1):
            te = fold == f
            w, mu, sd, ym = solve(~te, y, alpha)
            sq += (((x[te] - mu) / sd @ w + ym - y[te]) ** 2).sum(0)
        cv.append((sq / len(y)).tolist())
    best = [alphas[min(range(len(alphas)), key=lambda a: cv[a][m])] for m in range(y.shape[1])]
    weight, bias = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64), torch.zeros(y.shape[1], dtype=torch.float64)
    everything = torch.ones(len(y), dtype=torch.bool)
    for m, alpha in enumerate(best):
        w, mu, sd, ym = solve(everything, y[:, m : m + 1], alpha)
        weight[m] = (w[:, 0] / sd)
        bias[m] = ym[0] - (mu / sd) @ w[:, 0]
    return weight.float(), bias.float(), best, cv


def _train_ridge(model: ValueModel, train, val, train_feats, val_feats, train_targets, out: Path, config: TrainConfig, pad_id: int,
                 feature_seconds: float, progress: bool, tree_files: list[str], tracker=None) -> dict:
    """The heads of a frozen-trunk linear value model in closed form (see :func:`fit_ridge`)."""
    from ..provenance import write_run_record

    if not model.frozen_backbone or model.head_hidden or model.conditioned:
        raise ValueError("solver='ridge' needs a frozen trunk (backbone trunk:N) and linear heads (head_hidden 0, not preference-conditioned)")
    if (out / "result.json").exists():
        raise FileExistsError(f"{out} already holds a trained model (use another folder)")
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = {**asdict(config), "objectives": list(model.objectives)}
    write_run_record(out, {"train": cfg_dict, "train_examples": len(train), "val_examples": len(val), "model": model.meta, "trees": tree_files},
                     config.seed)
    t0 = time.perf_counter()
    x = head_inputs(model, train_feats).cpu()
    groups = [e.tree for e in train]
    if config.ridge_kl == "separate" and config.zeta > 0:
        values = example_targets(train, 0.0)
        kl = torch.tensor([[e.kl_term(config.kl_target)] for e in train], dtype=torch.float32)
        weight, bias, alphas, cv = fit_ridge(x, values, groups, seed=config.seed)
        w_kl, b_kl, alpha_kl, _ = fit_ridge(x, kl, groups, seed=config.seed)
        weight, bias = weight - config.zeta * w_kl, bias - config.zeta * b_kl  # [M, D] - ζ·[1, D]: eq. 6's target, linear in both parts
        model.meta["ridge_alpha_kl"] = alpha_kl[0]
    else:
        weight, bias, alphas, cv = fit_ridge(x, train_targets.cpu(), groups, seed=config.seed)
    with torch.no_grad():
        model.head.weight.copy_(weight.to(model.head.weight))
        model.head.bias.copy_(bias.to(model.head.bias))
    model.meta["ridge_alpha"] = dict(zip(model.objectives, alphas))
    _atomic_dir(out / "best", lambda d: model.save(d))
    _atomic_dir(out / "final", lambda d: model.save(d))
    final_val = evaluate_mse(model, val, pad_id, config.zeta, kl_target=config.kl_target, features=val_feats) if val else None
    quality = value_quality(model, val, pad_id, zeta=config.zeta, kl_target=config.kl_target, features=val_feats) if val else None
    quality_reward = reward_quality(model, val, pad_id, config, features=val_feats)
    with (out / "metrics.jsonl").open("w") as f:
        for alpha, row in zip(RIDGE_ALPHAS, cv):
            f.write(json.dumps({"ridge_alpha": alpha, "cv_mse_per_objective": dict(zip(model.objectives, row))}) + "\n")
            if tracker is not None:
                tracker.log({"ridge_alpha": alpha, "cv_mse": dict(zip(model.objectives, row))})
    result = {
        "objectives": list(model.objectives), "solver": "ridge", "steps": 0, "train_examples": len(train), "val_examples": len(val),
        "ridge_alpha": model.meta["ridge_alpha"], "best_val_mse": final_val["val_mse"] if final_val else None, "best_step": 0,
        "seconds_this_run": round(time.perf_counter() - t0 + feature_seconds, 2), "feature_seconds": round(feature_seconds, 2),
        "final_val": final_val, "quality": quality, "quality_reward": quality_reward,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if tracker is not None:
        tracker.log({"quality": (quality or {}).get("per_objective", {}), "val_mse": result["best_val_mse"]})
    if progress and quality:
        print_quality(quality, quality_reward)
    return result


def _trainable_state(model: ValueModel) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: everything but a frozen backbone."""
    skip = "backbone." if model.frozen_backbone else None
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}


def _load_trainable(model: ValueModel, state: dict[str, torch.Tensor]) -> None:
    expected = set(_trainable_state(model))
    if set(state) != expected:
        raise ValueError(f"checkpoint holds {sorted(set(state) ^ expected)[:5]}... that do not match this model's trainable weights")
    model.load_state_dict(state, strict=False)


def _save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (everything else): no pickle."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{key}"] = val.detach().contiguous()
            else:
                scalars[f"{pid}.{key}"] = val
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def _load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    meta = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def enable_checkpointing(model: ValueModel) -> None:
    """Gradient (activation) checkpointing of the value model's transformer backbone."""
    net = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
    kwargs = {"use_reentrant": False}  # no need for inputs that require grad (frozen embeddings, LoRA)
    if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.x
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train_value_model(
    model: ValueModel,
    trees: Sequence[str | Path | LabelledTrees],
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    tracker=None,
) -> dict:
    """Fit ``model``'s heads (by objective name) to the trees' targets; see the module docstring.

    Args:
        model: the value model to train (its heads name the objectives; initialise it from the
            previous iteration's model for policy iteration).
        trees: tree files (or loaded trees) labelled with those objectives.
        out: output folder.
        resume: continue from ``out/checkpoint`` (same config and data).
        stop_after: stop (with a checkpoint) after this many optimizer steps in this call, as if
            interrupted (tests, time-boxed sessions).
        tracker: a :class:`mavis_align.tracking.Tracker` mirroring metrics.jsonl and the final
            quality (``--report-to``); None: metrics.jsonl only.
    Returns:
        The summary also written to ``out/result.json``.
    """
    from transformers.optimization import Adafactor, get_linear_schedule_with_warmup

    from ..provenance import write_run_record
    from .parallel import DataParallel

    out = Path(out)
    dp = DataParallel.from_env()  # several processes under `accelerate launch`; see train.parallel
    if config.solver == "ridge" and not dp.is_main:
        return {"rank": dp.rank, "skipped": "the ridge solve runs on process 0 only"}
    objectives = list(config.objectives or model.objectives)
    if objectives != list(model.objectives):
        raise ValueError(f"config.objectives {objectives} must equal the model's heads {model.objectives}")
    train = _load_examples(trees, "train", config, objectives, False, config.keep_leaf_fraction)
    val = _load_examples(trees, "val", config, objectives, config.val_drop_leaves, 1.0)
    if not train:
        raise ValueError("no training examples: the tree files have no train-split nodes")
    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    if config.lora_rank and not model.is_lora:
        model.add_lora(config.lora_rank, config.lora_alpha, config.lora_dropout)
    device = next(model.parameters()).device
    if config.gradient_checkpointing and not model.frozen_backbone:
        enable_checkpointing(model)
    # A frozen trunk never changes: its features are computed once and only the heads train.
    frozen = model.frozen_backbone
    t_feat = time.perf_counter()
    train_feats = trunk_features(model, train, pad_id, progress=progress).to(device) if frozen else None
    val_feats = trunk_features(model, val, pad_id, progress=progress) if frozen and val else None
    feature_seconds = time.perf_counter() - t_feat
    if frozen:
        fit_pool_centre(model, train_feats)
    elif model.pool == "prompt+response":
        raise ValueError("pool='prompt+response' needs a frozen trunk (backbone trunk:N): its centre is fitted on the trunk's features")
    train_targets = example_targets(train, config.zeta, config.kl_target).to(device)
    if config.solver == "ridge":
        return _train_ridge(model, train, val, train_feats, val_feats, train_targets, out, config, pad_id, feature_seconds, progress,
                            [str(t) for t in trees if not isinstance(t, LabelledTrees)], tracker)
    per_step = config.batch_size * config.grad_accum
    steps_per_epoch = max(1, math.ceil(len(train) / per_step))
    total = max(1, math.ceil(steps_per_epoch * config.epochs))
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    dp.sync_parameters(params)
    opt = Adafactor(params, lr=config.lr, weight_decay=config.weight_decay, scale_parameter=False, relative_step=False, warmup_init=False)
    sched = get_linear_schedule_with_warmup(opt, min(config.warmup_steps, total - 1) if total > 1 else 0, total)
    ckpt = out / "checkpoint"
    state = {"step": 0, "best_val": None, "best_step": None}
    cfg_dict = {**asdict(config), "objectives": objectives}
    for d in (ckpt, out / "best", out / "final"):
        recover_dir(d)  # a kill between the two renames of a swap leaves the previous version in .old
    if resume and ckpt.exists():
        saved = json.loads((ckpt / "trainer.json").read_text())
        if {**asdict(TrainConfig()), **saved["config"]} != cfg_dict:  # keys added since take their defaults
            raise ValueError(f"--resume: training settings differ from the checkpoint in {ckpt}")
        _load_trainable(model, load_file(str(ckpt / "model.safetensors")))
        _load_optimizer(opt, ckpt)
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(load_file(str(ckpt / "rng.safetensors"))["cpu"])
        state = saved["state"]
    elif out.exists() and (out / "result.json").exists() and not resume:
        raise FileExistsError(f"{out} already holds a trained model (use resume=True or another folder)")
    else:
        torch.manual_seed(config.seed)
        if dp.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text("")
    if dp.is_main:
        write_run_record(out, {"train": cfg_dict, "train_examples": len(train), "val_examples": len(val), "total_steps": total,
                               "processes": dp.world, "model": model.meta, "trees": [str(t) for t in trees if not isinstance(t, LabelledTrees)]},
                         config.seed)

    def checkpoint() -> None:
        if not dp.is_main:
            return

        def write(d: Path) -> None:
            save_file(_trainable_state(model), str(d / "model.safetensors"))
            _save_optimizer(opt, d)
            save_file({"cpu": torch.get_rng_state()}, str(d / "rng.safetensors"))
            (d / "trainer.json").write_text(json.dumps({"config": cfg_dict, "scheduler": sched.state_dict(), "state": state}))

        _atomic_dir(ckpt, write)

    def log(rec: dict) -> None:
        if not dp.is_main:
            return
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if tracker is not None:
            tracker.log({k: v for k, v in rec.items() if k != "step"}, step=rec.get("step"))

    def validate() -> None:
        if not val or not dp.is_main:
            return
        res = evaluate_mse(model, val, pad_id, config.zeta, kl_target=config.kl_target, features=val_feats)
        log({"step": state["step"], **res})
        if state["best_val"] is None or res["val_mse"] < state["best_val"]:
            state["best_val"], state["best_step"] = res["val_mse"], state["step"]
            _atomic_dir(out / "best", lambda d: model.save(d))

    conditioned = model.conditioned
    n_obj = len(objectives)
    if conditioned:
        example_weights(train, n_obj, torch.Generator())  # unusable trees fail here, before any step

    def draw_weights(rows: list[int], step: int, salt: int) -> torch.Tensor | None:
        """λ of training examples ``rows`` at ``step`` (conditioned models): redrawn every step for
        pi_ref trees, seeded by (seed, step), so a resumed run draws the same."""
        if not conditioned:
            return None
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 17 + salt)
        return example_weights([train[i] for i in rows], n_obj, g).to(device)

    def predict_rows(rows: list[int], lam: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets [len(rows), M] of training examples ``rows`` (at λ ``lam`` [n, M]
        for a conditioned model)."""
        if frozen:
            index = torch.tensor(rows, device=device)
            return values_from_features(model, train_feats[index], lam), train_targets[index]
        b = collate([train[i] for i in rows], pad_id, config.zeta, config.kl_target)
        b = {k: v.to(device) for k, v in b.items()}
        return _last_token_values(model, b, lam), b["target"]

    def residual(pred: torch.Tensor, target: torch.Tensor, lam: torch.Tensor | None) -> torch.Tensor:
        """Per-objective errors [n, M], or for a conditioned model the error of the combined value
        V(s, λ) = Σ λ_m u_m against Σ λ_m (R_m - ζ LPR) = Σ λ_m R_m - ζ LPR: [n, 1]."""
        if lam is None:
            return pred - target
        return (lam * (pred - target)).sum(-1, keepdim=True)

    from .quality import sibling_pairs

    train_pairs = sibling_pairs([(e.tree, e.parent) for e in train]) if config.sibling_weight else []

    bar = None
    if progress and dp.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc=f"train {'+'.join(objectives)}", unit="step")
    t0 = time.perf_counter()
    model.train()
    done_here = 0
    while state["step"] < total:
        epoch, pos = divmod(state["step"], steps_per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 7919 + epoch)).tolist()
        chunk = order[pos * per_step : (pos + 1) * per_step]
        local = dp.shard(chunk)  # every example of the step once, over all processes
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for a in range(0, len(local), config.batch_size):
            rows = local[a : a + config.batch_size]
            lam = draw_weights(rows, state["step"], a)
            pred, target = predict_rows(rows, lam)
            loss = (residual(pred, target, lam) ** 2).mean()
            (loss * (len(target) / len(chunk))).backward()
            loss_sum += float(loss.detach()) * len(target)
        if config.sibling_weight and train_pairs:
            pick = torch.randint(len(train_pairs), (config.sibling_pairs,), generator=torch.Generator().manual_seed(config.seed * 104729 + state["step"]))
            mine = dp.shard([train_pairs[i] for i in pick.tolist()])
            if mine:
                first, second = zip(*mine)
                lam = draw_weights(list(first), state["step"], 999_983)  # one λ per pair, shared by both siblings
                both = None if lam is None else torch.cat([lam, lam])
                pred, target = predict_rows(list(first) + list(second), both)
                n = len(first)
                err = residual(pred, target, both)
                sib = ((err[:n] - err[n:]) ** 2).mean()
                (config.sibling_weight * sib * (n / config.sibling_pairs)).backward()
        dp.sum_gradients(params)
        loss_sum = dp.sum(loss_sum)
        opt.step()
        sched.step()
        state["step"] += 1
        done_here += 1
        log({"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4), "loss": loss_sum / len(chunk), "lr": sched.get_last_lr()[0]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / len(chunk):.4f}")
        if config.eval_every and state["step"] % config.eval_every == 0 and state["step"] < total:
            validate()
            checkpoint()
        if stop_after is not None and done_here >= stop_after and state["step"] < total:
            checkpoint()
            if bar is not None:
                bar.close()
            dp.barrier()
            return {"stopped": True, "step": state["step"]}
    if bar is not None:
        bar.close()
    if not dp.is_main:
        dp.barrier()  # process 0 validates and writes the models
        return {"rank": dp.rank, "steps": state["step"], "steps_this_run": done_here}
    validate()
    if not val:  # nothing to select on: the final model is the best one
        _atomic_dir(out / "best", lambda d: model.save(d))
    _atomic_dir(out / "final", lambda d: model.save(d))
    checkpoint()
    final_val = evaluate_mse(model, val, pad_id, config.zeta, kl_target=config.kl_target, features=val_feats) if val else None
    quality = quality_reward = None
    if val:  # of the model that is used: best/
        best = ValueModel.load(out / "best", device=device, dtype=next(model.backbone.parameters()).dtype)
        quality = value_quality(best, val, pad_id, zeta=config.zeta, kl_target=config.kl_target, features=val_feats)
        quality_reward = reward_quality(best, val, pad_id, config, features=val_feats)
    result = {
        "objectives": objectives, "steps": state["step"], "steps_this_run": done_here, "train_examples": len(train), "val_examples": len(val),
        "best_val_mse": state["best_val"], "best_step": state["best_step"], "seconds_this_run": round(time.perf_counter() - t0 + feature_seconds, 2),
        "feature_seconds": round(feature_seconds, 2) if frozen else None,
        "final_val": final_val, "quality": quality, "quality_reward": quality_reward,
    }
    if progress and quality:
        print_quality(quality, quality_reward)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if tracker is not None:
        tracker.log({"quality": (quality or {}).get("per_objective", {}), "best_val_mse": state["best_val"]}, step=state["step"])
    dp.barrier()
    return result
