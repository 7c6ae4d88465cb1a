"""Value models: a causal-LM backbone (no LM head) plus a linear regression head per objective.

V(s) is read at the last token of s. A value model must share the base model's tokenizer,
because MAVIS scores the base model's candidate tokens by id; the tokenizer's fingerprint is
stored with the weights and checked before use.

On disk (no pickle anywhere)::

    folder/
      meta.json            format, version, objectives, tokenizer fingerprint, backbone, training
      backbone/            config.json + model.safetensors (``save_pretrained``)
      heads.safetensors    linear heads: weight [M, D], bias [M] (D = pool_width of the pool, H for
                           "last"); pool "prompt+response" adds pool.centre [2, H]; MLP heads (``head_hidden`` d > 0):
                           w1 [M, d, H], b1 [M, d], w2 [M, d], b2 [M]; preference-conditioned heads
                           (``conditioned``): see :class:`ConditionedHeads`
      tokenizer/           the tokenizer, so the folder is self-contained

A model whose frozen backbone is the base model's own first N layers (``trunk:N``) can be saved
without ``backbone/`` and ``tokenizer/`` (``save(..., with_backbone=False)``: a few dozen KB);
loading rebuilds the trunk from the base model named in ``meta.json`` and refuses it unless its
weights match the recorded trunk fingerprint byte for byte.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "mavis-align-value-model"
FORMAT_VERSION = 1
POOL_CENTRE_KEY = "pool.centre"  # in heads.safetensors: (c_p, c_r) [2, H] of a "prompt+response" model

# What the heads read at position t: "last" = the hidden state h_t (the paper's regression head),
# "mean" = the mean of h_1..h_t over real tokens, "mean+last" = both, concatenated;
# "prompt+response" = the mean p of the prompt's states, the mean r of the response's states up to t,
# and their interaction (:func:`prompt_response_features`): a linear head on p and r alone cannot say
# how well this response fits this prompt, which is what rewards such as relevance (cosine of prompt
# and response embeddings) or "refuses a harmful request" measure. Means are carried forward
# incrementally at decode time (running sums per row), so they cost nothing extra.
POOLS = ("last", "mean", "mean+last", "prompt+response")


def pool_width(pool: str, hidden_size: int) -> int:
    """Width of what the heads read for ``pool`` on a trunk of width ``hidden_size``."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return {"last": hidden_size, "mean": hidden_size, "mean+last": 2 * hidden_size, "prompt+response": 3 * hidden_size + 2}[pool]


def prompt_response_features(prompt: torch.Tensor, response: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The "prompt+response" head input: [p, r, u(p − c_p) ⊙ u(r − c_r), cos(p, r), cos(p − c_p, r − c_r)].

    Args:
        prompt: [..., H] mean state of the prompt's tokens; response: [..., H] mean state of the
            response tokens so far (zeros before the first); centre: [2, H] (c_p, c_r), the training
            features' means (zeros until fitted). u(x) = x / |x|.
    Returns:
        [..., 3H + 2] float32. A linear head on it is a bilinear form in the centred directions
        of p and r (Σ_h w_h û_p,h û_r,h) plus linear terms in p and r.
    """
    p, r = prompt.float(), response.float()
    up, ur = nn.functional.normalize(p, dim=-1, eps=1e-12), nn.functional.normalize(r, dim=-1, eps=1e-12)
    cp = nn.functional.normalize(p - centre[0], dim=-1, eps=1e-12)
    cr = nn.functional.normalize(r - centre[1], dim=-1, eps=1e-12)
    cos = (up * ur).sum(-1, keepdim=True)
    cos_c = (cp * cr).sum(-1, keepdim=True)
    return torch.cat([p, r, cp * cr, cos, cos_c], dim=-1)


def prompt_response_means(hidden: torch.Tensor, attention_mask: torch.Tensor | None, prompt_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal means of the prompt's and the response's states at every position (float32).

    Args:
        hidden: [B, T, H]; attention_mask: [B, T] with 1 on real tokens (left or right padding) or
            None; prompt_lengths: [B] number of real prompt tokens that start each row.
    Returns:
        (prompt [B, T, H], response [B, T, H]): at position t the mean over the prompt tokens up to t
        and over the response tokens up to t (zeros where there are none yet).
    """
    real = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask.to(hidden.device, torch.float32)
    index = real.cumsum(1) - 1  # position among the real tokens
    in_prompt = real * (index < prompt_lengths.to(hidden.device)[:, None]).float()
    return running_mean(hidden, in_prompt), running_mean(hidden, real - in_prompt)

# A value model whose backbone is frozen (``meta["frozen_backbone"]``) records a fingerprint of the
# backbone's weights: models with equal fingerprints share one trunk forward at decode time, and
# training computes the trunk's features once instead of at every step.


class ValueModelError(ValueError):
    """A value-model folder is missing, corrupt, or does not fit the base model."""


class TokenizerMismatchError(ValueModelError):
    """The value model was built for another tokenizer than the base model's."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id) and the EOS/BOS ids. Padding choices do not count."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class ValueOutput:
    """values: [B, T, M] value of every prefix ending at each position; cache: backbone KV cache."""

    values: torch.Tensor
    cache: object | None = None


class MLPHeads(nn.Module):
    """M independent two-layer heads on a shared hidden state: v_m = w2_m · gelu(W1_m h + b1_m) + b2_m.

    Args:
        hidden_size: H; num_heads: M; head_hidden: d.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_hidden: int):
        super().__init__()
        if head_hidden < 1:
            raise ValueError(f"head_hidden must be >= 1, got {head_hidden}")
        self.w1 = nn.Parameter(torch.randn(num_heads, head_hidden, hidden_size) * hidden_size**-0.5)
        self.b1 = nn.Parameter(torch.zeros(num_heads, head_hidden))
        self.w2 = nn.Parameter(torch.randn(num_heads, head_hidden) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(num_heads))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., H] -> [..., M]."""
        z = torch.nn.functional.gelu(torch.einsum("...h,mdh->...md", h, self.w1) + self.b1)
        return torch.einsum("...md,md->...m", z, self.w2) + self.b2


class ConditionedHeads(nn.Module):
    """Heads that read the objective weights too (one preference-conditioned value model V(s, λ)):

        u(h, λ) = W h + b  +  W2 · gelu(W1 h + U λ + b1) + b2          [..., M]
        V(s, λ) = Σ_m λ_m u_m(h_s, λ)

    The decoder combines u with λ exactly as it combines M separate values (``combine_values``),
    so one engine serves both. The linear part alone is the λ-sum of linear heads; the gated part
    lets the combined value depend on λ non-linearly (the soft value of Σ λ_m R_m is not the
    λ-sum of the per-objective soft values). u_m alone is not a value of objective m, except at
    λ = e_m, where V(s, e_m) = u_m(h_s, e_m).

    Args:
        hidden_size: H; num_heads: M (objectives); head_hidden: d, width of the gated part.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_hidden: int):
        super().__init__()
        if head_hidden < 1:
            raise ValueError(f"a preference-conditioned head needs head_hidden >= 1, got {head_hidden}")
        self.weight = nn.Parameter(torch.randn(num_heads, hidden_size) * 0.02)
        self.bias = nn.Parameter(torch.zeros(num_heads))
        self.w1 = nn.Parameter(torch.randn(head_hidden, hidden_size) * hidden_size**-0.5)
        self.u = nn.Parameter(torch.randn(head_hidden, num_heads))
        self.b1 = nn.Parameter(torch.zeros(head_hidden))
        self.w2 = nn.Parameter(torch.randn(num_heads, head_hidden) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(num_heads))

    def forward(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """h: [..., H], weights: [..., M] (same leading shape) -> u [..., M]."""
        z = torch.nn.functional.gelu(h @ self.w1.T + weights.to(h.dtype) @ self.u.T + self.b1)
        return h @ self.weight.T + self.bias + z @ self.w2.T + self.b2


def broadcast_weights(weights: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Objective weights [B, M] (or [M]) -> [*shape[:-1], M]: one row per leading index of a
    [B, ..., H] hidden-state tensor of shape ``shape``."""
    lead = tuple(shape[:-1])
    w = weights if weights.dim() > 1 else weights[None].expand(lead[0] if lead else 1, -1)
    if lead and w.shape[0] != lead[0]:
        raise ValueError(f"objective weights have {w.shape[0]} rows for a batch of {lead[0]}")
    return w.reshape(w.shape[0], *([1] * (len(lead) - 1)), w.shape[-1]).expand(*lead, w.shape[-1])


def make_heads(hidden_size: int, num_heads: int, head_hidden: int = 0, conditioned: bool = False) -> nn.Module:
    """Linear heads (``head_hidden`` 0, the paper's regression head), :class:`MLPHeads`, or
    :class:`ConditionedHeads` (``conditioned``)."""
    if conditioned:
        return ConditionedHeads(hidden_size, num_heads, head_hidden)
    if head_hidden == 0:
        head = nn.Linear(hidden_size, num_heads)
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head
    return MLPHeads(hidden_size, num_heads, head_hidden)


def heads_state(head: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous() for k, v in head.state_dict().items()}


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``module``'s parameters and buffers."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ValueModel(nn.Module):
    """Backbone + ``nn.Linear(hidden, M)``: one scalar value per objective at every position.

    Args:
        backbone: a transformers base model (e.g. ``LlamaModel``) returning ``last_hidden_state``.
        objectives: names of the M heads, in column order.
        tokenizer_fingerprint: :func:`tokenizer_fingerprint` of the tokenizer it reads.
        meta: extra JSON-serialisable description (training config, lineage) saved with it.
        tokenizer: optional tokenizer object, saved into the folder so it is self-contained.
        head_hidden: 0 for linear heads (the paper's regression head), d > 0 for per-objective
            two-layer MLP heads of width d (see :class:`MLPHeads`).
        pool: what the heads read (see :data:`POOLS`).
        conditioned: one preference-conditioned model V(s, λ) (:class:`ConditionedHeads`, width
            ``head_hidden``): its outputs must be read with the objective weights.
    """

    def __init__(
        self,
        backbone: nn.Module,
        objectives: Sequence[str],
        tokenizer_fingerprint: str,
        meta: dict | None = None,
        tokenizer=None,
        head_hidden: int = 0,
        pool: str = "last",
        conditioned: bool = False,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        objectives = list(objectives)
        if not objectives:
            raise ValueError("a value model needs at least one objective")
        if len(set(objectives)) != len(objectives):
            raise ValueError(f"objective names must be unique, got {objectives}")
        self.backbone = backbone
        self.objectives = objectives
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.meta = dict(meta or {})
        self.tokenizer = tokenizer
        self.head_hidden = int(head_hidden)
        self.pool = pool
        self.conditioned = bool(conditioned)
        self.head = make_heads(pool_width(pool, self.hidden_size), len(objectives), self.head_hidden, self.conditioned)
        if pool == "prompt+response":  # (c_p, c_r) of :func:`prompt_response_features`; fitted by training
            self.register_buffer("pool_centre", torch.zeros(2, self.hidden_size))
        if self.meta.get("frozen_backbone"):
            self.backbone.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def frozen_backbone(self) -> bool:
        return bool(self.meta.get("frozen_backbone"))

    @property
    def trunk_key(self) -> str | None:
        """Fingerprint of a frozen backbone (models with equal keys can share one trunk forward)."""
        return self.meta.get("trunk_fingerprint") if self.frozen_backbone else None

    def freeze_backbone(self) -> None:
        """Freeze the backbone (only the heads train) and record its weights' fingerprint."""
        if self.is_lora:
            raise ValueError("a LoRA value model trains its backbone; it cannot also be frozen")
        self.backbone.requires_grad_(False)
        self.meta["frozen_backbone"] = True
        self.meta["trunk_fingerprint"] = weights_fingerprint(self.backbone)

    def place(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "ValueModel":
        """Move to a placement (None: the current one, see :mod:`mavis_align.placement`): the
        backbone in ``dtype``, the heads in float32 (they are tiny, and their values feed
        NORMALIZE, the regression targets and the ridge solve). Returns self."""
        from .placement import placement_of

        place = placement_of(device, dtype)
        self.backbone.to(device=place.device, dtype=place.dtype)
        self.head.to(device=place.device, dtype=torch.float32)
        if self.pool == "prompt+response":
            self.pool_centre = self.pool_centre.to(device=place.device, dtype=torch.float32)
        return self

    @property
    def needs_pool_centre(self) -> bool:
        """A "prompt+response" model whose centre has not been fitted yet (see :meth:`set_pool_centre`)."""
        return self.pool == "prompt+response" and not self.meta.get("pool_centre_fitted")

    def set_pool_centre(self, prompt_mean: torch.Tensor, response_mean: torch.Tensor) -> None:
        """Fix (c_p, c_r) of a "prompt+response" model ([H] each), e.g. the training features' means;
        recorded in meta, so training it further keeps them (the heads keep reading the same features)."""
        if self.pool != "prompt+response":
            raise ValueError(f"pool={self.pool!r} has no centre")
        self.pool_centre = torch.stack([prompt_mean, response_mean]).float().to(self.pool_centre.device)
        self.meta["pool_centre_fitted"] = True

    def values_from_hidden(self, hidden: torch.Tensor, mean: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                           prompt: torch.Tensor | None = None, response: torch.Tensor | None = None) -> torch.Tensor:
        """Heads applied to backbone states -> values [..., M] (float32).

        Args:
            hidden: [..., H] the state at the scored position; mean: [..., H] the mean state of
                the real tokens up to and including it (pools "mean" and "mean+last").
            weights: [B, M] objective weights over this model's objectives, rows summing to 1
                (B = hidden's first axis); required by a :attr:`conditioned` model, whose outputs
                u [..., M] give V(s, λ) = Σ_m λ_m u_m. Ignored by the others.
            prompt, response: [..., H] the mean states of the prompt and of the response so far
                (pool "prompt+response", see :func:`prompt_response_means`).
        """
        x = self.head_input(hidden, mean, prompt, response).to(self._head_dtype())
        if not self.conditioned:
            return self.head(x).float()
        if weights is None:
            raise ValueError("a preference-conditioned value model needs the objective weights λ to compute values")
        if weights.shape[-1] != len(self.objectives):
            raise ValueError(f"objective weights have {weights.shape[-1]} columns; this value model has {len(self.objectives)} objectives")
        return self.head(x, broadcast_weights(weights.to(x.device, x.dtype), x.shape)).float()

    def head_input(self, hidden: torch.Tensor, mean: torch.Tensor | None = None, prompt: torch.Tensor | None = None,
                   response: torch.Tensor | None = None) -> torch.Tensor:
        """What the heads read, [..., :func:`pool_width`] (see :data:`POOLS`)."""
        if self.pool == "last":
            return hidden
        if self.pool == "prompt+response":
            if prompt is None or response is None:
                raise ValueError("a value model with pool='prompt+response' needs the mean states of the prompt and of the response")
            return prompt_response_features(prompt, response, self.pool_centre)
        if mean is None:
            raise ValueError(f"a value model with pool={self.pool!r} needs the running mean of the hidden states")
        return mean if self.pool == "mean" else torch.cat([mean, hidden], dim=-1)

    def _head_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    @property
    def lora_config(self) -> dict | None:
        return self.meta.get("lora")

    def objective_index(self, name: str) -> int:
        try:
            return self.objectives.index(name)
        except ValueError:
            raise ValueError(f"value model has no objective {name!r}; it has {', '.join(self.objectives)}") from None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
        weights: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> ValueOutput:
        """Values of every prefix.

        Args:
            input_ids: [B, T].
            attention_mask: [B, T_past + T] 2D padding mask, or a 4D float/bool mask
                [B, 1, T, T_past + T] as transformers accepts.
            position_ids: [B, T].
            cache: a transformers ``Cache`` holding the past, or None.
            weights: [B, M] objective weights (a :attr:`conditioned` model needs them).
            prompt_lengths: [B] real prompt tokens at the start of each row (pool "prompt+response").
        Returns:
            ValueOutput with values [B, T, M] (float32) and the cache.
        """
        mean = prompt = response = None
        if self.pool == "prompt+response" and prompt_lengths is None:
            raise ValueError("pool='prompt+response' needs prompt_lengths: where each row's prompt ends")
        if self.pool != "last":
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"pool={self.pool!r}: the mean needs every earlier state; score a cached prefix with CachedValueScorer")
            if attention_mask is not None and attention_mask.dim() != 2:
                raise ValueError(f"pool={self.pool!r} needs a 2D padding mask")
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache
        )
        if self.pool == "prompt+response":
            prompt, response = prompt_response_means(out.last_hidden_state, attention_mask, prompt_lengths)
        elif self.pool != "last":
            mean = running_mean(out.last_hidden_state, attention_mask)
        values = self.values_from_hidden(out.last_hidden_state, mean, weights, prompt, response)
        return ValueOutput(values, getattr(out, "cache", None) if use_cache else None)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor | None = None,
              prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """V(s) at the last real token of each row, for left- or right-padded batches.

        Args:
            input_ids: [B, T]; attention_mask: [B, T] with 1 on real tokens.
            weights: [B, M] objective weights (a :attr:`conditioned` model needs them).
            prompt_lengths: [B] (pool "prompt+response", see :meth:`forward`).
        Returns:
            [B, M] float32.
        """
        attention_mask = attention_mask.long()
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("every row needs at least one real token")
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        values = self.forward(input_ids, attention_mask=attention_mask, position_ids=position_ids, weights=weights,
                              prompt_lengths=prompt_lengths).values
        T = attention_mask.shape[1]
        # index of the last 1 in each row
        last = T - 1 - torch.argmax(attention_mask.flip(-1), dim=-1)
        return values[torch.arange(values.shape[0], device=values.device), last]

    # ------------------------------------------------------------------ LoRA

    def add_lora(self, rank: int = 16, alpha: float = 32.0, dropout: float = 0.05, target_modules: Sequence[str] | None = None) -> None:
        """Wrap the backbone with peft LoRA adapters; the heads stay fully trainable."""
        from peft import LoraConfig, get_peft_model

        if self.lora_config is not None and self.is_lora:
            raise ValueError("this value model already has LoRA adapters")
        if self.frozen_backbone:
            raise ValueError("this value model's backbone is frozen (shared trunk); LoRA would change it")
        targets = list(target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"])
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
        self.backbone = get_peft_model(self.backbone, config)
        self.meta["lora"] = {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": targets}

    @property
    def is_lora(self) -> bool:
        return hasattr(self.backbone, "merge_and_unload")

    def plain_backbone(self) -> nn.Module:
        """The backbone with any LoRA adapters merged in (a copy when merging was needed)."""
        return copy.deepcopy(self.backbone).merge_and_unload() if self.is_lora else self.backbone

    # ------------------------------------------------------------------ persistence

    @property
    def trunk_source(self) -> tuple[str, int] | None:
        """(base model, N) when the backbone is the base model's first N layers, frozen (``trunk:N``):
        it can then be rebuilt from the base model instead of being stored."""
        return trunk_source(self.meta)

    def save(self, folder: str | Path, *, with_backbone: bool = True) -> Path:
        """Write the model to ``folder`` atomically (a temp sibling renamed into place).

        LoRA adapters are merged into the saved backbone; ``meta.json`` records their config.
        ``with_backbone=False``: heads and meta only, for a :attr:`trunk_source` model (its trunk is
        rebuilt from the base model on load and checked against the trunk fingerprint).
        """
        if not with_backbone and self.trunk_source is None:
            raise ValueModelError("only a frozen trunk:N backbone with a recorded base_model can be left out of the saved folder "
                                  f"(this one: backbone {self.meta.get('backbone')!r}, frozen {self.frozen_backbone}, base_model {self.meta.get('base_model')!r})")
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            backbone = self.plain_backbone()
            if with_backbone:
                backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
            state = heads_state(self.head)
            if self.pool == "prompt+response":
                state[POOL_CENTRE_KEY] = self.pool_centre.detach().float().cpu().contiguous()
            save_file(state, str(tmp / "heads.safetensors"))
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "objectives": self.objectives,
                "hidden_size": self.hidden_size,
                "head_hidden": self.head_hidden,
                "pool": self.pool,
                "conditioned": self.conditioned,
                "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "backbone_class": type(backbone).__name__,
                **{k: v for k, v in self.meta.items() if k not in {"format", "format_version", "objectives", "backbone_saved"}},
                **({} if with_backbone else {"backbone_saved": False}),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if self.tokenizer is not None and with_backbone:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "ValueModel":
        """Load a folder written by :meth:`save` (or a hub id holding one, see
        :func:`mavis_align.hub.push_to_hub`), with precise errors for anything wrong.

        ``device``/``dtype``: where the model goes (None: the current placement, see
        :mod:`mavis_align.placement`); the weights are checked in the dtype they were saved in."""
        from transformers import AutoModel

        from .hub import resolve_value_source

        folder = resolve_value_source(folder)  # a local folder, or a hub id fetched to one: then one code path
        if not folder.is_dir():
            raise ValueModelError(f"value model folder {str(folder)!r} does not exist")
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise ValueModelError(f"{folder} is not a mavis-align value model: meta.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueModelError(f"{meta_path} is not valid JSON: {err}") from err
        if meta.get("format") != FORMAT:
            raise ValueModelError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueModelError(
                f"{meta_path}: format_version {meta.get('format_version')!r} is not supported (this version reads {FORMAT_VERSION})"
            )
        for key in ("objectives", "tokenizer_fingerprint", "hidden_size"):
            if key not in meta:
                raise ValueModelError(f"{meta_path} lacks the field {key!r}")
        rebuild = meta.get("backbone_saved") is False
        if not rebuild and not (folder / "backbone" / "config.json").is_file():
            raise ValueModelError(f"{folder}: backbone/config.json is missing")
        heads_path = folder / "heads.safetensors"
        if not heads_path.is_file():
            raise ValueModelError(f"{folder}: heads.safetensors is missing")
        try:
            heads = load_file(str(heads_path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueModelError(f"{heads_path} could not be read ({type(err).__name__}: {err})") from err
        tokenizer = None
        if rebuild:
            backbone, tokenizer = _rebuild_trunk(folder, meta)
        else:
            try:
                backbone = AutoModel.from_pretrained(str(folder / "backbone"), dtype="auto")  # as saved: the fingerprint is of those bytes
            except Exception as err:
                raise ValueModelError(f"{folder / 'backbone'} could not be loaded ({type(err).__name__}: {err})") from err
        m, h = len(meta["objectives"]), int(meta["hidden_size"])
        d = meta.get("head_hidden", 0)
        if not isinstance(d, int) or d < 0:
            raise ValueModelError(f"{meta_path}: head_hidden must be an integer >= 0, got {d!r}")
        pool = meta.get("pool", "last")
        if pool not in POOLS:
            raise ValueModelError(f"{meta_path}: pool must be one of {POOLS}, got {pool!r}")
        if int(backbone.config.hidden_size) != h:
            raise ValueModelError(f"{folder}: backbone hidden size {backbone.config.hidden_size} != meta hidden_size {h}")
        conditioned = meta.get("conditioned", False)
        if not isinstance(conditioned, bool) or (conditioned and d < 1):
            raise ValueModelError(f"{meta_path}: conditioned must be true or false (true needs head_hidden >= 1), got {conditioned!r}")
        expected = {k: tuple(v.shape) for k, v in make_heads(pool_width(pool, h), m, d, conditioned).state_dict().items()}
        if pool == "prompt+response":
            expected[POOL_CENTRE_KEY] = (2, h)
        if {k: tuple(v.shape) for k, v in heads.items()} != expected:
            raise ValueModelError(
                f"{heads_path}: expected { {k: list(v) for k, v in expected.items()} } for objectives {meta['objectives']} "
                f"(head_hidden {d}), got { {k: list(v.shape) for k, v in heads.items()} }"
            )
        extra = {k: v for k, v in meta.items() if k not in {"format", "format_version", "objectives", "tokenizer_fingerprint", "hidden_size", "backbone_class",
                                                             "head_hidden", "pool", "conditioned", "backbone_saved"}}
        if extra.get("frozen_backbone") and extra.get("trunk_fingerprint") != weights_fingerprint(backbone):
            if rebuild:
                base, n = trunk_source(meta)
                raise ValueModelError(f"{folder}: the first {n} layers of {base!r} on this machine are not the weights these heads were trained on "
                                      "(trunk fingerprint differs: another revision, conversion or precision of the base model)")
            raise ValueModelError(f"{folder}: the frozen backbone's weights do not match the fingerprint in meta.json (file changed or corrupt)")
        if tokenizer is None and (folder / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        model = cls(backbone, meta["objectives"], meta["tokenizer_fingerprint"], extra, tokenizer, head_hidden=d, pool=pool, conditioned=conditioned)
        centre = heads.pop(POOL_CENTRE_KEY, None)
        model.head.load_state_dict(heads)
        if centre is not None:
            model.pool_centre = centre.float()
        return model.place(device, dtype).eval()


def trunk_source(meta: dict) -> tuple[str, int] | None:
    """(base model, N) when ``meta`` describes a frozen backbone that is the base model's first N layers
    (``backbone: trunk:N``, ``base_model`` and ``trunk_fingerprint`` recorded), else None."""
    spec, base = str(meta.get("backbone", "")), meta.get("base_model")
    kind, _, n = spec.partition(":")
    if kind != "trunk" or not n.isdigit() or not base or not meta.get("frozen_backbone") or not meta.get("trunk_fingerprint"):
        return None
    return str(base), int(n)


def _rebuild_trunk(folder: Path, meta: dict):
    """The frozen ``trunk:N`` backbone of a model saved without it: the first N layers of
    ``meta["base_model"]`` (float32) -> (backbone, tokenizer); :meth:`ValueModel.load` checks its fingerprint."""
    from .models import load_causal_lm

    source = trunk_source(meta)
    if source is None:
        raise ValueModelError(f"{folder}: saved without its backbone, but meta.json does not describe a frozen trunk:N of a base model "
                              f"(backbone {meta.get('backbone')!r}, base_model {meta.get('base_model')!r}, "
                              f"trunk_fingerprint {'set' if meta.get('trunk_fingerprint') else 'missing'})")
    base, n = source
    try:
        lm, tokenizer = load_causal_lm(base, device="cpu", dtype=torch.float32)
    except Exception as err:
        cause = (str(err).strip().splitlines() or [""])[0]
        raise ValueModelError(f"{folder}: its trunk is the first {n} layers of {base!r}, which could not be loaded: {type(err).__name__}: {cause}") from err
    return truncated_backbone(lm, n), tokenizer


def running_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the states of the real tokens up to each position: [B, T, H] -> [B, T, H] (float32).

    Args:
        attention_mask: [B, T] with 1 on real tokens (left or right padding), or None (all real).
    """
    h = hidden.float()
    if attention_mask is None:
        weights = torch.ones(h.shape[:2], device=h.device)
    else:
        weights = attention_mask.to(h.device, torch.float32)
    sums = (h * weights[..., None]).cumsum(1)
    return sums / weights.cumsum(1).clamp(min=1.0)[..., None]


def check_tokenizer(value_model: ValueModel, tokenizer, *, name: str = "value model") -> None:
    """Raise :class:`TokenizerMismatchError` unless ``value_model`` reads ``tokenizer``'s ids."""
    fp = tokenizer_fingerprint(tokenizer)
    if fp != value_model.tokenizer_fingerprint:
        raise TokenizerMismatchError(
            f"{name} was trained with a different tokenizer than the base model "
            f"(fingerprint {value_model.tokenizer_fingerprint[:12]}... vs base {fp[:12]}...); "
            "MAVIS scores the base model's token ids, so the value model must share its tokenizer"
        )


# ---------------------------------------------------------------------- backbones


def tiny_llama_backbone(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    embeddings: torch.Tensor | None = None,
    seed: int = 0,
):
    """A small randomly initialised ``LlamaModel`` (optionally with given input embeddings).

    Args:
        embeddings: [vocab_size, hidden_size] initial token embeddings (e.g. from
            :func:`pca_embeddings` of the base model), or None for random ones.
    """
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaModel(config)
    if embeddings is not None:
        if tuple(embeddings.shape) != (vocab_size, hidden_size):
            raise ValueError(f"embeddings must be [{vocab_size}, {hidden_size}], got {list(embeddings.shape)}")
        with torch.no_grad():
            model.embed_tokens.weight.copy_(embeddings)
    return model


def pca_embeddings(base_embeddings: torch.Tensor, dim: int, *, seed: int = 0) -> torch.Tensor:
    """Project base token embeddings [V, D] onto their top ``dim`` principal directions -> [V, dim].

    Rescaled to a per-entry std of 0.02 (the usual init scale), so a small value model starts
    from the base model's notion of which tokens are alike instead of from noise.
    """
    x = base_embeddings.detach().float()
    x = x - x.mean(0, keepdim=True)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(x, q=dim, center=False, niter=4)
    finally:
        torch.random.set_rng_state(gen_state)
    z = x @ v[:, :dim]
    return z * (0.02 / z.std().clamp(min=1e-8))


def truncated_backbone(causal_lm, num_layers: int):
    """The base model of ``causal_lm`` keeping only its first ``num_layers`` decoder layers (a copy)."""
    base = copy.deepcopy(causal_lm.base_model)
    total = len(base.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    base.layers = nn.ModuleList(list(base.layers)[:num_layers])
    base.config.num_hidden_layers = num_layers
    if getattr(base.config, "layer_types", None):
        base.config.layer_types = list(base.config.layer_types)[:num_layers]
    return base


BACKBONES = {
    "tiny": "LlamaModel, hidden 128, 2 layers, 4 heads; token embeddings from a PCA of the base's (6.8M params)",
    "tiny-256": "LlamaModel, hidden 256, 4 layers, 4 heads; PCA-initialised embeddings (16.5M params)",
    "truncate:N": "the base model's own first N decoder layers (pretrained), all weights trained",
    "trunk:N": "the base model's first N decoder layers (pretrained), frozen: only the heads train, on features computed once; value models on the same trunk share one trunk forward when decoding",
    "<name or path>": "any causal LM / base model loadable by from_pretrained (must share the base tokenizer)",
}
DEFAULT_VALUE_BACKBONE = "trunk:4"


def default_pool(backbone: str) -> str:
    """A frozen trunk reads the prompt and response means and their interaction (measured best,
    benchmarks/value_backbones.py); trained backbones keep the paper's last-state head."""
    return "prompt+response" if backbone.startswith("trunk:") else "last"


def build_value_model(
    objectives: Sequence[str],
    *,
    backbone: str = DEFAULT_VALUE_BACKBONE,
    base_model: str | None = None,
    seed: int = 0,
    head_hidden: int = 0,
    pool: str | None = None,
    conditioned: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ValueModel:
    """Create an untrained value model for ``objectives`` that reads the base model's tokenizer.

    Args:
        backbone: ``"tiny"``, ``"tiny-256"``, ``"truncate:N"``, ``"trunk:N"`` or a model name/path
            (see BACKBONES).
        base_model: the base (pi_ref) model name; default: the embedded default.
        seed: initialisation seed of random parameters.
        head_hidden: 0 for linear heads, d > 0 for two-layer MLP heads of width d.
        pool: what the heads read: "last" (the paper), "mean" or "mean+last" (see :data:`POOLS`);
            None: :func:`default_pool` of the backbone.
        conditioned: one preference-conditioned model V(s, λ) over all ``objectives``
            (:class:`ConditionedHeads` of width ``head_hidden``, default 64 when 0 is given).
        device, dtype: where the model goes (None: the current placement); the backbone takes
            ``dtype``, the heads stay float32 (:meth:`ValueModel.place`).
    """
    from .placement import placement_of

    place = placement_of(device, dtype)
    pool = pool or default_pool(backbone)
    from .models import DEFAULT_BASE_MODEL, load_causal_lm, load_tokenizer, resolve_model

    base_model = base_model or DEFAULT_BASE_MODEL
    tokenizer = load_tokenizer(base_model)
    frozen = backbone.startswith("trunk:")
    if backbone in ("tiny", "tiny-256") or backbone.startswith(("truncate:", "trunk:")):
        # on the CPU: only the first layers (or a PCA of the embeddings, in fp32) are kept, then placed
        lm, _ = load_causal_lm(base_model, device="cpu", dtype=torch.float32 if backbone in ("tiny", "tiny-256") else place.dtype)
        if backbone.startswith(("truncate:", "trunk:")):
            kind, _, num = backbone.partition(":")
            try:
                n = int(num)
            except ValueError as err:
                raise ValueError(f"backbone {backbone!r}: expected {kind}:N with an integer N") from err
            net = truncated_backbone(lm, n)
        else:
            hidden, layers = (128, 2) if backbone == "tiny" else (256, 4)
            emb = pca_embeddings(lm.get_input_embeddings().weight, hidden, seed=seed)
            net = tiny_llama_backbone(emb.shape[0], hidden_size=hidden, num_layers=layers, embeddings=emb, seed=seed)
        del lm
    else:
        from transformers import AutoModel

        from .models import model_load_error

        resolved = resolve_model(backbone)
        kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
        try:
            net = AutoModel.from_pretrained(resolved.source, dtype=place.dtype, **kwargs)
        except (OSError, ValueError) as err:
            raise model_load_error(backbone, err) from err
        if resolved.gguf_file:
            net.hf_quantizer = None
            net.config.quantization_config = None
        if tokenizer_fingerprint(load_tokenizer(backbone)) != tokenizer_fingerprint(tokenizer):
            raise TokenizerMismatchError(
                f"backbone {backbone!r} uses a different tokenizer than base model {base_model!r}; "
                "a value model must read the base model's token ids"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        meta = {"backbone": backbone, "base_model": base_model, "seed": seed}
        if conditioned and not head_hidden:
            head_hidden = 64
        model = ValueModel(net, objectives, tokenizer_fingerprint(tokenizer), meta, tokenizer, head_hidden=head_hidden, pool=pool,
                           conditioned=conditioned)
    model.place(place.device, place.dtype)
    if frozen:
        model.freeze_backbone()
    return model
