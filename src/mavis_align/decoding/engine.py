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
    row_source: torch.Tensor | None = None,
    max_new_tokens: Sequence[int] | None = None,
) -> list[DecodedRow]:
    """Decode a left-padded batch.

    Finished rows leave the batch (their KV-cache rows are dropped), so rows of unequal length
    cost only what they use.

    Args:
        base: a :class:`~mavis_align.decoding.steppers.CachedBase` or ``NaiveBase``.
        input_ids, attention_mask: [P, T] prompts, left-padded.
        eos_id: end-of-sequence id, or None for none.
        pad_id: padding id (kept for API symmetry; finished rows are removed, not padded).
        generator: RNG, required when sampling.
        scorer: value scorer (``start``/``append``/``score``/``reorder``), or None for plain pi_ref.
        weights: [B, M] rows summing to 1; beta: [B] (defaults to ``config.beta``).
        stop_check: called with a row's generated ids after each token; True ends the row.
        forced: per row, tokens to take instead of sampling (teacher forcing): the records then
            hold log pi_ref and log pi_gen of those tokens (-inf when outside the candidates).
        on_step: called as ``on_step(t, distribution)`` at every step (inspection, tests); the
            distribution's rows are the unfinished rows, in row order.
        row_source: [B] long: decode row r continues prompt row ``row_source[r]`` (several rows
            may share one prompt; it is run through the models once). Default: B = P, identity.
        max_new_tokens: per-row token budgets (each <= ``config.max_new_tokens``); a row that
            reaches its budget ends with ``"length"``.
    Returns:
        One :class:`DecodedRow` per decode row.
    """
    n_prompts = input_ids.shape[0]
    batch = n_prompts if row_source is None else int(row_source.shape[0])
    if forced is None and not config.greedy and generator is None:
        raise ValueError("sampling needs an explicit torch.Generator (or greedy=True)")
    if forced is not None and len(forced) != batch:
        raise ValueError(f"forced has {len(forced)} rows for a batch of {batch}")
    budgets = [config.max_new_tokens] * batch if max_new_tokens is None else [int(n) for n in max_new_tokens]
    if len(budgets) != batch or any(not 0 <= n <= config.max_new_tokens for n in budgets):
        raise ValueError(f"max_new_tokens must give {batch} budgets in [0, {config.max_new_tokens}]")
    if forced is not None:
        budgets = [min(n, len(f)) for n, f in zip(budgets, forced)]
    if scorer is not None:
        if weights is None:
            raise ValueError("decoding with value models needs objective weights")
        beta = torch.full((batch,), float(config.beta)) if beta is None else torch.as_tensor(beta, dtype=torch.float32)
    rows = [DecodedRow() for _ in range(batch)]
    if max(budgets, default=0) == 0:
        return rows
    logits = base.start(input_ids, attention_mask)
    device = logits.device
    if scorer is not None:
        scorer.start(input_ids, attention_mask)
    if row_source is not None:
        row_source = row_source.to(device)
        base.reorder(row_source)
        logits = logits.index_select(0, row_source)
        if scorer is not None:
            scorer.reorder(row_source)
    if scorer is not None:
        weights = weights.to(device)
        beta = beta.to(device)
    # live: decode-row index of each batch position
    live = list(range(batch))
    eos_ban = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
    if eos_id is not None and config.min_new_tokens > 0:
        eos_ban[eos_id] = True
    if any(n == 0 for n in budgets):  # rows with nothing to generate leave before the first step
        keep = [i for i, r in enumerate(live) if budgets[r] > 0]
        live, logits, weights, beta = _compact(keep, live, logits, weights, beta, base, scorer, device)
    t = 0
    while live:
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
            chosen = torch.tensor([forced[r][t] for r in live], device=device)
            if dist.ids is None:
                lp_gen = dist.logp.gather(-1, chosen[:, None]).squeeze(-1)
                pos = chosen
            else:
                hit = dist.ids == chosen[:, None]
                pos = torch.argmax(hit.long(), dim=-1)
                lp_gen = torch.where(hit.any(-1), dist.logp.gather(-1, pos[:, None]).squeeze(-1), torch.full(pos.shape, NEG_INF, device=device))
        lp_ref = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
        val = dist.values.gather(-1, pos[:, None]).squeeze(-1) if dist.values is not None else None
        c_l, r_l, g_l = chosen.tolist(), lp_ref.tolist(), lp_gen.tolist()
        v_l = val.tolist() if val is not None else None
        keep = []
        for i, r in enumerate(live):
            row = rows[r]
            row.token_ids.append(c_l[i])
            row.logprobs_ref.append(r_l[i])
            row.logprobs_gen.append(g_l[i])
            if v_l is not None:
                row.values.append(v_l[i])
            if eos_id is not None and c_l[i] == eos_id:
                row.finish_reason = "eos"
            elif stop_check is not None and stop_check(row.token_ids):
                row.finish_reason = "stop"
            elif len(row.token_ids) >= budgets[r]:
                row.finish_reason = "forced" if forced is not None else "length"
            else:
                keep.append(i)
        t += 1
        if not keep:
            break
        if len(keep) < len(live):
            chosen = chosen.index_select(0, torch.tensor(keep, device=device))
            live, _, weights, beta = _compact(keep, live, None, weights, beta, base, scorer, device)
        logits = base.step(chosen)
        if scorer is not None:
            scorer.append(chosen)
    return rows


def _compact(keep, live, logits, weights, beta, base, scorer, device):
    """Drop finished batch positions from the models' state; returns the new (live, logits, weights, beta)."""
    idx = torch.tensor(keep, dtype=torch.long, device=device)
    base.reorder(idx)
    if scorer is not None:
        scorer.reorder(idx)
        weights = weights.index_select(0, idx)
        beta = beta.index_select(0, idx)
    if logits is not None:
        logits = logits.index_select(0, idx)
    return [live[i] for i in keep], logits, weights, beta
