"""The one decode engine (paper Algorithm 2): a batch of rows, each with its own sampling parameters.

At every step, for every live row:

1. logits of pi_ref at s_{t-1} (one cached forward of the base model for the whole batch);
2. the row's top-k candidates of pi_ref after its temperature (EOS banned before its
   ``min_new_tokens``);
3. their values V_m(s_{t-1} ⊕ a) from the value scorer (one forward per frozen trunk / value model);
4. v = sum_m lambda_m V_m, NORMALIZE (per row, on or off), pi_MAVIS ∝ pi_ref · exp(beta · v) over
   the candidates (:func:`step_distribution`: the per-step chain, written once);
5. the chooser: :func:`sample_positions` (one uniform per row from the row's own generator, or
   the argmax for greedy rows), forced tokens (teacher forcing), or beam search's chooser.

Rows without objective weights (or without a scorer) decode pi_ref alone, top-k optional. A row
ends by :func:`finish_reason` (OpenAI's reasons: ``"stop"`` for EOS or a stop string, ``"length"``
for its token budget); finished rows leave the batch (their KV-cache rows are dropped) and new rows
can join between steps (:meth:`DecodeState.admit`), which is how the server batches continuously.

Every row draws its randomness from its own CPU ``torch.Generator`` (:func:`row_generator`), so a
row's tokens do not depend on its neighbours, the batch size or the device of the uniform draws:
``MavisDecoder.generate`` and the server give the same text for the same request and seed.
For every generated token a row records log pi_ref(a) over the full vocabulary at temperature 1
and log pi_gen(a) under the distribution actually used; their summed difference is the row's KL
estimate (paper eq. 7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generation import SamplingConfig, check_beta, leading_padding
from .tilt import combine_values, tilted_logprobs

NEG_INF = float("-inf")
FINISH_REASONS = ("stop", "length")  # OpenAI's: EOS or a stop string / the token budget (or forced tokens) used up


@dataclass
class DecodedRow:
    """One decoded sequence as token ids.

    Attributes:
        token_ids: generated ids (EOS included when produced).
        logprobs_ref: log pi_ref(a_t|s_t), full vocabulary, temperature 1.
        logprobs_gen: log pi_gen(a_t|s_t) under the distribution used (pi_MAVIS with values).
        values: combined value sum_m lambda_m V_m(s_t ⊕ a_t) of each chosen token (raw, before
            normalisation); empty without a value scorer.
        finish_reason: one of :data:`FINISH_REASONS`.
        kl: KL(pi_gen(.|s_t) || pi_ref(.|s_t)) of each step's whole distribution (pi_ref at
            temperature 1): the expectation of that step's log-ratio given s_t, so its sum along a
            response estimates the sequence KL with less variance than the log-ratios' sum. Filled by
            :class:`DecodeState` (sampling and collection); empty where a path does not record it.
        base_kv: with ``capture_kv``, the base model's keys and values of the row's prompt and
            tokens but the last (a :class:`~mavis_align.decoding.steppers.PrefixKV` whose ``ids`` the
            caller fills in), for a later decode that continues the sequence; else None.
    """

    token_ids: list[int] = field(default_factory=list)
    logprobs_ref: list[float] = field(default_factory=list)
    logprobs_gen: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    kl: list[float] = field(default_factory=list)
    base_kv: object = None


@dataclass
class RowSpec:
    """How one row decodes; checked by :class:`SamplingConfig` and :meth:`check`.

    Attributes:
        config: temperature / greedy, top-k, beta, normalize, min/max new tokens, stop strings.
        weights: [M] objective weights summing to 1, or None for pi_ref alone.
        beta: tilt strength (default ``config.beta``).
        generator: the row's RNG (see :func:`row_generator`); needed unless greedy or forced.
        budget: most tokens this row may produce (default ``config.max_new_tokens``).
        forced: tokens to take instead of choosing (teacher forcing).
        stop_check: ``fn(generated ids) -> bool``, True once the text holds a stop string.
    """

    config: SamplingConfig
    weights: torch.Tensor | None = None
    beta: float | None = None
    generator: torch.Generator | None = None
    budget: int | None = None
    forced: Sequence[int] | None = None
    stop_check: Callable[[list[int]], bool] | None = None

    def check(self, n_objectives: int) -> "RowSpec":
        if self.weights is not None and tuple(self.weights.shape) != (n_objectives,):
            raise ValueError(f"row weights must have shape [{n_objectives}], got {list(self.weights.shape)}")
        if self.beta is not None:
            check_beta(self.beta)
        if self.budget is not None and not 0 <= self.budget <= self.config.max_new_tokens:
            raise ValueError(f"a row's budget must be in [0, {self.config.max_new_tokens}], got {self.budget}")
        if self.forced is None and not self.config.greedy and self.generator is None:
            raise ValueError("sampling needs an explicit torch.Generator per row (or greedy=True)")
        return self

    @property
    def max_tokens(self) -> int:
        n = self.config.max_new_tokens if self.budget is None else self.budget
        return n if self.forced is None else min(n, len(self.forced))


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x``."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def row_seed(seed: int, index: int = 0) -> int:
    """The seed of row ``index`` of a call seeded ``seed`` (a request's own seed is row 0)."""
    return _mix64(_mix64(seed) + index) & 0x7FFFFFFFFFFFFFFF


def row_generator(seed: int, index: int = 0) -> torch.Generator:
    """A CPU generator for row ``index`` of a call seeded ``seed``."""
    return torch.Generator().manual_seed(row_seed(seed, index))


# ---------------------------------------------------------------------------------- per-row tensors


@dataclass
class RowTensors:
    """The rows' sampling parameters packed for batched math (B rows, M objectives).

    weights [B, M] (zeros for untilted rows), beta [B], top_k [B] long (0 = whole vocabulary),
    temperature [B] (1 for greedy rows), greedy [B] bool, normalize [B] bool, tilted [B] bool,
    min_new [B] long, max_step_kl [B] (inf: no cap), keep_tail [B] bool (tilted rows whose tokens
    outside the top-k keep pi_ref's mass), tilt_tokens [B] long (tilt only the first that many
    response tokens; 0 = every token), candidate_p [B] (tilted rows: the nucleus of pi_ref's mass
    inside the top-k that the candidates are; 1 = all k).
    """

    weights: torch.Tensor
    beta: torch.Tensor
    top_k: torch.Tensor
    temperature: torch.Tensor
    greedy: torch.Tensor
    normalize: torch.Tensor
    tilted: torch.Tensor
    min_new: torch.Tensor
    max_step_kl: torch.Tensor
    keep_tail: torch.Tensor
    tilt_tokens: torch.Tensor
    candidate_p: torch.Tensor

    @classmethod
    def pack(cls, specs: Sequence[RowSpec], n_objectives: int, device) -> "RowTensors":
        zero = torch.zeros(n_objectives)
        w = torch.stack([s.weights.float().cpu() if s.weights is not None else zero for s in specs]) if specs else torch.zeros(0, n_objectives)
        return cls(
            weights=w.to(device),
            beta=torch.tensor([float(s.config.beta if s.beta is None else s.beta) for s in specs], dtype=torch.float32, device=device),
            top_k=torch.tensor([s.config.top_k for s in specs], dtype=torch.long, device=device),
            temperature=torch.tensor([1.0 if s.config.greedy else s.config.temperature for s in specs], dtype=torch.float32, device=device),
            greedy=torch.tensor([s.config.greedy for s in specs], dtype=torch.bool, device=device),
            normalize=torch.tensor([s.config.normalize for s in specs], dtype=torch.bool, device=device),
            tilted=torch.tensor([s.weights is not None for s in specs], dtype=torch.bool, device=device),
            min_new=torch.tensor([s.config.min_new_tokens for s in specs], dtype=torch.long, device=device),
            max_step_kl=torch.tensor([s.config.max_step_kl or float("inf") for s in specs], dtype=torch.float32, device=device),
            keep_tail=torch.tensor([s.weights is not None and s.config.tail == "keep" for s in specs], dtype=torch.bool, device=device),
            tilt_tokens=torch.tensor([s.config.tilt_tokens for s in specs], dtype=torch.long, device=device),
            candidate_p=torch.tensor([s.config.candidate_p if s.weights is not None else 1.0 for s in specs], dtype=torch.float32, device=device),
        )

    def at_length(self, lengths: torch.Tensor | None) -> "RowTensors":
        """The rows at a step where row r has generated ``lengths[r]`` tokens: beta 0 on rows past their
        ``tilt_tokens`` horizon (the one place the horizon is applied)."""
        if lengths is None:
            if bool((self.tilt_tokens > 0).any()):
                raise ValueError("rows with a tilt horizon (tilt_tokens) need the number of tokens each has generated")
            return self
        past = (self.tilt_tokens > 0) & (lengths.to(self.tilt_tokens.device) >= self.tilt_tokens)
        if not bool(past.any()):
            return self
        return dataclasses.replace(self, beta=torch.where(past, torch.zeros_like(self.beta), self.beta))

    def select(self, index: torch.Tensor) -> "RowTensors":
        return RowTensors(**{k: getattr(self, k).index_select(0, index) for k in self.__dataclass_fields__})

    def cat(self, other: "RowTensors") -> "RowTensors":
        return RowTensors(**{k: torch.cat([getattr(self, k), getattr(other, k)]) for k in self.__dataclass_fields__})


# ---------------------------------------------------------------------------------- one step


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

    def full(self, vocab: int) -> torch.Tensor:
        """[B, V] log pi_gen over the whole vocabulary (-inf outside the candidates)."""
        if self.ids is None:
            return self.logp
        return torch.full((self.logp.shape[0], vocab), NEG_INF, device=self.logp.device).scatter(-1, self.ids, self.logp)

    def kl_to(self, ref_logp_full: torch.Tensor) -> torch.Tensor:
        """KL(pi_gen || pi_ref) of every row: sum_a pi_gen(a) (log pi_gen(a) - log pi_ref(a)).

        Args:
            ref_logp_full: [B, V] log pi_ref over the whole vocabulary.
        Returns:
            [B] float32, >= 0 up to rounding; +inf if pi_gen puts mass where pi_ref has none.
        """
        ref = ref_logp_full.float() if self.ids is None else ref_logp_full.float().gather(-1, self.ids)
        gen = self.logp.float()
        mass = gen > NEG_INF
        terms = torch.where(mass, gen.exp() * (gen - ref), torch.zeros_like(gen))
        return terms.sum(-1)


def step_distribution(
    logits: torch.Tensor,
    rows: RowTensors,
    *,
    scorer=None,
    banned: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> StepDistribution:
    """The next-token distribution of every row: pi_MAVIS for tilted rows, else pi_ref (top-k optional).

    A tilted row's candidates C are its top-k tokens of pi_ref (after temperature), tilted by
    exp(beta · v) with v = NORMALIZE(sum_m lambda_m V_m(s ⊕ a)). With ``tail="drop"`` (the paper) the
    other tokens get no mass. With ``tail="keep"`` they keep pi_ref's mass, tilted by the baseline
    value v_tail = sum_{a in C} pi_0(a) v(a) (pi_0: pi_ref renormalised over C): the tail enters the
    tilt as one more candidate with log-mass log(1 - pi_ref(C)) and value v_tail, and inside the tail
    tokens keep pi_ref's proportions. So beta = 0 is exactly pi_ref, the policy is continuous in beta,
    and a per-step KL cap bounds the KL to pi_ref itself. The baseline is the tilt's expectation of
    the value under pi_ref's candidate distribution: the tail, which no value model has looked at, is
    neither favoured nor penalised relative to an average candidate.

    Each row costs what its own settings ask for, whatever its neighbours are: only tilted rows'
    candidates are scored (at most the batch's largest *tilted* k per tilted row), and an untilted
    row keeps its own support (its top-k, or the whole vocabulary). When some row needs the whole
    vocabulary (an untilted full-vocabulary row, or a tilted row that keeps its tail), every row is
    returned as a [B, V] table (``ids`` None; -inf outside a row's support): the sampler draws in
    token-id order, so a row's draw is the same in either form. Candidates whose logit is -inf
    (banned words, constrained decoding, EOS before ``min_new_tokens``) never enter NORMALIZE's min
    and max and get no probability.

    Args:
        logits: [B, V] pi_ref logits (-inf allowed).
        rows: the rows' parameters.
        scorer: value scorer holding the **tilted rows only**, in batch order, with
            ``score(candidates [T, K], weights [T, M]) -> [T, K, M]``; or None
            (preference-conditioned value models read the weights; see ``steppers.model_weights``).
        banned: [B, V] bool, tokens a row may not produce now, or None.
        lengths: [B] long, tokens each row has generated (needed by rows with ``tilt_tokens``: past
            it they sample at beta 0, :meth:`RowTensors.at_length`).
    Returns:
        The distribution; ``values`` holds the raw combined values of tilted rows' candidates (and the
        baseline value on a kept tail), NaN elsewhere.
    """
    rows = rows.at_length(lengths)
    logits = logits.float()
    if banned is not None and bool(banned.any()):
        logits = logits.masked_fill(banned, NEG_INF)
    vocab = logits.shape[-1]
    logp_full = torch.log_softmax(logits / rows.temperature[:, None], dim=-1)
    tilted = rows.tilted if scorer is not None else torch.zeros_like(rows.tilted)
    k_row = torch.where(rows.top_k > 0, rows.top_k.clamp(max=vocab), torch.full_like(rows.top_k, vocab))
    whole = (k_row == vocab) & ~tilted  # untilted rows sampling the whole vocabulary
    if bool(whole.all()):
        return StepDistribution(None, logp_full, None)
    keep = tilted & rows.keep_tail
    if not bool((whole | keep).any()):
        return _candidate_distribution(logp_full, rows, k_row, scorer)[0]
    # one [B, V] table: the rows with candidates are computed on their own, then spread over the vocabulary
    part = (~whole).nonzero().squeeze(-1)
    lp_part = logp_full.index_select(0, part)
    sub, tail = _candidate_distribution(lp_part, rows.select(part), k_row.index_select(0, part), scorer)
    table = sub.full(vocab)
    values = None
    if sub.values is not None:
        values = torch.full_like(table, float("nan")).scatter(-1, sub.ids, sub.values)
    if tail is not None:
        valid = _candidate_mask(lp_part.gather(-1, sub.ids), k_row.index_select(0, part), rows.candidate_p.index_select(0, part))
        in_c = torch.zeros_like(table, dtype=torch.bool).scatter(-1, sub.ids, valid)  # each row's candidates
        table = torch.where(in_c, table, lp_part + tail.shift[:, None])  # drop rows: shift -inf, nothing outside C
        values = torch.where(in_c | ~torch.isfinite(tail.shift)[:, None], values, tail.value[:, None])
        at_zero = (rows.keep_tail.index_select(0, part) & (rows.beta.index_select(0, part) == 0))[:, None]
        table = torch.where(at_zero, lp_part, table)  # beta 0 keeping the tail is pi_ref, bit for bit
    logp = logp_full.index_copy(0, part, table)
    if values is not None:
        values = torch.full_like(logp, float("nan")).index_copy(0, part, values)
    return StepDistribution(None, logp, values)


def _candidate_mask(ref_logp: torch.Tensor, k_row: torch.Tensor, candidate_p: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K] usable candidates of top-k columns ``ref_logp`` [B, K] (pi_ref's log-probabilities, sorted):
    within the row's own k, not -inf, and (``candidate_p`` [B] < 1) among the fewest that hold that much
    of pi_ref's mass (a token is in while the mass before it is below p)."""
    valid = (torch.arange(ref_logp.shape[1], device=ref_logp.device)[None, :] < k_row[:, None]) & torch.isfinite(ref_logp)
    if candidate_p is not None and bool((candidate_p < 1).any()):
        p = ref_logp.exp().masked_fill(~valid, 0.0)
        valid = valid & ((p.cumsum(-1) - p) < candidate_p[:, None])
    return valid


@dataclass
class _Tail:
    """A kept tail, per row: ``shift`` [B] = log pi_gen(tail) - log pi_ref(tail) (added to log pi_ref of
    every token outside the candidates; -inf where the tail is dropped); ``value`` [B] its raw baseline value."""

    shift: torch.Tensor
    value: torch.Tensor


def _candidate_distribution(logp_full: torch.Tensor, rows: RowTensors, k_row: torch.Tensor, scorer) -> tuple[StepDistribution, _Tail | None]:
    """:func:`step_distribution` over candidates, for rows that all have them (own top-k, or tilted):
    [B, K] with K the largest k; the scorer sees the tilted rows' first K_t candidates only (K_t their
    largest k). Also the kept tails (None when no row keeps one)."""
    ref_logp, ids = torch.topk(logp_full, int(k_row.max()), dim=-1)
    valid = _candidate_mask(ref_logp, k_row, rows.candidate_p)
    tilted = rows.tilted if scorer is not None else torch.zeros_like(rows.tilted)
    if not bool(tilted.any()):
        return StepDistribution(ids, torch.log_softmax(ref_logp.masked_fill(~valid, NEG_INF), dim=-1), None), None
    every = bool(tilted.all())
    t = None if every else tilted.nonzero().squeeze(-1)

    def of_tilted(x: torch.Tensor) -> torch.Tensor:
        return x if every else x.index_select(0, t)

    k_t = int(of_tilted(k_row).max())
    w = of_tilted(rows.weights)
    ref_t, valid_t = of_tilted(ref_logp)[:, :k_t], of_tilted(valid)[:, :k_t]
    combined = combine_values(scorer.score(of_tilted(ids)[:, :k_t], w), w)
    keep = of_tilted(rows.keep_tail)
    tail = None
    if bool(keep.any()):  # the tail as one more candidate: log-mass log(1 - pi_ref(C)), value the pi_0-mean of v
        in_c = ref_t.masked_fill(~valid_t, NEG_INF)
        log_tail = torch.log1p(-torch.logsumexp(in_c, dim=-1).exp().clamp(max=1.0))
        v_tail = (torch.softmax(in_c, dim=-1) * combined.masked_fill(~valid_t, 0.0)).sum(-1)
        use = keep & torch.isfinite(log_tail)
        lp = tilted_logprobs(torch.cat([ref_t, log_tail[:, None]], 1), torch.cat([combined, v_tail[:, None]], 1), of_tilted(rows.beta),
                             normalize=of_tilted(rows.normalize), valid=torch.cat([valid_t, use[:, None]], 1),
                             max_step_kl=of_tilted(rows.max_step_kl))
        tilted_lp = lp[:, :k_t]
        shift = torch.where(use, lp[:, k_t] - log_tail, torch.full_like(log_tail, NEG_INF))
        tail = _Tail(shift, v_tail)
    else:
        tilted_lp = tilted_logprobs(ref_t, combined, of_tilted(rows.beta), normalize=of_tilted(rows.normalize), valid=valid_t,
                                    max_step_kl=of_tilted(rows.max_step_kl))
    pad = ids.shape[1] - k_t
    if pad:
        tilted_lp = torch.nn.functional.pad(tilted_lp, (0, pad), value=NEG_INF)
        combined = torch.nn.functional.pad(combined, (0, pad), value=float("nan"))
    if every:
        return StepDistribution(ids, tilted_lp, combined), tail
    logp = torch.log_softmax(ref_logp.masked_fill(~valid, NEG_INF), dim=-1).index_copy(0, t, tilted_lp)
    values = torch.full_like(logp, float("nan")).index_copy(0, t, combined)
    if tail is not None:
        tail = _Tail(torch.full((ids.shape[0],), NEG_INF, device=ids.device).index_copy(0, t, tail.shift),
                     torch.full((ids.shape[0],), float("nan"), device=ids.device).index_copy(0, t, tail.value))
    return StepDistribution(ids, logp, values), tail


def sample_positions(logp: torch.Tensor, greedy: torch.Tensor, generators: Sequence[torch.Generator | None],
                     ids: torch.Tensor | None = None) -> torch.Tensor:
    """The one sampler: a candidate position per row [B].

    Greedy rows take the argmax. Every other row inverts its CDF, taken in token-id order, with a
    single uniform drawn from its own CPU generator: it consumes one random number per token
    however many candidates it (or its neighbours) has, and neither zero-probability padding nor
    the order the candidates come in changes the draw.

    Args:
        logp: [B, K] log-probabilities (-inf allowed).
        greedy: [B] bool.
        generators: B generators (None allowed for greedy rows).
        ids: [B, K] token id of each position, or None when position = token id.
    """
    pos = torch.argmax(logp, dim=-1)
    sampled = [i for i, g in enumerate(greedy.tolist()) if not g]
    if not sampled:
        return pos
    for i in sampled:
        if generators[i] is None:
            raise ValueError("a sampled row needs a torch.Generator")
    u = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in sampled]).to(logp.device)
    idx = torch.tensor(sampled, device=logp.device)
    order = None if ids is None else torch.argsort(ids.index_select(0, idx), dim=-1)
    lp = logp.index_select(0, idx)
    probs = torch.exp((lp if order is None else lp.gather(-1, order)).double())
    cdf = torch.cumsum(probs, dim=-1)
    draw = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1).clamp(max=probs.shape[1] - 1)
    # rounding can land on the zero-probability tail: step back to the last positive entry
    last_pos = torch.where(probs > 0, torch.arange(probs.shape[1], device=probs.device), torch.zeros_like(draw)[:, None]).amax(-1)
    hit = probs.gather(-1, draw[:, None]).squeeze(-1) > 0
    draw = torch.where(hit, draw, last_pos)
    if order is not None:
        draw = order.gather(-1, draw[:, None]).squeeze(-1)
    return pos.index_copy(0, idx, draw)


def finish_reason(token_ids: list[int], spec: RowSpec, eos_id: int | None) -> str | None:
    """The one stop rule: ``"stop"`` (EOS, or a stop string in the text), ``"length"`` (budget used up), or None."""
    if eos_id is not None and token_ids and token_ids[-1] == eos_id:
        return "stop"
    if spec.stop_check is not None and spec.stop_check(token_ids):
        return "stop"
    if len(token_ids) >= spec.max_tokens:
        return "length"
    return None


# ---------------------------------------------------------------------------------- the batch


class DecodeState:
    """A live batch: the base model's cache, the value scorer's, the rows' parameters and records.

    Rows join with :meth:`admit` (prefilled on their own, then merged), advance together with
    :meth:`step` (or :meth:`distribution` + a custom chooser + :meth:`select` / :meth:`advance`,
    as beam search does) and leave when they finish (or by :meth:`select`).

    The value scorer holds only the rows that need it (:attr:`scored`): the tilted rows (those with
    objective weights), in batch order, so a plain row never runs through a value model, and the
    scorer exists only while such a row is live. With ``score_all_rows`` it holds every row instead
    (step-level guidance scores the rows itself); then every row is tilted (MAVIS proposals) or none.

    Args:
        make_base: builds a fresh base stepper (``start``/``step``/``reorder``/``merge``).
        make_scorer: builds a fresh value scorer, or None for pi_ref alone.
        n_objectives: M, the width of the rows' weights.
        eos_id: end-of-sequence id, or None.
        capture_kv: give every finished row's record the base model's keys and values
            (``DecodedRow.base_kv``; bases with ``row_kv`` only).
        score_all_rows: the scorer holds every row (see above).
    """

    def __init__(self, make_base: Callable[[], object], make_scorer: Callable[[], object] | None, n_objectives: int, eos_id: int | None,
                 capture_kv: bool = False, score_all_rows: bool = False):
        self.make_base, self.make_scorer = make_base, make_scorer
        self.n_objectives, self.eos_id, self.capture_kv = n_objectives, eos_id, capture_kv
        self.score_all_rows = score_all_rows
        self.base = self.scorer = self.logits = self.rows = self.lengths = None
        self.specs: list[RowSpec] = []
        self.records: list[DecodedRow] = []
        self.keys: list = []
        self.scored: list[bool] = []  # per live row: held by the scorer

    def __len__(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def admit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, specs: Sequence[RowSpec], keys: Sequence,
              row_source: torch.Tensor | None = None) -> list[tuple[object, DecodedRow]]:
        """Prefill prompts ([P, T] left-padded) and add one row per spec at the end of the batch.

        Args:
            row_source: [B] long, row r continues prompt ``row_source[r]`` (default: B = P, identity);
                a prompt shared by several rows runs through the models once.
            keys: one opaque key per row (returned when the row finishes).
        Returns:
            (key, record) of rows with nothing to generate (budget 0): they never join.
        """
        specs = [s.check(self.n_objectives) for s in specs]
        if len(keys) != len(specs):
            raise ValueError(f"got {len(keys)} keys for {len(specs)} rows")
        n_rows = input_ids.shape[0] if row_source is None else int(row_source.shape[0])
        if len(specs) != n_rows:
            raise ValueError(f"got {len(specs)} row specs for {n_rows} rows")
        if self.score_all_rows and len({s.weights is not None for s in [*self.specs, *specs]}) > 1:
            raise ValueError("a state whose scorer holds every row (score_all_rows) tilts every row or none")
        empty = [(k, DecodedRow()) for k, s in zip(keys, specs) if s.max_tokens == 0]
        keep = [i for i, s in enumerate(specs) if s.max_tokens > 0]
        if not keep:
            return empty
        base = self.make_base()
        logits = base.start(input_ids, attention_mask)
        source = torch.arange(input_ids.shape[0]) if row_source is None else row_source.cpu()
        if row_source is not None or len(keep) < n_rows:
            index = source[keep].to(logits.device)
            base.reorder(index)
            logits = logits.index_select(0, index)
        specs, keys = [specs[i] for i in keep], [keys[i] for i in keep]
        scored = [self.make_scorer is not None and (self.score_all_rows or s.weights is not None) for s in specs]
        scorer = self._start_scorer(input_ids, attention_mask, source[keep], scored) if any(scored) else None
        rows = RowTensors.pack(specs, self.n_objectives, logits.device)
        lengths = torch.zeros(len(specs), dtype=torch.long, device=logits.device)
        if self.base is None:
            self.base, self.logits, self.rows, self.lengths = base, logits, rows, lengths
        else:
            self.base.merge(base)
            self.logits = torch.cat([self.logits, logits])
            self.rows, self.lengths = self.rows.cat(rows), torch.cat([self.lengths, lengths])
        if scorer is not None:
            if self.scorer is None:
                self.scorer = scorer
            else:
                self.scorer.merge(scorer)
        self.specs += specs
        self.keys += keys
        self.scored += scored
        self.records += [DecodedRow() for _ in specs]
        return empty

    def _start_scorer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, source: torch.Tensor, scored: list[bool]):
        """A fresh scorer started on the prompts of the rows it will hold (``source``: each row's prompt)."""
        rows = [int(p) for p, s in zip(source.tolist(), scored) if s]
        prompts = sorted(set(rows))
        ids, mask = input_ids, attention_mask
        if len(prompts) < input_ids.shape[0]:
            at = torch.tensor(prompts, dtype=torch.long, device=input_ids.device)
            ids, mask = input_ids.index_select(0, at), attention_mask.index_select(0, at.to(attention_mask.device))
            first = leading_padding(mask)  # columns that are padding in every kept prompt are dropped
            ids, mask = ids[:, first:], mask[:, first:]
        scorer = self.make_scorer()
        scorer.start(ids, mask)
        if rows != list(range(len(prompts))):
            where = {p: i for i, p in enumerate(prompts)}
            scorer.reorder(torch.tensor([where[p] for p in rows], dtype=torch.long))
        return scorer

    def distribution(self) -> StepDistribution:
        """pi_gen of every live row at the current step."""
        banned = None
        if self.eos_id is not None:
            early = self.lengths < self.rows.min_new
            if bool(early.any()):
                banned = torch.zeros_like(self.logits, dtype=torch.bool)
                banned[:, self.eos_id] = early
        # with score_all_rows the scorer holds every row: it tilts them when they are all tilted (step-level
        # search over MAVIS proposals), and is the selection's alone when none is
        tilting = not self.score_all_rows or bool(self.specs and self.specs[0].weights is not None)
        return step_distribution(self.logits, self.rows, scorer=self.scorer if tilting else None, banned=banned, lengths=self.lengths)

    def select(self, index: Sequence[int] | torch.Tensor) -> None:
        """Keep rows ``index`` in that order (repeats allowed: beam search)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.logits.device)
        il = idx.tolist()
        if not il:
            self.base = self.scorer = self.logits = self.rows = self.lengths = None
            self.specs, self.keys, self.records, self.scored = [], [], [], []
            return
        self.base.reorder(idx)
        if self.scorer is not None:
            at = self._scorer_rows()
            kept = [at[i] for i in il if self.scored[i]]
            if kept:
                self.scorer.reorder(torch.tensor(kept, dtype=torch.long))
            else:
                self.scorer = None  # no row needs the value models any more; the next tilted row starts a new one
        self.logits, self.rows, self.lengths = self.logits.index_select(0, idx), self.rows.select(idx), self.lengths.index_select(0, idx)
        self.specs, self.keys, self.records = [self.specs[i] for i in il], [self.keys[i] for i in il], [self.records[i] for i in il]
        self.scored = [self.scored[i] for i in il]

    def _scorer_rows(self) -> list[int | None]:
        """Per live row, its row in the scorer (None: not held)."""
        out, n = [], 0
        for s in self.scored:
            out.append(n if s else None)
            n += s
        return out

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor) -> None:
        """Append one token per live row ([B]) to the models' state."""
        self.logits = self.base.step(tokens)
        if self.scorer is not None:
            held = tokens if all(self.scored) else tokens[torch.tensor([i for i, s in enumerate(self.scored) if s], device=tokens.device)]
            self.scorer.append(held)
        self.lengths = self.lengths + 1

    @torch.no_grad()
    def step(self, on_step: Callable[[StepDistribution], None] | None = None) -> list[tuple[object, DecodedRow]]:
        """One token for every live row (sampled, greedy or forced); finished rows leave.

        Returns:
            (key, record) of the rows that finished at this step.
        """
        dist = self.distribution()
        if on_step is not None:
            on_step(dist)
        forced = [i for i, s in enumerate(self.specs) if s.forced is not None]
        no_draw = self.rows.greedy
        if forced:  # forced rows take their token: they draw nothing
            no_draw = no_draw.clone()
            no_draw[forced] = True
        pos = sample_positions(dist.logp, no_draw, [s.generator for s in self.specs], dist.ids)
        chosen = dist.token_ids(pos)
        lp_gen = dist.logp.gather(-1, pos[:, None]).squeeze(-1)
        if forced:
            t = self.lengths.tolist()
            idx = torch.tensor(forced, device=chosen.device)
            want = torch.tensor([self.specs[i].forced[t[i]] for i in forced], device=chosen.device)
            chosen = chosen.index_copy(0, idx, want)
            if dist.ids is None:
                pos = pos.index_copy(0, idx, want)
                lp_gen = lp_gen.index_copy(0, idx, dist.logp.index_select(0, idx).gather(-1, want[:, None]).squeeze(-1))
            else:
                hit = dist.ids.index_select(0, idx) == want[:, None]
                at = torch.argmax(hit.long(), dim=-1)
                lp = dist.logp.index_select(0, idx).gather(-1, at[:, None]).squeeze(-1)
                pos = pos.index_copy(0, idx, at)
                lp_gen = lp_gen.index_copy(0, idx, torch.where(hit.any(-1), lp, torch.full_like(lp, NEG_INF)))
        ref_full = torch.log_softmax(self.logits.float(), dim=-1)
        lp_ref = ref_full.gather(-1, chosen[:, None]).squeeze(-1)
        val = dist.values.gather(-1, pos[:, None]).squeeze(-1).tolist() if dist.values is not None else None
        tilted = self.rows.tilted.tolist()
        c_l, r_l, g_l, k_l = chosen.tolist(), lp_ref.tolist(), lp_gen.tolist(), dist.kl_to(ref_full).tolist()
        keep, done = [], []
        for i, (spec, rec) in enumerate(zip(self.specs, self.records)):
            rec.token_ids.append(c_l[i])
            rec.logprobs_ref.append(r_l[i])
            rec.logprobs_gen.append(g_l[i])
            rec.kl.append(k_l[i])
            if val is not None and tilted[i]:
                rec.values.append(val[i])
            reason = finish_reason(rec.token_ids, spec, self.eos_id)
            if reason is None:
                keep.append(i)
            else:
                rec.finish_reason = reason
                if self.capture_kv and hasattr(self.base, "row_kv"):
                    rec.base_kv = self.base.row_kv(i)
                done.append((self.keys[i], rec))
        if len(keep) < len(c_l):
            self.select(keep)
            chosen = chosen.index_select(0, torch.tensor(keep, dtype=torch.long, device=chosen.device))
        if keep:
            self.advance(chosen)
        return done


@torch.no_grad()
def decode_ids(
    base,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: SamplingConfig,
    *,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
    scorer=None,
    weights: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    stop_check: Callable[[list[int]], bool] | None = None,
    forced: Sequence[Sequence[int]] | None = None,
    on_step: Callable[[int, StepDistribution], None] | None = None,
    row_source: torch.Tensor | None = None,
    max_new_tokens: Sequence[int] | None = None,
    capture_kv: bool = False,
) -> list[DecodedRow]:
    """Decode a left-padded batch to the end with one :class:`DecodeState`.

    Args:
        base: a fresh :class:`~mavis_align.decoding.steppers.CachedBase` or ``NaiveBase``.
        input_ids, attention_mask: [P, T] prompts, left-padded.
        eos_id: end-of-sequence id, or None for none.
        generators: one RNG per decode row; or ``generator``: one RNG from which every row's seed
            is drawn. Required when sampling.
        scorer: a fresh value scorer, or None for plain pi_ref.
        weights: [B, M] rows summing to 1 (needed with a scorer); beta: [B] (default ``config.beta``).
        stop_check: called with a row's generated ids after each token; True ends the row.
        forced: per row, tokens to take instead of sampling (teacher forcing): the records then
            hold log pi_ref and log pi_gen of those tokens (-inf when outside the candidates).
        on_step: called as ``on_step(t, distribution)`` at every step; rows are the live rows in order.
        row_source: [B] long: decode row r continues prompt row ``row_source[r]``.
        max_new_tokens: per-row token budgets (each <= ``config.max_new_tokens``).
        capture_kv: fill ``DecodedRow.base_kv`` of every row (see :class:`DecodeState`).
    Returns:
        One :class:`DecodedRow` per decode row.
    """
    batch = input_ids.shape[0] if row_source is None else int(row_source.shape[0])
    if forced is not None and len(forced) != batch:
        raise ValueError(f"forced has {len(forced)} rows for a batch of {batch}")
    if max_new_tokens is not None and len(max_new_tokens) != batch:
        raise ValueError(f"max_new_tokens gives {len(max_new_tokens)} budgets for a batch of {batch}")
    if scorer is not None and weights is None:
        raise ValueError("decoding with value models needs objective weights")
    if generators is None and generator is not None and forced is None and not config.greedy:
        seeds = torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device).tolist()
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if generators is not None and len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
    n_obj = 0 if weights is None else int(weights.shape[1])
    specs = [
        RowSpec(
            config, weights=None if weights is None else weights[r], beta=None if beta is None else float(beta[r]),
            generator=None if generators is None else generators[r],
            budget=None if max_new_tokens is None else int(max_new_tokens[r]),
            forced=None if forced is None else forced[r], stop_check=stop_check,
        )
        for r in range(batch)
    ]
    state = DecodeState(lambda: base, (lambda: scorer) if scorer is not None else None, n_obj, eos_id, capture_kv=capture_kv)
    out: list[DecodedRow | None] = [None] * batch
    for r, rec in state.admit(input_ids, attention_mask, specs, list(range(batch)), row_source):
        out[r] = rec
    t = 0
    while len(state):
        for r, rec in state.step(None if on_step is None else (lambda d, t=t: on_step(t, d))):
            out[r] = rec
        t += 1
    return out
