"""Batched GET_DATA tree builder (paper Algorithm 3 and App. C).

All open nodes of a layer, across every prompt of a group, are extended in one decode batch
(split into micro-batches of at most ``max_rows`` rows). The k children of a node share its
prefix: it is run through the models once and its KV cache is copied to the children
(``row_source`` of the decoding engine). A node's own row already ran its prefix through the base
model, so its keys and values are kept (``PrefixKV``) and the next layer runs only the node's last
token instead of prefilling prompt and response again. The generating policy is pi_ref or a MAVIS
policy (its value models prefill as before).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from ..decoding.engine import decode_ids
from ..decoding.steppers import CachedBase, CachedValueScorer, PrefixKV, bind_objectives
from ..decoding.tilt import resolve_weights
from ..generation import SamplingConfig, left_pad
from ..values import ValueModel, check_tokenizer
from .tree import Tree, sample_chunk_length


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the rollout trees and of the generating policy's sampling.

    Attributes:
        num_layers: L, the tree depth below the root.
        k_root: children of the root.
        k: children of every other expanded node.
        max_new_tokens: response budget T; a non-terminal leaf has exactly T response tokens.
        two_layer_rule: split a root child that ends in EOS into two nodes and give the upper one
            ``extra_children`` more children (App. C), so every tree is at least two layers deep.
        extra_children: children added to such an upper node (default k).
        max_rows: decode rows per forward batch.
        temperature, top_k: sampling of pi_gen (top_k 0 = full vocabulary without value models;
            the MAVIS candidate count with them).
        beta, normalize, max_step_kl, tail: MAVIS tilt of pi_gen when value models are given (see SamplingConfig).
    """

    num_layers: int = 3
    k_root: int = 4
    k: int = 2
    max_new_tokens: int = 64
    two_layer_rule: bool = False
    extra_children: int | None = None
    max_rows: int = 64
    temperature: float = 1.0
    top_k: int = 0
    beta: float = 1.0
    normalize: bool = True
    max_step_kl: float = 0.0
    tail: str = "drop"

    def __post_init__(self) -> None:
        for name in ("num_layers", "k_root", "k", "max_new_tokens", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.extra_children is not None and self.extra_children < 0:
            raise ValueError(f"extra_children must be >= 0, got {self.extra_children}")
        self.sampling()  # validates temperature / top_k / beta

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, beta=self.beta, normalize=self.normalize,
                              max_step_kl=self.max_step_kl, tail=self.tail)

    def to_dict(self) -> dict:
        return asdict(self)


class GenPolicy:
    """pi_gen for tree collection: the base model, optionally tilted by value models (MAVIS).

    Args:
        model, tokenizer: the base model pi_ref.
        value_models, names: as for :class:`~mavis_align.decoding.decoder.MavisDecoder`.
        weights: objective weights for the MAVIS policy (default equal).
        reuse_prefix_kv: keep the base model's keys and values of every row that will have children,
            so the next layer runs only the last token of each node instead of its whole prefix
            (rollouts are then not bit-identical to a full prefill's: float rounding differs).
    """

    def __init__(self, model, tokenizer, value_models: Sequence[ValueModel] = (), names=None, weights: Mapping[str, float] | None = None,
                 reuse_prefix_kv: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.reuse_prefix_kv = reuse_prefix_kv
        self.value_models = list(value_models)
        for i, vm in enumerate(self.value_models):
            check_tokenizer(vm, tokenizer, name=f"value model {i}")
        self.bindings = bind_objectives(self.value_models, names)
        objectives = [b.name for b in self.bindings]
        self.weights = resolve_weights(objectives, weights or {n: 1.0 for n in objectives}, 1) if self.value_models else None
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)

    @property
    def is_mavis(self) -> bool:
        return bool(self.value_models)

    @torch.no_grad()
    def extend(self, prefixes: list[list[int]], row_source: list[int], budgets: list[int], config: TreeConfig, generator: torch.Generator,
               prefix_kv: Sequence[PrefixKV | None] | None = None):
        """Continue ``prefixes[row_source[r]]`` by up to ``budgets[r]`` tokens for every row r.

        With ``reuse_prefix_kv``: ``prefix_kv`` (one per prefix, from an earlier call's rows) spares
        the prefixes' prefill, and every returned row's ``base_kv`` holds its own keys and values."""
        ids, mask = left_pad(prefixes, self.pad_id, next(self.model.parameters()).device)
        sampling = replace(config.sampling(), max_new_tokens=max(budgets))
        scorer, w, b = None, None, None
        if self.is_mavis:
            used = (self.weights > 0).any(0)
            active = sorted({bd.model for j, bd in enumerate(self.bindings) if bool(used[j])})
            scorer = CachedValueScorer(self.value_models, self.bindings, active)
            w = self.weights.expand(len(row_source), -1)
            b = torch.full((len(row_source),), float(config.beta))
        rows = decode_ids(
            CachedBase(self.model, prefix_kv if self.reuse_prefix_kv else None), ids, mask, sampling, eos_id=self.eos_id,
            generator=generator, scorer=scorer, weights=w, beta=b,
            row_source=torch.tensor(row_source, dtype=torch.long), max_new_tokens=budgets, capture_kv=self.reuse_prefix_kv,
        )
        for src, row in zip(row_source, rows):
            kv = row.base_kv
            if kv is not None:  # the cache holds the prefix and every generated token but the last
                ids_ = tuple(prefixes[src]) + tuple(row.token_ids[:-1])
                row.base_kv = replace(kv, ids=ids_) if kv.layers and kv.layers[0][0].shape[1] == len(ids_) else None
        return rows


def build_trees(
    policy: GenPolicy,
    prompts: Sequence[tuple[int, str, list[int]]],
    config: TreeConfig,
    generator: torch.Generator,
) -> list[Tree]:
    """Grow one tree per prompt, layer by layer, every layer's open nodes in shared batches.

    Args:
        prompts: (prompt index, prompt text, model-input token ids) per tree.
        generator: drives chunk lengths, split points and sampling (one group = one stream).
    Returns:
        The trees, unlabelled.
    """
    trees = [Tree.new(i, text, ids) for i, text, ids in prompts]
    # open node: (tree, node, budget left, children to draw, base-model keys/values of its sequence or None)
    open_nodes = [(t, 0, config.max_new_tokens, config.k_root, None) for t in range(len(trees))]
    L = config.num_layers
    for layer in range(L):
        if not open_nodes:
            break
        taus = [sample_chunk_length(budget, layer, L, generator) for _, _, budget, _, _ in open_nodes]
        next_open = []
        # micro-batches of whole nodes, at most max_rows rows each
        start = 0
        while start < len(open_nodes):
            stop, rows = start, 0
            while stop < len(open_nodes) and (rows == 0 or rows + open_nodes[stop][3] <= config.max_rows):
                rows += open_nodes[stop][3]
                stop += 1
            chunk = open_nodes[start:stop]
            prefixes = [trees[t].prompt_ids + trees[t].response(n) for t, n, _, _, _ in chunk]
            row_source = [j for j, (_, _, _, kc, _) in enumerate(chunk) for _ in range(kc)]
            budgets = [taus[start + j] for j in row_source]
            decoded = policy.extend(prefixes, row_source, budgets, config, generator, prefix_kv=[kv for *_, kv in chunk])
            for (j, row) in zip(row_source, decoded):
                t, parent, budget, _, _ = chunk[j]
                tree = trees[t]
                terminal = bool(row.token_ids) and row.token_ids[-1] == policy.eos_id
                n_tok = len(row.token_ids)
                if config.two_layer_rule and layer == 0 and terminal and L > 1 and n_tok >= 2:
                    cut = int(torch.randint(1, n_tok, (1,), generator=generator))
                    upper = tree.add(parent, row.token_ids[:cut], row.logprobs_gen[:cut], row.logprobs_ref[:cut], False, row.kl[:cut])
                    tree.add(upper, row.token_ids[cut:], row.logprobs_gen[cut:], row.logprobs_ref[cut:], True, row.kl[cut:])
                    extra = config.k if config.extra_children is None else config.extra_children
                    if extra > 0:
                        kv = row.base_kv.truncated(len(prefixes[j]) + cut - 1) if row.base_kv is not None else None
                        next_open.append((t, upper, budget - cut, extra, kv))
                    continue
                child = tree.add(parent, row.token_ids, row.logprobs_gen, row.logprobs_ref, terminal, row.kl)
                left = budget - n_tok
                if not terminal and left > 0 and layer < L - 1:
                    next_open.append((t, child, left, config.k, row.base_kv))
                row.base_kv = None  # rows without children free their keys and values now
            start = stop
        open_nodes = next_open
    return trees
