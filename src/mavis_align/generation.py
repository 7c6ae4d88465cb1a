"""What a decode is asked for and what it returns: :class:`SamplingConfig` (validated once),
:class:`Generation` records, and the text helpers (batch encoding, stop strings) every decode path
shares. The decoding itself lives in :mod:`mavis_align.decoding` (one engine for every path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch



@dataclass
class Generation:
    """One decoded response.

    Attributes:
        prompt: the user prompt (before chat formatting).
        text: decoded response, special tokens removed, cut before any stop string.
        token_ids: generated token ids (EOS included when it was produced).
        logprobs_ref: log pi_ref(a_t|s_t) per generated token, full vocabulary, temperature 1.
        logprobs_gen: log pi_gen(a_t|s_t) per generated token under the sampling distribution.
        finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"`` (token budget), as in OpenAI's API.
        step_kl: KL(pi_gen(.|s_t) || pi_base(.|s_t)) of each step's whole sampling distribution against the
            decoder's base model (full vocabulary, temperature 1); empty where the decode did not sample
            from a distribution (beam search). Summed, an estimate of the sequence KL with the expectation of
            :attr:`log_ratio` and less variance, when the base model is pi_ref.
    """

    prompt: str
    text: str
    token_ids: list[int]
    logprobs_ref: list[float]
    logprobs_gen: list[float]
    finish_reason: str
    extras: dict = field(default_factory=dict)
    step_kl: list[float] = field(default_factory=list)

    @property
    def log_ratio(self) -> float:
        """sum_t log(pi_gen/pi_ref): this sequence's single-sample KL contribution (eq. 7)."""
        return float(sum(g - r for g, r in zip(self.logprobs_gen, self.logprobs_ref)))


DEFAULT_TOP_K = 15  # candidates per step with value models (paper App. F.5)
TAILS = ("drop", "keep")  # what the tilt does with the tokens outside its top-k candidates (SamplingConfig.tail)


def check_beta(beta: float) -> float:
    """The one check of a tilt strength: finite and >= 0 (paper: beta = 1/eta)."""
    b = float(beta)
    if not b >= 0 or b == float("inf"):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    return b


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn: from pi_ref, or from pi_MAVIS when value models are given.

    Attributes:
        max_new_tokens: response length budget T.
        min_new_tokens: EOS is not allowed before this many tokens.
        temperature: softmax temperature of pi_ref (>0); ignored when ``greedy``.
        top_k: candidates per step: plain sampling keeps the k most likely tokens (0 = full
            vocabulary); with value models these are the k tokens whose values are computed
            (0 = the whole vocabulary, only sensible for tiny vocabularies).
        greedy: take the argmax instead of sampling.
        stop_strings: decoding of a sequence stops once its text contains one of these.
        beta: tilt strength of the value models (>= 0; paper: beta = 1/eta).
        normalize: min-max normalise the combined candidate values to [0, 1] first (paper eq. 14).
        max_step_kl: if > 0, a cap in nats on the KL the tilt adds at each step: where beta would
            move pi further than that from pi_ref's top-k distribution, the step uses the largest smaller
            beta that does not (``decoding.tilt.capped_beta``); 0 = no cap (the paper's tilt).
        tail: with value models, what happens to the tokens outside the top-k candidates: ``"drop"``
            (the paper's tilt: they get no mass) or ``"keep"`` (they keep pi_ref's mass, tilted by a
            baseline value, the pi_ref-weighted mean of the candidates' values, so beta = 0 is exactly
            pi_ref and the policy is continuous in beta; see ``decoding.engine.step_distribution``).
        tilt_tokens: with value models, tilt only the first ``tilt_tokens`` response tokens and sample
            beta = 0 after them (pi_ref itself with ``tail="keep"``, pi_ref's top-k with ``"drop"``);
            0 = every token (the paper). Spends the KL where the candidates differ (issue 36: the
            harmless decision is taken in the first tokens). The value models still score the later
            steps (their values are recorded, not used).
        candidate_p: with value models, the candidates are the fewest of the top-k tokens that hold this
            much of pi_ref's mass (a nucleus inside the top-k; 1.0 = all k, the paper's). With
            ``tail="keep"`` the rest keep pi_ref's mass, with ``"drop"`` they get none.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    greedy: bool = False
    stop_strings: tuple[str, ...] = ()
    beta: float = 1.0
    normalize: bool = True
    min_new_tokens: int = 0
    max_step_kl: float = 0.0
    tail: str = "drop"
    tilt_tokens: int = 0
    candidate_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        check_beta(self.beta)
        if not (self.max_step_kl >= 0 and self.max_step_kl < float("inf")):
            raise ValueError(f"max_step_kl must be finite and >= 0 (0 = no cap), got {self.max_step_kl}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if self.tilt_tokens < 0:
            raise ValueError(f"tilt_tokens must be >= 0 (0 = tilt every token), got {self.tilt_tokens}")
        if not 0.0 < self.candidate_p <= 1.0:
            raise ValueError(f"candidate_p must be in (0, 1] (1 = every one of the top-k), got {self.candidate_p}")


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask) [B, T], padded on the left (decoding's layout)."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids.to(device), mask.to(device)


def leading_padding(mask: torch.Tensor) -> int:
    """Leading columns of a left-padded [B, W] attention mask that are padding in every row."""
    used = mask.bool().any(0)
    return int(used.long().argmax()) if bool(used.any()) else 0


def encode_batch(tokenizer, formatted: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize model-input texts into a left-padded batch -> (input_ids, attention_mask) [B, T]."""
    enc = tokenizer(formatted, return_tensors="pt", padding=True, add_special_tokens=False)
    attention = enc["attention_mask"]
    if tokenizer.padding_side != "left" and not bool(attention[:, -1].all()):
        raise ValueError("the tokenizer must pad on the left for batched generation")
    if bool((attention.sum(-1) == 0).any()):
        raise ValueError("every prompt must have at least one token")
    return enc["input_ids"].to(device), attention.to(device)


def rows_to_generations(tokenizer, prompts: list[str], rows, stop_strings: tuple[str, ...]) -> list[Generation]:
    """Decoded id rows -> :class:`Generation` records with text cut before any stop string."""
    out = []
    for prompt, row in zip(prompts, rows):
        text, _ = cut_at_stop(tokenizer.decode(row.token_ids, skip_special_tokens=True), stop_strings)
        extras = {"values": row.values} if row.values else {}
        out.append(Generation(prompt, text.strip(), row.token_ids, row.logprobs_ref, row.logprobs_gen, row.finish_reason, extras, list(row.kl)))
    return out


def stop_checker(tokenizer, stop_strings: tuple[str, ...]):
    """A ``stop_check`` callable for the decoding engine, or None without stop strings."""
    if not stop_strings:
        return None
    return lambda ids: cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)[1]
