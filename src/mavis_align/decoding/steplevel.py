"""Step-level value guidance (MAHALO-style PRM-guided decoding), a chooser over the one decode engine.

The value models act as process reward models at the granularity of a *step* of ``chunk`` tokens:
per prompt, N rows sample the next step from the proposal policy (the engine's base stepper:
pi_ref, or any causal LM such as a multi-head policy at the request's lambda); at the step's end
every candidate is scored by v = sum_m lambda_m V_m(s ⊕ step) (the same value scorer and
:func:`~mavis_align.decoding.tilt.combine_values` as token-level MAVIS), one candidate is kept,
either the best (``select="best"``) or drawn from the tilt softmax(beta · NORMALIZE(v)) over the N
candidates (``select="tilt"``, :func:`~mavis_align.decoding.tilt.tilted_logprobs` with uniform
proposal weights: the candidates are already proposal samples), and all N rows continue from it
(their KV caches are copied from the kept row). A candidate that ends (EOS, stop string, budget)
inside its step competes with its value at the end; if it is kept the response is finished.

KL to the proposal. Each selection among N i.i.d. proposal samples changes the distribution of
the step by at most:

* ``best``: log N - (N - 1) / N (the best-of-N bound, Beirami et al. 2024);
* ``tilt``: E[log N - H(p)], p the selection probabilities: with q(x)/pi(x) = E[N p_1 | x_1 = x],
  KL(q || pi) = E_pi[g log g] with g = q/pi, and t log t is convex, so
  KL <= E[N p_1 log(N p_1)] = E[sum_i p_i log(N p_i)] = E[log N - H(p)]; the record holds the
  realised log N - H(p), an unbiased estimate of this bound.

By the chain rule the response's KL to the proposal is the sum over its steps; the record's
``selection_kl`` is that sum. Its KL to pi_ref adds the proposal's own token log-ratios (0 when
the proposal is pi_ref sampled over the full vocabulary at temperature 1); the evaluator adds both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import SamplingConfig
from .engine import DecodedRow, DecodeState, RowSpec, finish_reason, sample_positions
from .tilt import combine_values, tilted_logprobs

SELECT_RULES = ("best", "tilt")


@dataclass
class StepResult:
    """One prompt's response: the row, the summed selection KL bound, the kept value of each step."""

    row: DecodedRow
    selection_kl: float = 0.0
    step_values: list[float] = field(default_factory=list)


def best_of_n_kl(n: int) -> float:
    """log N - (N - 1) / N: the KL bound of keeping the best of N i.i.d. samples."""
    return math.log(n) - (n - 1) / n


def tilt_selection_kl(logp: torch.Tensor) -> float:
    """log N - H(p) of one selection distribution ``logp`` [N] over N candidates (its KL bound's estimate)."""
    p = torch.exp(logp.double())
    entropy = float(-(p[p > 0] * logp.double()[p > 0]).sum())
    return math.log(logp.shape[-1]) - entropy


def _copy(row: DecodedRow) -> DecodedRow:
    return DecodedRow(list(row.token_ids), list(row.logprobs_ref), list(row.logprobs_gen), list(row.values), row.finish_reason, list(row.kl))


@torch.no_grad()
def step_guided_search(
    base,
    scorer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: SamplingConfig,
    *,
    n: int,
    chunk: int,
    weights: torch.Tensor,
    beta: torch.Tensor,
    select: str = "best",
    eos_id: int | None,
    generators: Sequence[torch.Generator],
    stop_check: Callable[[list[int]], bool] | None = None,
    pad_id: int = 0,
    on_select: Callable[[int, list[list[int]], list[float], int], None] | None = None,
    proposal_beta: torch.Tensor | None = None,
) -> list[StepResult]:
    """Step-level guided decoding of P prompts ([P, T] left-padded) -> one :class:`StepResult` each.

    Args:
        base, scorer: a fresh base stepper (the proposal) and value scorer.
        config: how the proposal samples tokens (temperature, top-k, budget, stop strings).
        n: candidate steps per prompt (N >= 1).
        chunk: tokens per step (>= 1).
        weights: [P, M] objective weights (rows summing to 1); beta: [P] tilt strength (``tilt``).
        select: ``"best"`` or ``"tilt"``.
        generators: one per prompt; every row's token draws and the prompt's selections come from it.
        pad_id: token fed to rows that no longer decode (never part of a result).
        on_select: called as ``on_select(prompt, candidates' token ids so far, their values, kept index)``
            at every selection (for tests and tracing).
        proposal_beta: [P] or None. Given: the candidates are sampled from the token-level MAVIS tilt of
            the proposal (``config``'s top-k, tail, tilt_tokens, normalize; the prompt's weights, this beta)
            instead of the proposal itself; their recorded log-probabilities are the tilted ones, so the
            evaluator's KL (tokens' log-ratios + the selections' bound) stays an upper bound to pi_ref.
    """
    if n < 1:
        raise ValueError(f"step-level guidance needs n >= 1 candidates, got {n}")
    if chunk < 1:
        raise ValueError(f"a step must be >= 1 token, got chunk={chunk}")
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    n_prompts = input_ids.shape[0]
    if len(generators) != n_prompts:
        raise ValueError(f"pass one torch.Generator per prompt ({n_prompts}), got {len(generators)}")
    # every row draws its tokens from its own generator, seeded from its prompt's
    row_gens = [torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=generators[p])))
                for p in range(n_prompts) for _ in range(n)]
    if proposal_beta is not None and tuple(proposal_beta.shape) != (n_prompts,):
        raise ValueError(f"proposal_beta must have shape [{n_prompts}], got {list(proposal_beta.shape)}")
    specs = [RowSpec(config, generator=row_gens[r], stop_check=stop_check,
                     **({} if proposal_beta is None else {"weights": weights[r // n], "beta": float(proposal_beta[r // n])}))
             for r in range(n_prompts * n)]
    # the scorer holds every row: it scores the steps' ends itself (and, with proposal_beta, every row's candidates)
    state = DecodeState(lambda: base, lambda: scorer, int(weights.shape[1]), eos_id, score_all_rows=True)
    state.admit(input_ids, attention_mask, specs, list(range(n_prompts * n)), torch.arange(n_prompts).repeat_interleave(n))
    device = state.logits.device
    # the batch holds blocks of n rows; block b is prompt order[b] (finished prompts leave the batch)
    order = list(range(n_prompts))
    row_weights = weights.repeat_interleave(n, dim=0).to(device)
    records = [DecodedRow() for _ in specs]
    alive = [True] * len(specs)
    ended: list[list[tuple[int, float, bool]]] = [[] for _ in range(n_prompts)]  # per prompt: (row, value, finished) this step
    results: list[StepResult | None] = [None] * n_prompts
    kl = [0.0] * n_prompts
    kept_values: list[list[float]] = [[] for _ in range(n_prompts)]
    step_start = [0] * n_prompts
    while order:
        n_rows = len(order) * n
        dist = state.distribution()
        greedy = torch.full((n_rows,), bool(config.greedy), dtype=torch.bool)
        pos = sample_positions(dist.logp, greedy, row_gens, dist.ids)
        tok = dist.token_ids(pos)
        lp_gen = dist.logp.gather(-1, pos[:, None]).squeeze(-1).tolist()
        lp_ref = torch.log_softmax(state.logits.float(), dim=-1).gather(-1, tok[:, None]).squeeze(-1).tolist()
        tok_l = tok.tolist()
        ending: list[tuple[int, bool]] = []
        for r in range(n_rows):
            if not alive[r]:
                continue
            rec = records[r]
            rec.token_ids.append(tok_l[r])
            rec.logprobs_ref.append(lp_ref[r])
            rec.logprobs_gen.append(lp_gen[r])
            reason = finish_reason(rec.token_ids, specs[r], eos_id)
            if reason is not None:
                rec.finish_reason = reason
                ending.append((r, True))
            elif len(rec.token_ids) - step_start[order[r // n]] >= chunk:
                ending.append((r, False))
        if ending:
            # V(s ⊕ step): the value of the step's last token, scored from the state before it
            values = combine_values(scorer.score(tok[:, None], row_weights), row_weights)[:, 0].tolist()
            for r, finished in ending:
                ended[order[r // n]].append((r, values[r], finished))
                if finished:
                    alive[r] = False
        parents = list(range(n_rows))
        for b, p in enumerate(order):
            rows = range(b * n, (b + 1) * n)
            if any(alive[r] and not any(c[0] == r for c in ended[p]) for r in rows):
                continue  # its candidates are still mid-step (they advance in lockstep)
            cands = ended[p]
            v = torch.tensor([[c[1] for c in cands]], dtype=torch.float32)
            if select == "best":
                at = int(torch.argmax(v[0]))
                kl[p] += best_of_n_kl(len(cands))
            else:
                logp = tilted_logprobs(torch.zeros_like(v), v, float(beta[p]), normalize=bool(config.normalize))
                at = int(sample_positions(logp, torch.tensor([False]), [generators[p]])[0])
                kl[p] += tilt_selection_kl(logp[0])
            row, value, finished = cands[at]
            if on_select is not None:
                on_select(p, [list(records[c[0]].token_ids) for c in cands], [c[1] for c in cands], at)
            kept_values[p].append(value)
            ended[p] = []
            if finished:
                results[p] = StepResult(_copy(records[row]), kl[p], kept_values[p])
                for r in rows:
                    alive[r] = False
                continue
            step_start[p] = len(records[row].token_ids)
            for r in rows:
                parents[r] = row
                alive[r] = True
                if r != row:
                    records[r] = _copy(records[row])
        # rows of finished prompts leave the batch; every other row continues from its parent
        keep_blocks = [b for b, p in enumerate(order) if results[p] is None]
        if not keep_blocks:
            break
        index = [parents[b * n + j] for b in keep_blocks for j in range(n)]
        slots = [b * n + j for b in keep_blocks for j in range(n)]
        nxt = [tok_l[parents[s]] if alive[s] else pad_id for s in slots]
        records = [records[s] for s in slots]
        alive = [alive[s] for s in slots]
        specs = [specs[s] for s in slots]
        row_gens = [row_gens[s] for s in slots]  # each slot keeps its own generator
        moved = {old: new for new, old in enumerate(slots)}
        ended = [[(moved[r], v, f) for r, v, f in e] for e in ended]
        row_weights = row_weights.index_select(0, torch.tensor(slots, device=device))
        order = [order[b] for b in keep_blocks]
        state.select(index)
        state.advance(torch.tensor(nxt, device=device))
    return [r if r is not None else StepResult(DecodedRow()) for r in results]
