"""Value-guided beam search (paper Section 4.4).

Per prompt, N beams. At every step each live beam draws ``expand`` distinct children from its
tilted distribution pi_MAVIS (Gumbel top-k: sampling without replacement; greedy takes the most
likely); all children of a prompt are ranked by their combined value sum_m lambda_m V_m(s ⊕ a)
and the best N non-finished ones become the next beams. Children that end (EOS / stop string)
join the prompt's finished pool. At the end the pool (plus any beams cut by the length limit) is
ranked by combined value, the top N are kept, and an optional re-ranker (e.g. the weighted reward
models) picks the winner among them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation import SamplingConfig
from .engine import DecodedRow, step_distribution


@dataclass
class BeamCandidate:
    row: DecodedRow
    value: float  # combined value of the last state (ranking key)


@dataclass
class BeamResult:
    """Per prompt: finished candidates ranked best first (at most N)."""

    candidates: list[BeamCandidate] = field(default_factory=list)


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(min=1e-20, max=1 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def value_beam_search(
    base,
    scorer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: SamplingConfig,
    *,
    num_beams: int,
    weights: torch.Tensor,
    beta: torch.Tensor,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None,
    expand: int | None = None,
    stop_check: Callable[[list[int]], bool] | None = None,
) -> list[BeamResult]:
    """Beam search over P prompts ([P, T] left-padded) -> one :class:`BeamResult` per prompt.

    Args:
        num_beams: N, beams kept per prompt (and candidates returned).
        weights: [P, M]; beta: [P].
        expand: children drawn per beam per step (default N).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    expand = expand or num_beams
    if expand < 1:
        raise ValueError(f"expand must be >= 1, got {expand}")
    if not config.greedy and generator is None:
        raise ValueError("beam search samples children: pass a torch.Generator (or greedy=True)")
    n_prompts = input_ids.shape[0]
    nb = num_beams
    logits = base.start(input_ids, attention_mask)
    scorer.start(input_ids, attention_mask)
    device = logits.device
    rep = torch.arange(n_prompts, device=device).repeat_interleave(nb)
    base.reorder(rep)
    scorer.reorder(rep)
    logits = logits.index_select(0, rep)
    w, b = weights.to(device).index_select(0, rep), beta.to(device).index_select(0, rep)
    beams = [DecodedRow() for _ in range(n_prompts * nb)]
    last_value = [0.0] * (n_prompts * nb)
    alive = [i % nb == 0 for i in range(n_prompts * nb)]  # at first all beams of a prompt are the same: expand one
    finished: list[list[BeamCandidate]] = [[] for _ in range(n_prompts)]
    prompt_done = [False] * n_prompts
    eos_ban = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
    if eos_id is not None and config.min_new_tokens > 0:
        eos_ban[eos_id] = True
    for t in range(config.max_new_tokens):
        dist = step_distribution(logits, config, scorer=scorer, weights=w, beta=b, banned=eos_ban if t < config.min_new_tokens else None)
        keys = dist.logp if config.greedy else dist.logp + _gumbel(dist.logp.shape, generator, device)
        n_take = min(expand, keys.shape[-1])
        pos = torch.topk(keys, n_take, dim=-1).indices  # [R, n_take]
        tok = dist.token_ids(pos)
        logp_gen = dist.logp.gather(-1, pos)
        vals = dist.values.gather(-1, pos)
        logp_ref = torch.log_softmax(logits, dim=-1).gather(-1, tok)
        tok_l, gen_l, ref_l, val_l = tok.tolist(), logp_gen.tolist(), logp_ref.tolist(), vals.tolist()
        parents = torch.arange(n_prompts * nb, device=device)
        chosen = torch.full((n_prompts * nb,), pad_id, dtype=torch.long, device=device)
        new_beams: list[DecodedRow] = list(beams)
        new_alive = [False] * (n_prompts * nb)
        for p in range(n_prompts):
            if prompt_done[p]:
                continue
            children = []
            for r in range(p * nb, (p + 1) * nb):
                if not alive[r]:
                    continue
                for j in range(n_take):
                    if gen_l[r][j] == float("-inf"):
                        continue
                    children.append((val_l[r][j], r, j))
            children.sort(key=lambda c: -c[0])
            slot = p * nb
            for value, r, j in children:
                row = DecodedRow(
                    beams[r].token_ids + [tok_l[r][j]], beams[r].logprobs_ref + [ref_l[r][j]],
                    beams[r].logprobs_gen + [gen_l[r][j]], beams[r].values + [value],
                )
                if eos_id is not None and tok_l[r][j] == eos_id:
                    row.finish_reason = "eos"
                elif stop_check is not None and stop_check(row.token_ids):
                    row.finish_reason = "stop"
                else:
                    if slot < (p + 1) * nb:
                        new_beams[slot], new_alive[slot] = row, True
                        parents[slot], chosen[slot] = r, tok_l[r][j]
                        slot += 1
                    continue
                if len(finished[p]) < nb:
                    finished[p].append(BeamCandidate(row, value))
            if len(finished[p]) >= nb or slot == p * nb:
                prompt_done[p] = True
                for r in range(p * nb, (p + 1) * nb):
                    new_alive[r] = False
        beams, alive = new_beams, new_alive
        last_value = [beams[r].values[-1] if beams[r].values else 0.0 for r in range(len(beams))]
        if all(prompt_done) or t == config.max_new_tokens - 1:
            break
        base.reorder(parents)
        scorer.reorder(parents)
        logits = base.step(chosen)
        scorer.append(chosen)
    results = []
    for p in range(n_prompts):
        pool = list(finished[p])
        for r in range(p * nb, (p + 1) * nb):
            if alive[r]:
                beams[r].finish_reason = "length"
                pool.append(BeamCandidate(beams[r], last_value[r]))
        pool.sort(key=lambda c: -c.value)
        results.append(BeamResult(pool[:nb]))
    return results
