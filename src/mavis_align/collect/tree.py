"""Monte-Carlo rollout trees (paper Algorithm 3, App. C): the structure and its pure arithmetic.

A tree belongs to one prompt. Node 0 is the root (the prompt, no response tokens). Each other
node holds only the tokens it added; concatenating tokens root -> leaf gives the full response.
Leaves are labelled with the reward of their full response and with its log-probability ratio
LPR = sum_t log pi_gen(a_t|s_t) - log pi_ref(a_t|s_t); an inner node's value and LPR are the means
over its children. Trees collected since per-step KLs are recorded also hold, per token,
KL(pi_gen(.|s_t) || pi_ref(.|s_t)), the expectation of that token's log-ratio given s_t;
:func:`expected_kl` sums and averages them as LPR does the log-ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


def chunk_upper(budget_left: int, layer: int, num_layers: int) -> int:
    """Largest chunk length at ``layer`` (0-based): 2·Round(N / (L - l)) - 1, clipped to [1, N].

    Round is half-up. At the last layer the chunk is the whole budget N.
    """
    if budget_left < 1:
        raise ValueError(f"budget_left must be >= 1, got {budget_left}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    if layer == num_layers - 1:
        return budget_left
    upper = 2 * math.floor(budget_left / (num_layers - layer) + 0.5) - 1
    return max(1, min(budget_left, upper))


def sample_chunk_length(budget_left: int, layer: int, num_layers: int, generator: torch.Generator) -> int:
    """tau ~ Unif{1, ..., chunk_upper} for layers before the last; the whole budget at the last."""
    upper = chunk_upper(budget_left, layer, num_layers)
    if layer == num_layers - 1:
        return upper
    return int(torch.randint(1, upper + 1, (1,), generator=generator))


@dataclass
class Node:
    """One node: the tokens it added, their log-probs, and links."""

    parent: int
    depth: int
    tokens: list[int] = field(default_factory=list)
    logp_gen: list[float] = field(default_factory=list)
    logp_ref: list[float] = field(default_factory=list)
    terminal: bool = False  # ends in EOS
    children: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)  # per-token KL(pi_gen(.|s_t) || pi_ref(.|s_t)); empty: not recorded


@dataclass
class Tree:
    """A rollout tree for prompt ``prompt_index`` (token ids ``prompt_ids``, model input form)."""

    prompt_index: int
    prompt: str
    prompt_ids: list[int]
    nodes: list[Node]

    @classmethod
    def new(cls, prompt_index: int, prompt: str, prompt_ids: list[int]) -> "Tree":
        return cls(prompt_index, prompt, list(prompt_ids), [Node(parent=-1, depth=0)])

    def add(self, parent: int, tokens, logp_gen, logp_ref, terminal: bool, kl=()) -> int:
        node = Node(parent, self.nodes[parent].depth + 1, list(tokens), list(logp_gen), list(logp_ref), terminal, kl=list(kl))
        self.nodes.append(node)
        self.nodes[parent].children.append(len(self.nodes) - 1)
        return len(self.nodes) - 1

    def path(self, index: int) -> list[int]:
        """Node indices root -> ``index`` (root excluded)."""
        out = []
        while index > 0:
            out.append(index)
            index = self.nodes[index].parent
        return out[::-1]

    def response(self, index: int) -> list[int]:
        """All response tokens up to the end of node ``index``."""
        return [t for i in self.path(index) for t in self.nodes[i].tokens]

    def response_length(self, index: int) -> int:
        return sum(len(self.nodes[i].tokens) for i in self.path(index))

    def leaves(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if i > 0 and not n.children]

    def leaf_lpr(self, index: int) -> float:
        """sum over the full response of log pi_gen - log pi_ref."""
        return float(sum(g - r for i in self.path(index) for g, r in zip(self.nodes[i].logp_gen, self.nodes[i].logp_ref)))


def has_step_kl(tree: Tree) -> bool:
    """Whether every token of ``tree`` carries its step's KL (trees collected before they were
    recorded do not)."""
    return all(len(n.kl) == len(n.tokens) for n in tree.nodes)


def expected_kl(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """Per node: the mean over its completions of the response's summed per-step KL, and the sum of
    per-step KL over the node's own path (root -> node).

    The counterpart of LPR with each token's sampled log-ratio replaced by its expectation given the
    state: same expected value (so the same eq. 6 targets in expectation), without the sampling noise
    of the log-ratios. Returns ([N], [N]) float64; raises if the tree lacks per-step KLs.
    """
    if not has_step_kl(tree):
        raise ValueError(f"the tree of prompt {tree.prompt_index} has no per-step KLs (collected before they were recorded): "
                         "collect it again, or use kl_estimator='sampled'")
    n = len(tree.nodes)
    prefix = np.zeros(n, dtype=np.float64)
    for i in sorted(range(1, n), key=lambda j: tree.nodes[j].depth):  # parents before children
        node = tree.nodes[i]
        prefix[i] = (prefix[node.parent] if node.parent > 0 else 0.0) + float(sum(node.kl))
    total = np.zeros(n, dtype=np.float64)
    for i in sorted(range(n), key=lambda j: -tree.nodes[j].depth):  # children before parents
        node = tree.nodes[i]
        total[i] = total[node.children].mean() if node.children else prefix[i]
    return total, prefix


def label_tree(tree: Tree, leaf_values: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-node values [N, M] and LPRs [N]: leaves from ``leaf_values`` / their LPR, inner nodes the
    means over their children (the root too)."""
    n = len(tree.nodes)
    m = len(next(iter(leaf_values.values()))) if leaf_values else 0
    values = np.zeros((n, m), dtype=np.float64)
    lpr = np.zeros(n, dtype=np.float64)
    for i in sorted(range(n), key=lambda j: -tree.nodes[j].depth):  # children before parents
        node = tree.nodes[i]
        if node.children:
            values[i] = values[node.children].mean(axis=0)
            lpr[i] = lpr[node.children].mean()
        elif i > 0:
            if i not in leaf_values:
                raise ValueError(f"leaf {i} has no reward")
            values[i] = leaf_values[i]
            lpr[i] = tree.leaf_lpr(i)
    return values, lpr
