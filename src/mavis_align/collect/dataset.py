"""Training view of rollout trees: (prompt ⊕ partial response tokens, target per objective, LPR).

The regression target of node s (paper eq. 6) is  value(s) - zeta · LPR(s),  both already means
over the complete responses continued from s. Balancing (App. F.5): keep only a fraction of the
bottom-level nodes (leaves); validation can drop leaves entirely to focus on incomplete
sequences. The split is by tree (one tree per prompt), fixed at collection time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .store import LabelledTrees, read_trees

SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class NodeExample:
    """One training example.

    input_ids: prompt ids + response ids up to the end of the node.
    value: [M] mean reward of the node's completions; lpr: their mean log(pi_gen/pi_ref).
    """

    input_ids: list[int]
    value: np.ndarray
    lpr: float
    tree: int
    node: int
    depth: int
    is_leaf: bool

    def target(self, zeta: float = 0.0) -> np.ndarray:
        """value - zeta · LPR (eq. 6)."""
        return self.value - zeta * self.lpr


def node_examples(
    data: LabelledTrees | str | Path,
    split: str | None = "train",
    *,
    keep_leaf_fraction: float = 0.5,
    drop_leaves: bool = False,
    seed: int = 0,
) -> tuple[list[NodeExample], list[str]]:
    """All non-root nodes of the trees of ``split`` as examples (and the objective names).

    Args:
        data: labelled trees or a tree file path.
        split: "train", "val" or None for both.
        keep_leaf_fraction: fraction of leaves kept (App. F.5 keeps half); chosen at random
            with ``seed``.
        drop_leaves: drop every leaf (e.g. for validation on incomplete sequences only).
    """
    objectives: list[str] = []
    if not isinstance(data, LabelledTrees):
        data, objectives, _ = read_trees(data)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
    if not 0 <= keep_leaf_fraction <= 1:
        raise ValueError(f"keep_leaf_fraction must be in [0, 1], got {keep_leaf_fraction}")
    rng = random.Random(seed)
    out = []
    for ti, tree in enumerate(data.trees):
        if split is not None and data.splits[ti] != SPLITS[split]:
            continue
        for ni in range(1, len(tree.nodes)):
            leaf = not tree.nodes[ni].children
            if leaf and (drop_leaves or rng.random() >= keep_leaf_fraction):
                continue
            out.append(NodeExample(
                tree.prompt_ids + tree.response(ni), np.asarray(data.values[ti][ni], dtype=np.float64),
                float(data.lprs[ti][ni]), ti, ni, tree.nodes[ni].depth, leaf,
            ))
    return out, objectives


def collate(examples: Sequence[NodeExample], pad_id: int, zeta: float = 0.0) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids / attention_mask [B, T], target [B, M], lpr [B]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    target = torch.tensor(np.stack([e.target(zeta) for e in examples]), dtype=torch.float32)
    lpr = torch.tensor([e.lpr for e in examples], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "target": target, "lpr": lpr}
