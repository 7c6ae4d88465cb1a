"""Training view of rollout trees: (prompt ⊕ partial response tokens, target per objective, LPR).

The regression target of node s (paper eq. 6) is  value(s) - zeta · LPR,  with value(s) the mean
reward of the complete responses continued from s. Two readings of the LPR term are offered:

* ``kl_target="future"`` (default): only the log-ratios of tokens generated *after* s. This is the
  soft Q-function of the generating policy that the paper's theory (eq. 3, Lemma 2) evaluates:
  V(s ⊕ a) must not be charged for a's own log-ratio, or the next policy's tilt partly undoes the
  previous one. ``tests/test_train.py`` measures this on an exact token MDP.
* ``kl_target="response"``: the log-ratio of the whole response y, eq. 6 as printed. The part
  before s is the same for every candidate at a step and cancels in the tilt; the log-ratio of the
  candidate token itself does not.

LPR can be estimated two ways (``kl_estimator``), with the same expectation:

* ``"sampled"``: the sampled tokens' log-ratios log(pi_gen(a_t|s_t) / pi_ref(a_t|s_t)), as printed.
* ``"expected"``: each token's log-ratio replaced by its expectation given the state,
  KL(pi_gen(.|s_t) || pi_ref(.|s_t)) (recorded at collection; trees collected before lack it).
  A sampled log-ratio of a tilted policy swings by several nats per token, so over 40 tokens
  zeta = 0.03 times two siblings' sampled LPRs differ by about as much as their rewards
  (``benchmarks/iteration_targets.py``); the per-step KL keeps only the differences that belong
  to the states (``benchmarks/kl_estimator.py``: cleaner targets, yet on the default a round with
  the KL term still steers worse than one without). The targets' total spread need not fall: under
  a tilt the sampled log-ratio partly tracks the reward (tokens of high value get both).

Balancing (App. F.5): keep only a fraction of the bottom-level nodes (leaves); validation can drop
leaves entirely to focus on incomplete sequences. The split is by tree (one tree per prompt), fixed at collection time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .store import LabelledTrees, read_trees
from .tree import expected_kl

SPLITS = {"train": 0, "val": 1}
KL_ESTIMATORS = ("sampled", "expected")


@dataclass(frozen=True)
class NodeExample:
    """One training example.

    input_ids: prompt ids + response ids up to the end of the node.
    value: [M] mean reward of the node's completions; lpr: their mean log(pi_gen/pi_ref) over the
    whole response (with ``kl_estimator="expected"``: the mean of the summed per-step KLs), and
    prefix_lpr the same sum over the node's own tokens.
    """

    input_ids: list[int]
    value: np.ndarray
    lpr: float
    tree: int
    node: int
    depth: int
    is_leaf: bool
    prefix_lpr: float = 0.0  # sum of log(pi_gen/pi_ref) over the response tokens up to the end of s
    parent: int = -1  # tree-local parent node (siblings share tree and parent)
    weights: np.ndarray | None = None  # [M] λ of the MAVIS policy that generated the tree; None: pi_ref (any λ)
    prompt_length: int = 0  # tokens of input_ids that are the prompt (pool "prompt+response" reads it)

    @property
    def future_lpr(self) -> float:
        """Mean log-ratio of the tokens after s (0 at a leaf)."""
        return self.lpr - self.prefix_lpr

    def kl_term(self, kl_target: str = "future") -> float:
        """The LPR that zeta multiplies: over the tokens after s ("future") or the whole response."""
        if kl_target == "future":
            return self.future_lpr
        if kl_target == "response":
            return self.lpr
        raise ValueError(f"kl_target must be 'future' or 'response', got {kl_target!r}")

    def target(self, zeta: float = 0.0, kl_target: str = "future") -> np.ndarray:
        """value - zeta · LPR (eq. 6), LPR by :meth:`kl_term`."""
        return self.value - zeta * self.kl_term(kl_target)


def node_examples(
    data: LabelledTrees | str | Path,
    split: str | None = "train",
    *,
    keep_leaf_fraction: float = 0.5,
    drop_leaves: bool = False,
    seed: int = 0,
    kl_estimator: str = "sampled",
) -> tuple[list[NodeExample], list[str]]:
    """All non-root nodes of the trees of ``split`` as examples (and the objective names).

    Args:
        data: labelled trees or a tree file path.
        split: "train", "val" or None for both.
        keep_leaf_fraction: fraction of leaves kept (App. F.5 keeps half); chosen at random
            with ``seed``.
        drop_leaves: drop every leaf (e.g. for validation on incomplete sequences only).
        kl_estimator: "sampled" (log-ratios of the sampled tokens) or "expected" (per-step KLs;
            the trees must have them) for the examples' ``lpr`` and ``prefix_lpr``.
    """
    objectives: list[str] = []
    if not isinstance(data, LabelledTrees):
        data, objectives, _ = read_trees(data)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
    if not 0 <= keep_leaf_fraction <= 1:
        raise ValueError(f"keep_leaf_fraction must be in [0, 1], got {keep_leaf_fraction}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {list(KL_ESTIMATORS)}, got {kl_estimator!r}")
    rng = random.Random(seed)
    out = []
    for ti, tree in enumerate(data.trees):
        if split is not None and data.splits[ti] != SPLITS[split]:
            continue
        if kl_estimator == "expected":
            lprs, prefixes = expected_kl(tree)
        else:
            lprs, prefixes = data.lprs[ti], None
        for ni in range(1, len(tree.nodes)):
            leaf = not tree.nodes[ni].children
            if leaf and (drop_leaves or rng.random() >= keep_leaf_fraction):
                continue
            if prefixes is None:
                prefix = sum(g - r for p in tree.path(ni) for g, r in zip(tree.nodes[p].logp_gen, tree.nodes[p].logp_ref))
            else:
                prefix = prefixes[ni]
            out.append(NodeExample(
                tree.prompt_ids + tree.response(ni), np.asarray(data.values[ti][ni], dtype=np.float64),
                float(lprs[ni]), ti, ni, tree.nodes[ni].depth, leaf, float(prefix), tree.nodes[ni].parent,
                prompt_length=len(tree.prompt_ids),
            ))
    return out, objectives


def collate(examples: Sequence[NodeExample], pad_id: int, zeta: float = 0.0, kl_target: str = "future") -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids / attention_mask [B, T], target [B, M], lpr [B] (the one used),
    prompt_length [B]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    target = torch.tensor(np.stack([e.target(zeta, kl_target) for e in examples]), dtype=torch.float32)
    lpr = torch.tensor([e.kl_term(kl_target) for e in examples], dtype=torch.float32)
    prompt_length = torch.tensor([e.prompt_length for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "target": target, "lpr": lpr, "prompt_length": prompt_length}
