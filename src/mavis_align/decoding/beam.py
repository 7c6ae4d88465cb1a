"""Value-guided beam search (paper Section 4.4), a chooser over the one decode engine's state.

Per prompt, N beams. At every step each live beam draws ``expand`` distinct children from its
tilted distribution pi_MAVIS (Gumbel top-k: sampling without replacement; greedy takes the most
likely); all children of a prompt are ranked by their combined value sum_m lambda_m V_m(s ⊕ a)
and the best N unfinished ones become the next beams. Children that end (EOS, a stop string, or
the token budget) join the prompt's finished pool; a prompt is searched until none of its beams
is left alive (finished candidates never cut the live beams short). The pool is ranked by
combined value, the top N are kept, and an optional re-ranker (e.g. the weighted reward models)
picks the winner among them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import SamplingConfig
from .engine import DecodedRow, DecodeState, RowSpec, finish_reason


@dataclass
class BeamCandidate:
    row: DecodedRow
    value: float  # combined value of the last state (ranking key)


@dataclass
class BeamResult:
    """Per prompt: finished candidates ranked best first (at most N)."""

    candidates: list[BeamCandidate] = field(default_factory=list)


def _gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp(min=1e-20, max=1 - 1e-7)
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
    generators: Sequence[torch.Generator] | None = None,
    expand: int | None = None,
    stop_check: Callable[[list[int]], bool] | None = None,
    pad_id: int = 0,
) -> list[BeamResult]:
    """Beam search over P prompts ([P, T] left-padded) -> one :class:`BeamResult` per prompt.

    Args:
        base, scorer: a fresh base stepper and value scorer.
        num_beams: N, beams kept per prompt (and candidates returned).
        weights: [P, M]; beta: [P].
        generators: one per prompt (draws the Gumbel noise); not needed when greedy.
        expand: children drawn per beam per step (default N).
        pad_id: token fed to dead beam slots (never part of a result).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    expand = expand or num_beams
    if expand < 1:
        raise ValueError(f"expand must be >= 1, got {expand}")
    n_prompts, nb = input_ids.shape[0], num_beams
    if not config.greedy and (generators is None or len(generators) != n_prompts):
        raise ValueError(f"beam search samples children: pass one torch.Generator per prompt ({n_prompts}), or greedy=True")
    gens = list(generators) if generators is not None else [None] * n_prompts
    specs = [RowSpec(config, weights=weights[p], beta=float(beta[p]), generator=gens[p], stop_check=stop_check)
             for p in range(n_prompts) for _ in range(nb)]
    state = DecodeState(lambda: base, lambda: scorer, int(weights.shape[1]), eos_id)
    state.admit(input_ids, attention_mask, specs, list(range(n_prompts * nb)), torch.arange(n_prompts).repeat_interleave(nb))
    beams = [DecodedRow() for _ in range(n_prompts * nb)]
    alive = [i % nb == 0 for i in range(n_prompts * nb)]  # at first all beams of a prompt are the same: expand one
    finished: list[list[BeamCandidate]] = [[] for _ in range(n_prompts)]
    device = state.logits.device
    while any(alive):
        dist = state.distribution()
        keys = dist.logp
        if not config.greedy:
            noise = torch.cat([_gumbel((nb, keys.shape[-1]), gens[p]) for p in range(n_prompts)])
            keys = keys + noise.to(device)
        n_take = min(expand, keys.shape[-1])
        pos = torch.topk(keys, n_take, dim=-1).indices  # [R, n_take]
        tok = dist.token_ids(pos)
        logp_ref = torch.log_softmax(state.logits, dim=-1).gather(-1, tok)
        tok_l, gen_l, ref_l = tok.tolist(), dist.logp.gather(-1, pos).tolist(), logp_ref.tolist()
        val_l = dist.values.gather(-1, pos).tolist()
        parents = list(range(n_prompts * nb))
        chosen = [pad_id] * (n_prompts * nb)
        new_beams, new_alive = list(beams), [False] * (n_prompts * nb)
        for p in range(n_prompts):
            children = [(val_l[r][j], r, j) for r in range(p * nb, (p + 1) * nb) if alive[r]
                        for j in range(n_take) if gen_l[r][j] != float("-inf")]
            children.sort(key=lambda c: -c[0])
            slot = p * nb
            for value, r, j in children:
                row = DecodedRow(beams[r].token_ids + [tok_l[r][j]], beams[r].logprobs_ref + [ref_l[r][j]],
                                 beams[r].logprobs_gen + [gen_l[r][j]], beams[r].values + [value])
                reason = finish_reason(row.token_ids, specs[r], eos_id)
                if reason is not None:
                    row.finish_reason = reason
                    finished[p].append(BeamCandidate(row, value))
                elif slot < (p + 1) * nb:
                    new_beams[slot], new_alive[slot], parents[slot], chosen[slot] = row, True, r, tok_l[r][j]
                    slot += 1
        beams, alive = new_beams, new_alive
        if not any(alive):
            break
        state.select(parents)
        state.advance(torch.tensor(chosen, device=device))
    results = []
    for pool in finished:
        pool.sort(key=lambda c: -c.value)
        results.append(BeamResult(pool[:nb]))
    return results
