"""MAVIS as a transformers ``LogitsProcessor``, for users who live inside ``model.generate``.

    proc = MavisLogitsProcessor(value_models, weights={"helpful": 0.7, "harmless": 0.3}, beta=5.0,
                                top_k=15, attention_mask=enc["attention_mask"])
    model.generate(**enc, logits_processor=[proc], do_sample=True, top_k=0, top_p=1.0, temperature=1.0)

It returns log pi_MAVIS over the top-k candidates (-inf elsewhere, or the kept tail), computed by the engine's one
per-step function (:func:`~mavis_align.decoding.engine.step_distribution`), so ``generate`` samples
from the same distribution as :class:`~mavis_align.decoding.decoder.MavisDecoder`; tokens that an
earlier processor set to -inf (banned words, constraints) stay impossible and do not enter NORMALIZE. Leave ``generate``'s
own temperature / top-k / top-p at 1 / 0 / 1 and set ``temperature`` here instead. The processor
keeps its own KV caches for the value models; one instance serves one ``generate`` call at a time
(it restarts by itself when a new call begins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..generation import DEFAULT_TOP_K, SamplingConfig
from ..values import ValueModel
from .engine import RowSpec, RowTensors, step_distribution
from .steppers import CachedValueScorer, bind_objectives
from .tilt import resolve_weights


class MavisLogitsProcessor:
    """``__call__(input_ids [B, L], scores [B, V]) -> [B, V]`` log pi_MAVIS (new tensor).

    Args:
        value_models: value models sharing the base tokenizer.
        weights: {objective: lambda} for the batch, or one dict per row.
        beta: tilt strength (>= 0).
        top_k: candidates per step (>= 1).
        normalize: min-max normalise combined values (paper eq. 14).
        max_step_kl: cap in nats on the KL the tilt adds per step (0 = none; see ``SamplingConfig``).
        tail: ``"drop"`` (the paper: only the top-k candidates get mass) or ``"keep"`` (tokens outside
            them keep pi_ref's mass, tilted by a baseline value; see ``SamplingConfig.tail``).
        tilt_tokens: tilt only the first that many generated tokens (0 = every token; ``SamplingConfig.tilt_tokens``).
        candidate_p: the candidates are the fewest of the top-k holding this much of pi_ref's mass (1 = all k).
        temperature: applied to pi_ref before top-k, as in the native decoder.
        names: per value model, the objective name of its single head (None: stored names).
        attention_mask: [B, T] mask of the prompt batch given to ``generate`` (left padding);
            when None, leading ``pad_token_id`` tokens are taken as padding.
        pad_token_id: used only when ``attention_mask`` is None.
    """

    def __init__(
        self,
        value_models: Sequence[ValueModel],
        weights: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
        *,
        beta: float = 1.0,
        top_k: int = DEFAULT_TOP_K,
        normalize: bool = True,
        max_step_kl: float = 0.0,
        tail: str = "drop",
        tilt_tokens: int = 0,
        candidate_p: float = 1.0,
        temperature: float = 1.0,
        names: Sequence[str | None] | None = None,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
    ):
        if not value_models:
            raise ValueError("MavisLogitsProcessor needs at least one value model")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.config = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, beta=beta, normalize=normalize,
                                     max_step_kl=max_step_kl, tail=tail, tilt_tokens=tilt_tokens,
                                     candidate_p=candidate_p)  # validates
        if attention_mask is None and pad_token_id is None:
            raise ValueError("give the prompt attention_mask (or pad_token_id to infer left padding)")
        self.models = [vm.eval() for vm in value_models]
        self.bindings = bind_objectives(self.models, names)
        objectives = [b.name for b in self.bindings]
        self.weights = weights if weights is not None else {n: 1.0 for n in objectives}
        resolve_weights(objectives, self.weights, 1 if isinstance(self.weights, Mapping) else len(self.weights))  # validate now
        self.attention_mask = attention_mask
        self.pad_token_id = pad_token_id
        self._seen = None
        self._batch = None

    def _prompt_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is not None:
            if tuple(self.attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask {list(self.attention_mask.shape)} does not match the prompt batch {list(input_ids.shape)}")
            return self.attention_mask.long()
        return ((input_ids != self.pad_token_id).long().cumsum(-1) > 0).long()

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        b, length = input_ids.shape
        if self._seen is None or length <= self._seen or b != self._batch:
            objectives = [bd.name for bd in self.bindings]
            w = resolve_weights(objectives, self.weights, b)
            self._rows = RowTensors.pack([RowSpec(self.config, weights=w[i]) for i in range(b)], len(objectives), scores.device)
            used = (w > 0).any(0)
            active = sorted({bd.model for j, bd in enumerate(self.bindings) if bool(used[j])})
            self.scorer = CachedValueScorer(self.models, self.bindings, active)
            self.scorer.start(input_ids, self._prompt_mask(input_ids))
            self._seen, self._batch, self._start = length, b, length
        for t in range(self._seen, length):
            self.scorer.append(input_ids[:, t])
        self._seen = length
        generated = torch.full((b,), length - self._start, dtype=torch.long, device=scores.device)
        dist = step_distribution(scores, self._rows, scorer=self.scorer, lengths=generated)
        return dist.full(scores.shape[-1]).to(scores.dtype)
