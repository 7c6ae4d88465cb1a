"""Every method behind one small contract, so the evaluator treats them alike:

    policy.name: str
    policy.generate(prompts, seed) -> list[Generation]   # logprobs_gen = log pi_policy of each token

* :class:`DecoderPolicy`: pi_ref, MAVIS sampling or MAVIS beam search (a ``MavisDecoder``).
* :class:`ModelPolicy`: any causal LM (e.g. an RL fine-tuned or souped model), sampled natively.
* :class:`MODPolicy`: multi-objective decoding (Shi et al. 2024): pi ∝ prod_m pi_m^lambda_m,
  the per-objective models stepped together with their own KV caches.
* :class:`BestOfN`: N samples of another policy per prompt, the best by a score function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import Generation, SamplingConfig, encode_batch, rows_to_generations, stop_checker


@dataclass
class DecoderPolicy:
    """A :class:`~mavis_align.decoding.decoder.MavisDecoder` with fixed weights / beta (beam > 0: beam
    search; chunk > 0: step-level guidance, ``candidates`` steps of ``chunk`` tokens, ``select`` best or tilt)."""

    name: str
    decoder: object
    config: SamplingConfig
    weights: Mapping[str, float] | None = None
    beta: float | None = None
    beam: int = 0
    rerank: Callable | None = None
    batch_size: int = 8
    chat: bool | None = None
    chunk: int = 0
    candidates: int = 4
    select: str = "best"
    proposal_beta: float = 0.0  # step-level: candidates from the token tilt at this beta (0: the proposal itself)

    @property
    def step_kl_base(self):
        """The model the recorded step KLs are measured against (None for a beam or step-level selection)."""
        return None if self.beam or self.chunk else self.decoder.model

    def generate(self, prompts: Sequence[str], seed: int = 0) -> list[Generation]:
        if self.chunk:
            return self.decoder.step_search(list(prompts), n=self.candidates, chunk=self.chunk, select=self.select, weights=self.weights,
                                            beta=self.beta, config=self.config, seed=seed,
                                            batch_size=max(1, self.batch_size // self.candidates), chat=self.chat, proposal_beta=self.proposal_beta)
        if self.beam:
            return self.decoder.beam_search(list(prompts), num_beams=self.beam, weights=self.weights, beta=self.beta, config=self.config,
                                            rerank=self.rerank, seed=seed, batch_size=max(1, self.batch_size // self.beam), chat=self.chat)
        return self.decoder.generate(list(prompts), weights=self.weights, beta=self.beta, config=self.config, seed=seed,
                                     batch_size=self.batch_size, chat=self.chat)


@dataclass
class ModelPolicy:
    """Samples from ``model`` itself (plain KV-cached loop; top_k / temperature from ``config``)."""

    name: str
    model: object
    tokenizer: object
    config: SamplingConfig
    batch_size: int = 8
    chat: bool | None = None
    system: str | None = None  # an instruction read before every prompt (a preference-conditioned policy's weights)

    @property
    def step_kl_base(self):
        """The model the recorded step KLs are measured against (None when a system instruction changes the context)."""
        return None if self.system else self.model

    def generate(self, prompts: Sequence[str], seed: int = 0) -> list[Generation]:
        from ..decoding.decoder import MavisDecoder

        return MavisDecoder(self.model, self.tokenizer).generate(list(prompts), config=self.config, seed=seed, batch_size=self.batch_size,
                                                                 chat=self.chat, system=self.system)


class CombinedBase:
    """Steps several causal LMs together (each with its own cache); its "logits" are
    sum_m w_m log softmax(logits_m), i.e. log of the unnormalised geometric mixture."""

    def __init__(self, models: Sequence, weights: Sequence[float]):
        from ..decoding.steppers import CachedBase

        if len(models) != len(weights) or not models:
            raise ValueError("MOD needs one weight per model and at least one model")
        self.parts = [CachedBase(m) for m in models]
        self.weights = [float(w) for w in weights]

    def _mix(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return sum(w * torch.log_softmax(lg, dim=-1) for w, lg in zip(self.weights, logits) if w > 0)

    def start(self, input_ids, attention_mask):
        return self._mix([p.start(input_ids, attention_mask) for p in self.parts])

    def step(self, tokens):
        return self._mix([p.step(tokens) for p in self.parts])

    def reorder(self, index):
        for p in self.parts:
            p.reorder(index)


@dataclass
class MODPolicy:
    """pi_MOD(a|s) ∝ prod_m pi_m(a|s)^lambda_m over the per-objective fine-tuned models."""

    name: str
    models: Sequence
    tokenizer: object
    weights: Sequence[float]
    config: SamplingConfig
    batch_size: int = 8
    chat: bool | None = None

    def generate(self, prompts: Sequence[str], seed: int = 0) -> list[Generation]:
        from ..decoding.engine import decode_ids, row_generator
        from ..models import format_prompts

        total = sum(self.weights)
        if total <= 0 or any(w < 0 for w in self.weights):
            raise ValueError(f"MOD weights must be >= 0 and not all 0, got {list(self.weights)}")
        w = [x / total for x in self.weights]
        device = next(self.models[0].parameters()).device
        formatted = format_prompts(self.tokenizer, list(prompts), chat=self.chat)
        tok = self.tokenizer
        out = []
        for s in range(0, len(prompts), self.batch_size):
            ids, mask = encode_batch(tok, formatted[s : s + self.batch_size], device)
            rows = decode_ids(CombinedBase(self.models, w), ids, mask, self.config, eos_id=tok.eos_token_id,
                              generators=[row_generator(seed, i) for i in range(s, min(s + self.batch_size, len(prompts)))],
                              stop_check=stop_checker(tok, self.config.stop_strings))
            out.extend(rows_to_generations(tok, list(prompts[s : s + self.batch_size]), rows, self.config.stop_strings))
        return out


@dataclass
class BestOfN:
    """N samples of ``policy`` per prompt; the one with the highest ``score(prompts, texts)`` is kept.

    Its KL to pi_ref is not the sampled log-ratio: :attr:`kl_bound` gives the standard analytic
    value log N - (N - 1) / N (Stiennon et al. 2020) for a best-of-N over pi.
    """

    name: str
    policy: object
    n: int
    score: Callable[[list[str], list[str]], Sequence[float]]
    extras: dict = field(default_factory=dict)

    @property
    def kl_bound(self) -> float:
        return math.log(self.n) - (self.n - 1) / self.n

    def generate(self, prompts: Sequence[str], seed: int = 0) -> list[Generation]:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        many = [p for p in prompts for _ in range(self.n)]
        gens = self.policy.generate(many, seed=seed)
        scores = list(self.score(many, [g.text for g in gens]))
        out = []
        for i in range(len(prompts)):
            block = range(i * self.n, (i + 1) * self.n)
            best = max(block, key=lambda j: scores[j])
            g = gens[best]
            g.extras["best_of_n_scores"] = [scores[j] for j in block]
            out.append(g)
        return out
