"""Incremental model state for decoding: the base model (pi_ref) and the value scorers.

Two implementations of each role:

* cached (the fast path): one left-padded batch, a transformers ``DynamicCache`` per model;
  the k candidates of every row are scored in **one value-model forward per step**: they are
  appended after the cached prefix with a 4D attention mask so each candidate sees the prefix
  and itself only, all at the same position; the cache is then cut back with the public
  ``Cache.crop``. The token actually chosen at step t rides along at the front of step t+1's
  block, so a value model runs exactly once per generated token.
* naive (the reference): no cache, no padding: every row, and every candidate sequence, is run
  through the model on its own. Slow, simple, and what the fast path is tested against.

All of them take and return token ids; none of them samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..generation import leading_padding
from ..values import ValueModel


def _crop(cache, n: int) -> None:
    """Drop the last ``n`` positions of ``cache`` (public API; negative counts work in 4.x and 5.x)."""
    if n > 0:
        cache.crop(-n)


def _merge_caches(a, b, pad_a: int, pad_b: int):
    """Rows of ``a`` then rows of ``b`` in one ``DynamicCache``; each side is left-padded along the
    sequence axis (``pad_a`` / ``pad_b`` zero positions, masked out by the caller's 2D mask)."""
    from transformers import DynamicCache

    def padded(t: torch.Tensor, n: int) -> torch.Tensor:
        return t if n == 0 else torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t], dim=2)

    layers = [
        (torch.cat([padded(la.keys, pad_a), padded(lb.keys, pad_b)]), torch.cat([padded(la.values, pad_a), padded(lb.values, pad_b)]))
        for la, lb in zip(a.layers, b.layers)
    ]
    return DynamicCache(ddp_cache_data=layers)


def _merge_masks(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Concatenate two left-padded 2D masks of different widths -> (mask, pad added to a, pad added to b)."""
    width = max(a.shape[1], b.shape[1])
    pa, pb = width - a.shape[1], width - b.shape[1]
    return torch.cat([torch.nn.functional.pad(a, (pa, 0)), torch.nn.functional.pad(b, (pb, 0))]), pa, pb


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Real (unpadded) token ids of each row."""
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]


# ---------------------------------------------------------------------------------- base model


@dataclass(frozen=True)
class PrefixKV:
    """The base model's keys and values of one sequence's tokens except its last one, so that a later
    decode continuing the sequence runs only that last token (rollout trees: a node's children
    continue the sequence its own row produced).

    ids: the token ids the keys and values belong to (prompt and response, the last token excluded).
    layers: per layer (keys [H, len(ids), D], values [H, len(ids), D]), rotary positions 0..len(ids)-1.
    """

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def truncated(self, n: int) -> "PrefixKV":
        """The first ``n`` positions (a prefix of the sequence)."""
        if not 0 < n <= len(self.ids):
            raise ValueError(f"cannot keep {n} of {len(self.ids)} positions")
        return PrefixKV(self.ids[:n], tuple((k[:, :n], v[:, :n]) for k, v in self.layers))


def _plain_layers(cache) -> bool:
    """Whether every layer of ``cache`` is a plain (full-attention) DynamicLayer whose rows can be cut
    out and put back (sliding-window or quantised layers are not)."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None]))


def _trim_left(mask: torch.Tensor, caches: Sequence) -> torch.Tensor:
    """Drop the leading positions that are padding in every row of a left-padded batch (left behind by
    rows that have left it), from the 2D mask [B, W] and the caches -> the new mask. Without it a
    batch that rows keep joining and leaving would grow by one position per step for ever. Positions
    are passed explicitly, so nothing else changes. Caches with other than plain layers are kept."""
    n = leading_padding(mask)
    if n == 0 or not all(_plain_layers(c) for c in caches):
        return mask
    for cache in caches:
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]
    return mask[:, n:]


class CachedBase:
    """pi_ref with a KV cache over a left-padded batch.

    Args:
        model: a transformers causal LM.
        prefix_kv: optional, one :class:`PrefixKV` (or None) per prompt row of :meth:`start`: when
            every row has one that matches its tokens but the last, the prompts are not run again;
            only their last tokens are.
    """

    def __init__(self, model, prefix_kv: Sequence[PrefixKV | None] | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.prefix_kv = prefix_kv

    def row_kv(self, row: int) -> PrefixKV | None:
        """The cached keys and values of live row ``row`` (its tokens fed so far), or None where the
        cache's layers cannot be cut by row. ``ids`` must then be set by the caller (see
        :meth:`start`): the cache does not know the tokens."""
        if not _plain_layers(self.cache):
            return None
        n = int(self.mask[row].sum())
        return PrefixKV((), tuple((la.keys[row, :, -n:].clone(), la.values[row, :, -n:].clone()) for la in self.cache.layers))

    def _start_from_prefixes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """:meth:`start` from ``prefix_kv``: a left-padded cache of the stored rows plus each row's last
        token. None when some row has no usable prefix (then the prompts run in full)."""
        from transformers import DynamicCache

        kv = list(self.prefix_kv or [])
        rows = _rows(input_ids, attention_mask)
        if len(kv) != len(rows) or any(p is None or len(r) < 2 or p.ids != tuple(r[:-1]) for p, r in zip(kv, rows)):
            return None
        width = max(len(p.ids) for p in kv)
        layers = []
        for li in range(len(kv[0].layers)):
            keys, values = [], []
            for p in kv:
                k, v = p.layers[li]
                pad = width - k.shape[1]
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            layers.append((torch.stack(keys).to(self.device), torch.stack(values).to(self.device)))
        lengths = torch.tensor([len(p.ids) for p in kv], device=self.device)
        self.mask = (torch.arange(width + 1, device=self.device)[None, :] >= (width - lengths)[:, None]).long()
        self.cache = DynamicCache(ddp_cache_data=layers)
        last = torch.tensor([r[-1] for r in rows], device=self.device)
        out = self.model(input_ids=last[:, None], attention_mask=self.mask, position_ids=lengths[:, None], cache=self.cache, use_cache=True)
        self.next_pos = lengths + 1
        return out.logits[:, -1, :].float().to(self.device)

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts ([B, T], left-padded) -> next-token logits [B, V] (float32)."""
        from transformers import DynamicCache

        if self.prefix_kv is not None:
            logits = self._start_from_prefixes(input_ids, attention_mask)
            if logits is not None:
                return logits
        self.mask = attention_mask.to(self.device).long()
        position = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=self.mask,
            position_ids=position,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.next_pos = position[:, -1] + 1
        return out.logits[:, -1, :].float().to(self.device)  # a device_map-sharded model ends on another GPU

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row ([B]) -> next-token logits [B, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=tokens.to(self.device)[:, None],
            attention_mask=self.mask,
            position_ids=self.next_pos[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :].float().to(self.device)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` ([B'] long, repeats allowed) in that order (beam search)."""
        index = index.to(self.device)
        self.cache.reorder_cache(index)
        self.mask = _trim_left(self.mask.index_select(0, index), [self.cache])
        self.next_pos = self.next_pos.index_select(0, index)

    def merge(self, other: "CachedBase") -> None:
        """Append the rows of ``other`` (same model, started separately) after this batch's rows."""
        self.mask, pa, pb = _merge_masks(self.mask, other.mask)
        self.cache = _merge_caches(self.cache, other.cache, pa, pb)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])


class NaiveBase:
    """pi_ref without a cache: every row's full sequence is run on its own at every step."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        out = []
        for seq in self.seqs:
            ids = torch.tensor([seq], device=self.device)
            out.append(self.model(input_ids=ids).logits[0, -1].float())
        return torch.stack(out)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.seqs = _rows(input_ids, attention_mask)
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        for seq, t in zip(self.seqs, tokens.tolist()):
            seq.append(int(t))
        return self._logits()

    def reorder(self, index: torch.Tensor) -> None:
        self.seqs = [list(self.seqs[i]) for i in index.tolist()]


# ---------------------------------------------------------------------------------- value scorers


@dataclass(frozen=True)
class ObjectiveBinding:
    """Objective ``name`` is head ``head`` of value model number ``model``."""

    name: str
    model: int
    head: int


def bind_objectives(models: Sequence[ValueModel], names: Sequence[str | None] | None = None) -> list[ObjectiveBinding]:
    """Map objective names to (model, head).

    Args:
        models: value models (single- or multi-head).
        names: per model, a name to give its objective (only for single-head models; the head's
            own name is used when None), or None to use every model's own head names.
    Returns:
        One binding per objective, in model order then head order. Names must be unique.
    """
    names = list(names) if names is not None else [None] * len(models)
    if len(names) != len(models):
        raise ValueError(f"got {len(names)} names for {len(models)} value models")
    out: list[ObjectiveBinding] = []
    for mi, (model, name) in enumerate(zip(models, names)):
        if name is None:
            out.extend(ObjectiveBinding(obj, mi, hi) for hi, obj in enumerate(model.objectives))
        elif name in model.objectives:
            out.append(ObjectiveBinding(name, mi, model.objectives.index(name)))
        elif len(model.objectives) == 1:
            out.append(ObjectiveBinding(name, mi, 0))
        else:
            raise ValueError(
                f"value model {mi} has heads {model.objectives}; {name!r} is none of them "
                "(a name can only rename a single-head model)"
            )
    seen = [b.name for b in out]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise ValueError(f"objective(s) {dupes} provided by more than one value model")
    return out


def model_weights(model: ValueModel, mi: int, bindings: Sequence[ObjectiveBinding], weights: torch.Tensor | None) -> torch.Tensor | None:
    """The λ a preference-conditioned model ``mi`` reads: the batch's weights [B, M_bound] on the
    objectives bound to it, in its own head order, renormalised to sum to 1 -> [B, M_model]
    (rows with no weight on it get uniform weights: its values do not count there). None for
    the other models, and when no weights are given."""
    if not model.conditioned or weights is None:
        return None
    heads = [(j, bd.head) for j, bd in enumerate(bindings) if bd.model == mi]
    if len(heads) != len(model.objectives):
        raise ValueError(f"a preference-conditioned value model must have all its objectives bound ({model.objectives}); "
                         f"got {[bindings[j].name for j, _ in heads]}")
    lam = torch.zeros(weights.shape[0], len(model.objectives), dtype=torch.float32, device=weights.device)
    for j, h in heads:
        lam[:, h] = weights[:, j].float()
    total = lam.sum(-1, keepdim=True)
    uniform = torch.full_like(lam, 1.0 / lam.shape[1])
    return torch.where(total > 0, lam / total.clamp(min=1e-30), uniform)


def trunk_groups(models: Sequence[ValueModel], active: Sequence[int]) -> list[list[int]]:
    """Active model indices grouped by shared frozen trunk (a model without one is its own group)."""
    groups: dict[str, list[int]] = {}
    for mi in active:
        key = models[mi].trunk_key or f"own-trunk-{mi}"
        groups.setdefault(key, []).append(mi)
    return list(groups.values())


class CachedValueScorer:
    """Value models with KV caches: V_m(s ⊕ a) for k candidates per row in one forward per model.

    Args:
        models: value models, each sharing the base tokenizer.
        bindings: from :func:`bind_objectives`; the output's last axis follows this order.
        active: indices of the models to run (others give zeros), e.g. those with a nonzero
            weight somewhere in the batch; None = all.

    Models with the same frozen trunk (equal :attr:`ValueModel.trunk_key`) share one trunk forward
    and one cache: only their heads differ. For models that read mean states (``pool`` "mean",
    "mean+last", "prompt+response") each trunk keeps a running sum of its states per row and the
    sum over the prompt (the response's sum is their difference).
    """

    def __init__(self, models: Sequence[ValueModel], bindings: Sequence[ObjectiveBinding], active: Sequence[int] | None = None):
        self.models = list(models)
        self.bindings = list(bindings)
        self.active = sorted(set(range(len(models)) if active is None else active))
        self.device = next(self.models[0].parameters()).device if self.models else torch.device("cpu")
        self.groups = trunk_groups(self.models, self.active)
        for group in self.groups:  # equal fingerprints: one copy of the trunk in memory is enough
            for mi in group[1:]:
                self.models[mi].backbone = self.models[group[0]].backbone
        # what each trunk's heads read: its running sums are kept only when a head reads a mean
        self.pools = {g[0]: {self.models[mi].pool for mi in g} for g in self.groups}
        self.pooled = {g for g, pools in self.pools.items() if pools != {"last"}}

    @property
    def objectives(self) -> list[str]:
        return [b.name for b in self.bindings]

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Cache the prompts ([B, T], left-padded) in every active model."""
        from transformers import DynamicCache

        self.mask = attention_mask.to(self.device).long()
        position = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.next_pos = position[:, -1] + 1
        self.pending: torch.Tensor | None = None
        self.caches = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.prompt_sums: dict[int, torch.Tensor] = {}
        self.prompt_counts = self.mask.sum(-1).float()
        ids = input_ids.to(self.device)
        for group in self.groups:
            cache = DynamicCache()
            out = self.models[group[0]].backbone(input_ids=ids, attention_mask=self.mask, position_ids=position, cache=cache, use_cache=True)
            self.caches[group[0]] = cache
            if group[0] in self.pooled:
                self.sums[group[0]] = (out.last_hidden_state.float() * self.mask[..., None]).sum(1)
                self.prompt_sums[group[0]] = self.sums[group[0]]

    def append(self, tokens: torch.Tensor) -> None:
        """Record the token chosen for each row ([B]); it is fed with the next :meth:`score`."""
        if self.pending is not None:
            self._flush()
        self.pending = tokens.to(self.device)

    @torch.no_grad()
    def _flush(self) -> None:
        """Feed a pending token without scoring (two appends in a row)."""
        pending, self.pending = self.pending, None
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        for group in self.groups:
            out = self.models[group[0]].backbone(
                input_ids=pending[:, None], attention_mask=mask, position_ids=self.next_pos[:, None],
                cache=self.caches[group[0]], use_cache=True,
            )
            if group[0] in self.sums:
                self.sums[group[0]] = self.sums[group[0]] + out.last_hidden_state[:, 0].float()
        self.mask = mask
        self.next_pos = self.next_pos + 1

    def _block_mask(self, n_app: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive 4D mask [B, 1, n_app + k, past + n_app + k] for [pending?, c_1..c_k]."""
        b, past = self.mask.shape
        q = n_app + k
        block = torch.eye(q, dtype=torch.bool, device=self.device)
        if n_app:
            block[:, 0] = True  # the chosen token is seen by itself and by every candidate
        allowed = torch.cat([self.mask.bool()[:, None, :].expand(b, q, past), block[None].expand(b, q, q)], dim=-1)
        out = torch.zeros(b, 1, q, past + q, dtype=dtype, device=self.device)
        return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)

    @torch.no_grad()
    def score(self, candidates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Values of s ⊕ a for each candidate a.

        Args:
            candidates: [B, k] token ids.
            weights: [B, M] the rows' objective weights (bindings order); a preference-conditioned
                model reads them (see :func:`model_weights`), the others ignore them.
        Returns:
            [B, k, M] float32, M = len(bindings) (zeros for inactive models).
        """
        b, k = candidates.shape
        cand = candidates.to(self.device)
        n_app = 0 if self.pending is None else 1
        block = cand if not n_app else torch.cat([self.pending[:, None], cand], dim=1)
        pos = torch.cat([self.next_pos[:, None].expand(b, n_app), (self.next_pos + n_app)[:, None].expand(b, k)], dim=1)
        out = torch.zeros(b, k, len(self.bindings), dtype=torch.float32, device=self.device)
        seen = self.mask.sum(-1).float() + n_app  # real tokens before the candidate, pending one included
        for group in self.groups:
            trunk = self.models[group[0]].backbone
            dtype = next(trunk.parameters()).dtype
            states = trunk(
                input_ids=block, attention_mask=self._block_mask(n_app, k, dtype), position_ids=pos, cache=self.caches[group[0]], use_cache=True,
            ).last_hidden_state
            _crop(self.caches[group[0]], k)
            hidden, mean, prompt, response = states[:, n_app:], None, None, None
            if group[0] in self.sums:
                if n_app:
                    self.sums[group[0]] = self.sums[group[0]] + states[:, 0].float()
                # means over the prefix (incl. the pending token) and the candidate itself
                total = self.sums[group[0]][:, None] + hidden.float()
                if self.pools[group[0]] & {"mean", "mean+last"}:
                    mean = total / (seen + 1)[:, None, None]
                if "prompt+response" in self.pools[group[0]]:
                    prompt = (self.prompt_sums[group[0]] / self.prompt_counts.clamp(min=1.0)[:, None])[:, None].expand_as(total)
                    response = (total - self.prompt_sums[group[0]][:, None]) / (seen + 1 - self.prompt_counts)[:, None, None]
            for mi in group:
                lam = model_weights(self.models[mi], mi, self.bindings, None if weights is None else weights.to(self.device))
                values = self.models[mi].values_from_hidden(hidden, mean, lam, prompt, response)
                for j, bd in enumerate(self.bindings):
                    if bd.model == mi:
                        out[:, :, j] = values[..., bd.head]
        if n_app:
            self.mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], dim=1)
            self.next_pos = self.next_pos + 1
            self.pending = None
        return out

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` in that order (beam search). Call after :meth:`append`."""
        if self.pending is not None:
            self._flush()
        index = index.to(self.device)
        for cache in self.caches.values():
            cache.reorder_cache(index)
        self.mask = _trim_left(self.mask.index_select(0, index), list(self.caches.values()))
        self.next_pos = self.next_pos.index_select(0, index)
        self.sums = {g: v.index_select(0, index) for g, v in self.sums.items()}
        self.prompt_sums = {g: v.index_select(0, index) for g, v in self.prompt_sums.items()}
        self.prompt_counts = self.prompt_counts.index_select(0, index)

    def merge(self, other: "CachedValueScorer") -> None:
        """Append the rows of ``other`` (same models and active set, started separately)."""
        if self.active != other.active:
            raise ValueError("can only merge scorers that run the same value models")
        for sc in (self, other):
            if sc.pending is not None:
                sc._flush()
        self.mask, pa, pb = _merge_masks(self.mask, other.mask)
        self.caches = {g: _merge_caches(self.caches[g], other.caches[g], pa, pb) for g in self.caches}
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.sums = {g: torch.cat([v, other.sums[g]]) for g, v in self.sums.items()}
        self.prompt_sums = {g: torch.cat([v, other.prompt_sums[g]]) for g, v in self.prompt_sums.items()}
        self.prompt_counts = torch.cat([self.prompt_counts, other.prompt_counts])


class SequenceValueScorer:
    """Uncached scorer over whole token sequences: the naive reference and the plug-in point for
    any value function (e.g. exact soft values in tests).

    Args:
        fn: maps a list of N full token sequences (prompt + response so far + candidate) to
            [N, M] values; if it has an attribute ``takes_weights`` set, it is called as
            ``fn(seqs, weights)`` with the rows' objective weights [N, M] (one row per sequence); with
            ``takes_prompt_lengths`` it also gets ``prompt_lengths=`` (list of N ints: the prompt part of each).
        objectives: the M objective names.
    """

    def __init__(self, fn: Callable[[list[list[int]]], torch.Tensor], objectives: Sequence[str]):
        self.fn = fn
        self._objectives = list(objectives)

    @property
    def objectives(self) -> list[str]:
        return list(self._objectives)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.seqs = _rows(input_ids, attention_mask)
        self.prompt_lengths = [len(seq) for seq in self.seqs]

    def append(self, tokens: torch.Tensor) -> None:
        for seq, t in zip(self.seqs, tokens.tolist()):
            seq.append(int(t))

    def score(self, candidates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        b, k = candidates.shape
        flat = [seq + [int(c)] for seq, row in zip(self.seqs, candidates.tolist()) for c in row]
        kwargs = {"prompt_lengths": [n for n in self.prompt_lengths for _ in range(k)]} if getattr(self.fn, "takes_prompt_lengths", False) else {}
        if getattr(self.fn, "takes_weights", False):
            if weights is None:
                raise ValueError("this value function needs the objective weights")
            values = torch.as_tensor(self.fn(flat, weights.float().cpu().repeat_interleave(k, dim=0), **kwargs), dtype=torch.float32)
        else:
            values = torch.as_tensor(self.fn(flat, **kwargs), dtype=torch.float32)
        if values.shape != (b * k, len(self._objectives)):
            raise ValueError(f"value function returned shape {list(values.shape)}, expected {[b * k, len(self._objectives)]}")
        return values.reshape(b, k, -1)

    def reorder(self, index: torch.Tensor) -> None:
        self.seqs = [list(self.seqs[i]) for i in index.tolist()]
        self.prompt_lengths = [self.prompt_lengths[i] for i in index.tolist()]


def naive_value_fn(models: Sequence[ValueModel], bindings: Sequence[ObjectiveBinding]) -> Callable[[list[list[int]]], torch.Tensor]:
    """A :class:`SequenceValueScorer` function that runs every sequence through every model alone."""

    @torch.no_grad()
    def fn(seqs: list[list[int]], weights: torch.Tensor | None = None, prompt_lengths: list[int] | None = None) -> torch.Tensor:
        out = torch.zeros(len(seqs), len(bindings))
        for i, seq in enumerate(seqs):
            for mi, model in enumerate(models):
                heads = [(j, bd.head) for j, bd in enumerate(bindings) if bd.model == mi]
                if not heads:
                    continue
                device = next(model.parameters()).device
                lam = model_weights(model, mi, bindings, None if weights is None else weights[i : i + 1])
                plen = None if prompt_lengths is None else torch.tensor([prompt_lengths[i]], device=device)
                v = model(torch.tensor([seq], device=device), weights=None if lam is None else lam.to(device), prompt_lengths=plen).values[0, -1]
                for j, h in heads:
                    out[i, j] = v[h]
        return out

    fn.takes_weights = True
    fn.takes_prompt_lengths = True
    return fn
