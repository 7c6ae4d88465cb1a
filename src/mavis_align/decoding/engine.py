"""The MAVIS decoding loop (paper Algorithm 2) over a left-padded batch of token ids.

At every step, for every unfinished row:

1. logits of pi_ref at s_{t-1} (one cached forward of the base model for the whole batch);
2. the top-k candidates of pi_ref after temperature;
3. their values V_m(s_{t-1} ⊕ a) from the value scorer (one forward per value model);
4. v = sum_m lambda_m V_m, NORMALIZE, pi_MAVIS ∝ pi_ref · exp(beta · v) over the candidates;
5. sample (seeded ``torch.Generator``), take the argmax (greedy), or follow forced tokens.

Without a scorer the same loop is plain sampling from pi_ref (optionally top-k). For every
generated token it records log pi_ref(a) over the full vocabulary at temperature 1 and
log pi_gen(a) under the distribution actually used, so each row carries its KL estimate
(paper eq. 7) as the sum of their differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import SamplingConfig
from .tilt import combine_values, tilted_logprobs, top_k_candidates

NEG_INF = float("-inf")


@dataclass
class DecodedRow:
    """One decoded sequence as token ids.

    Attributes:
        token_ids: generated ids (EOS included when produced).
        logprobs_ref: log pi_ref(a_t|s_t), full vocabulary, temperature 1.
        logprobs_gen: log pi_gen(a_t|s_t) under the distribution used (pi_MAVIS with values).
        values: combined value sum_m lambda_m V_m(s_t ⊕ a_t) of each chosen token (raw, before
            normalisation); empty without a value scorer.
        finish_reason: ``"eos"``, ``"stop"``, ``"length"`` or ``"forced"``.
    """

    token_ids: list[int] = field(default_factory=list)
    logprobs_ref: list[float] = field(default_factory=list)
    logprobs_gen: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class StepDistribution:
    """pi_gen at one step, over candidate tokens.

    ids: [B, K] candidate ids, or None when the candidates are the whole vocabulary in id order.
    logp: [B, K] log pi_gen over the candidates (-inf where impossible).
    values: [B, K] combined raw values, or None without a scorer.
    """

    ids: torch.Tensor | None
    logp: torch.Tensor
    values: torch.Tensor | None

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of candidate positions ``index`` ([B] or [B, n])."""
        if self.ids is None:
            return index
        return self.ids.gather(-1, index if index.dim() == 2 else index[:, None]).reshape(index.shape)


def step_distribution(
    logits: torch.Tensor,
    config: SamplingConfig,
    *,
    scorer=None,
    weights: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
) -> StepDistribution:
    """The next-token distribution of pi_gen (pi_MAVIS with a scorer, else pi_ref, top-k optional).

    Args:
        logits: [B, V] pi_ref logits.
        scorer: value scorer with ``score(candidates [B, K]) -> [B, K, M]``, or None.
        weights: [B, M] objective weights (rows sum to 1); needed with a scorer.
        beta: [B] tilt strengths; needed with a scorer.
        banned: [V] bool, tokens that may not be produced now (e.g. EOS before min_new_tokens).
    """
    if banned is not None and bool(banned.any()):
        logits = logits.masked_fill(banned, NEG_INF)
    if scorer is None:
        gen = logits.float() if config.greedy else logits.float() / config.temperature
        if config.top_k and config.top_k < logits.shape[-1]:
            top, ids = torch.topk(gen, config.top_k, dim=-1)
            return StepDistribution(ids, torch.log_softmax(top, dim=-1), None)
        return StepDistribution(None, torch.log_softmax(gen, dim=-1), None)
    k = config.top_k or logits.shape[-1]
    ids, ref_logp = top_k_candidates(logits, k, 1.0 if config.greedy else config.temperature)
    valid = torch.isfinite(ref_logp)
    combined = combine_values(scorer.score(ids), weights)
    logp = tilted_logprobs(ref_logp, combined, beta, normalize=config.normalize, valid=None if bool(valid.all()) else valid)
    return StepDistribution(ids, logp, combined)


def _choose(dist: StepDistribution, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Candidate position per row [B]."""
    if greedy:
        return torch.argmax(dist.logp, dim=-1)
    return torch.multinomial(torch.exp(dist.logp), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_ids(
    base,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: SamplingConfig,
    *,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None = None,
    scorer=None,
    weights: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    stop_check: Callable[[list[int]], bool] | None = None,
    forced: Sequence[Sequence[int]] | None = None,
    on_step: Callable[[int, StepDistribution], None] | None = None,
) -> list[DecodedRow]:
    """Decode a left-padded batch.

    Args:
        base: a :class:`~mavis_align.decoding.steppers.CachedBase` or ``NaiveBase``.
        input_ids, attention_mask: [B, T] prompts, left-padded.
        eos_id: end-of-sequence id, or None for none.
        pad_id: id fed for finished rows (their outputs are discarded).
        generator: RNG, required when sampling.
        scorer: value scorer (``start``/``append``/``score``), or None for plain pi_ref.
        weights: [B, M] rows summing to 1; beta: [B] (defaults to ``config.beta``).
        stop_check: called with a row's generated ids after each token; True ends the row.
        forced: per row, tokens to take instead of sampling (teacher forcing): the records then
            hold log pi_ref and log pi_gen of those tokens (-inf when outside the candidates).
    Returns:
        One :class:`DecodedRow` per row.
    """
    batch = input_ids.shape[0]
    if forced is None and not config.greedy and generator is None:
        raise ValueError("sampling needs an explicit torch.Generator (or greedy=True)")
    if forced is not None and len(forced) != batch:
        raise ValueError(f"forced has {len(forced)} rows for a batch of {batch}")
    if scorer is not None:
        if weights is None:
            raise ValueError("decoding with value models needs objective weights")
        beta = torch.full((batch,), float(config.beta)) if beta is None else torch.as_tensor(beta, dtype=torch.float32)
    logits = base.start(input_ids, attention_mask)
    device = logits.device
    if scorer is not None:
        scorer.start(input_ids, attention_mask)
        weights = weights.to(device)
        beta = beta.to(device)
    vocab = logits.shape[-1]
    eos_ban = torch.zeros(vocab, dtype=torch.bool, device=device)
    if eos_id is not None and config.min_new_tokens > 0:
        eos_ban[eos_id] = True
    rows = [DecodedRow() for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    n_steps = config.max_new_tokens if forced is None else min(config.max_new_tokens, max((len(f) for f in forced), default=0))
    for t in range(n_steps):
        dist = step_distribution(
            logits, config, scorer=scorer, weights=weights, beta=beta, banned=eos_ban if t < config.min_new_tokens else None
        )
        if on_step is not None:
            on_step(t, dist)
        if forced is None:
            pos = _choose(dist, config.greedy, generator)
            chosen = dist.token_ids(pos)
            lp_gen = dist.logp.gather(-1, pos[:, None]).squeeze(-1)
        else:
            chosen = torch.tensor([f[t] if t < len(f) else pad_id for f in forced], device=device)
            if dist.ids is None:
                lp_gen = dist.logp.gather(-1, chosen[:, None]).squeeze(-1)
                pos = chosen
            else:
                hit = dist.ids == chosen[:, None]
                pos = torch.argmax(hit.long(), dim=-1)
                lp_gen = torch.where(hit.any(-1), dist.logp.gather(-1, pos[:, None]).squeeze(-1), torch.full_like(pos, 0, dtype=torch.float32) + NEG_INF)
        lp_ref = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
        val = dist.values.gather(-1, pos[:, None]).squeeze(-1) if dist.values is not None else None
        chosen = torch.where(done, torch.full_like(chosen, pad_id), chosen)
        c_l, r_l, g_l = chosen.tolist(), lp_ref.tolist(), lp_gen.tolist()
        v_l = val.tolist() if val is not None else None
        for i in torch.nonzero(~done).flatten().tolist():
            row = rows[i]
            row.token_ids.append(c_l[i])
            row.logprobs_ref.append(r_l[i])
            row.logprobs_gen.append(g_l[i])
            if v_l is not None:
                row.values.append(v_l[i])
            if forced is not None and len(row.token_ids) >= len(forced[i]):
                done[i] = True
                row.finish_reason = "forced"
            elif eos_id is not None and c_l[i] == eos_id:
                done[i] = True
                row.finish_reason = "eos"
            elif stop_check is not None and stop_check(row.token_ids):
                done[i] = True
                row.finish_reason = "stop"
        if bool(done.all()) or t == n_steps - 1:
            break
        logits = base.step(chosen)
        if scorer is not None:
            scorer.append(chosen)
    return rows
