"""Value models: a causal-LM backbone (no LM head) plus a linear regression head per objective.

V(s) is read at the last token of s. A value model must share the base model's tokenizer,
because MAVIS scores the base model's candidate tokens by id; the tokenizer's fingerprint is
stored with the weights and checked before use.

On disk (no pickle anywhere)::

    folder/
      meta.json            format, version, objectives, tokenizer fingerprint, backbone, training
      backbone/            config.json + model.safetensors (``save_pretrained``)
      heads.safetensors    weight [M, H], bias [M]
      tokenizer/           the tokenizer, so the folder is self-contained
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


class ValueModel(nn.Module):
    """Backbone + ``nn.Linear(hidden, M)``: one scalar value per objective at every position.

    Args:
        backbone: a transformers base model (e.g. ``LlamaModel``) returning ``last_hidden_state``.
        objectives: names of the M heads, in column order.
        tokenizer_fingerprint: :func:`tokenizer_fingerprint` of the tokenizer it reads.
        meta: extra JSON-serialisable description (training config, lineage) saved with it.
        tokenizer: optional tokenizer object, saved into the folder so it is self-contained.
    """

    def __init__(
        self,
        backbone: nn.Module,
        objectives: Sequence[str],
        tokenizer_fingerprint: str,
        meta: dict | None = None,
        tokenizer=None,
    ):
        super().__init__()
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
        self.head = nn.Linear(self.hidden_size, len(objectives))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

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
    ) -> ValueOutput:
        """Values of every prefix.

        Args:
            input_ids: [B, T].
            attention_mask: [B, T_past + T] 2D padding mask, or a 4D float/bool mask
                [B, 1, T, T_past + T] as transformers accepts.
            position_ids: [B, T].
            cache: a transformers ``Cache`` holding the past, or None.
        Returns:
            ValueOutput with values [B, T, M] (float32) and the cache.
        """
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache
        )
        values = self.head(out.last_hidden_state).float()
        return ValueOutput(values, getattr(out, "cache", None) if use_cache else None)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """V(s) at the last real token of each row, for left- or right-padded batches.

        Args:
            input_ids: [B, T]; attention_mask: [B, T] with 1 on real tokens.
        Returns:
            [B, M] float32.
        """
        attention_mask = attention_mask.long()
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("every row needs at least one real token")
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        values = self.forward(input_ids, attention_mask=attention_mask, position_ids=position_ids).values
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

    def save(self, folder: str | Path) -> Path:
        """Write the model to ``folder`` atomically (a temp sibling renamed into place).

        LoRA adapters are merged into the saved backbone; ``meta.json`` records their config.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            backbone = self.plain_backbone()
            backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
            save_file(
                {"weight": self.head.weight.detach().float().contiguous(), "bias": self.head.bias.detach().float().contiguous()},
                str(tmp / "heads.safetensors"),
            )
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "objectives": self.objectives,
                "hidden_size": self.hidden_size,
                "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "backbone_class": type(backbone).__name__,
                **{k: v for k, v in self.meta.items() if k not in {"format", "format_version", "objectives"}},
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device = "cpu") -> "ValueModel":
        """Load a folder written by :meth:`save`, with precise errors for anything wrong."""
        from transformers import AutoModel

        folder = Path(folder).expanduser()
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
        if not (folder / "backbone" / "config.json").is_file():
            raise ValueModelError(f"{folder}: backbone/config.json is missing")
        heads_path = folder / "heads.safetensors"
        if not heads_path.is_file():
            raise ValueModelError(f"{folder}: heads.safetensors is missing")
        try:
            heads = load_file(str(heads_path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueModelError(f"{heads_path} could not be read ({type(err).__name__}: {err})") from err
        try:
            backbone = AutoModel.from_pretrained(str(folder / "backbone"), dtype=torch.float32)
        except Exception as err:
            raise ValueModelError(f"{folder / 'backbone'} could not be loaded ({type(err).__name__}: {err})") from err
        m, h = len(meta["objectives"]), int(meta["hidden_size"])
        if int(backbone.config.hidden_size) != h:
            raise ValueModelError(f"{folder}: backbone hidden size {backbone.config.hidden_size} != meta hidden_size {h}")
        if tuple(heads.get("weight", torch.empty(0)).shape) != (m, h) or tuple(heads.get("bias", torch.empty(0)).shape) != (m,):
            raise ValueModelError(
                f"{heads_path}: expected weight [{m}, {h}] and bias [{m}] for objectives {meta['objectives']}, "
                f"got { {k: list(v.shape) for k, v in heads.items()} }"
            )
        extra = {k: v for k, v in meta.items() if k not in {"format", "format_version", "objectives", "tokenizer_fingerprint", "hidden_size", "backbone_class"}}
        tokenizer = None
        if (folder / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        model = cls(backbone, meta["objectives"], meta["tokenizer_fingerprint"], extra, tokenizer)
        with torch.no_grad():
            model.head.weight.copy_(heads["weight"])
            model.head.bias.copy_(heads["bias"])
        return model.to(device).eval()


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
    "truncate:N": "the base model's own first N decoder layers (pretrained)",
    "<name or path>": "any causal LM / base model loadable by from_pretrained (must share the base tokenizer)",
}
DEFAULT_VALUE_BACKBONE = "tiny"


def build_value_model(
    objectives: Sequence[str],
    *,
    backbone: str = DEFAULT_VALUE_BACKBONE,
    base_model: str | None = None,
    seed: int = 0,
) -> ValueModel:
    """Create an untrained value model for ``objectives`` that reads the base model's tokenizer.

    Args:
        backbone: ``"tiny"``, ``"tiny-256"``, ``"truncate:N"`` or a model name/path (see BACKBONES).
        base_model: the base (pi_ref) model name; default: the embedded default.
        seed: initialisation seed of random parameters.
    """
    from .models import DEFAULT_BASE_MODEL, load_causal_lm, load_tokenizer, resolve_model

    base_model = base_model or DEFAULT_BASE_MODEL
    tokenizer = load_tokenizer(base_model)
    if backbone in ("tiny", "tiny-256") or backbone.startswith("truncate:"):
        lm, _ = load_causal_lm(base_model)
        if backbone.startswith("truncate:"):
            try:
                n = int(backbone.split(":", 1)[1])
            except ValueError as err:
                raise ValueError(f"backbone {backbone!r}: expected truncate:N with an integer N") from err
            net = truncated_backbone(lm, n)
        else:
            hidden, layers = (128, 2) if backbone == "tiny" else (256, 4)
            emb = pca_embeddings(lm.get_input_embeddings().weight, hidden, seed=seed)
            net = tiny_llama_backbone(emb.shape[0], hidden_size=hidden, num_layers=layers, embeddings=emb, seed=seed)
        del lm
    else:
        from transformers import AutoModel

        resolved = resolve_model(backbone)
        kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
        net = AutoModel.from_pretrained(resolved.source, dtype=torch.float32, **kwargs)
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
        return ValueModel(net, objectives, tokenizer_fingerprint(tokenizer), meta, tokenizer)
