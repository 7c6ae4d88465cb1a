"""The tilt math: closed forms on hand-built tensors, and exactness against enumerated soft-optimal
policies on a tiny token MDP (paper eq. 5, Algorithm 2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import make_tiny_lm
from mavis_align.decoding.engine import decode_ids
from mavis_align.decoding.exact import TokenMDP, kl_divergence
from mavis_align.decoding.steppers import CachedBase, SequenceValueScorer
from mavis_align.decoding.tilt import combine_values, normalize_values, resolve_weights, tilted_logprobs
from mavis_align.generation import SamplingConfig


def _rows(k, temperature=1.0, beta=0.0, weights=None, normalize=True, greedy=False, max_step_kl=0.0):
    from mavis_align.decoding.engine import RowSpec, RowTensors

    cfg = SamplingConfig(max_new_tokens=1, top_k=k, temperature=temperature, beta=beta, normalize=normalize, greedy=greedy,
                         max_step_kl=max_step_kl)
    return RowTensors.pack([RowSpec(cfg, weights=weights)], 0 if weights is None else weights.shape[0], "cpu")


def test_step_distribution_top_k_after_temperature_per_row():
    from mavis_align.decoding.engine import step_distribution

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    before = logits.clone()
    rows = _rows(2, temperature=2.0).cat(_rows(3))
    d = step_distribution(logits, rows)
    assert d.ids.tolist() == [[1, 2, 0], [1, 2, 0]]
    top2 = torch.log_softmax(logits[0, [1, 2]] / 2.0, dim=-1)
    torch.testing.assert_close(d.logp[0, :2], top2)
    assert d.logp[0, 2] == float("-inf")  # outside row 0's k = 2
    torch.testing.assert_close(d.logp[1], torch.log_softmax(logits[1, [1, 2, 0]], dim=-1))
    assert torch.equal(logits, before)
    full = step_distribution(logits, _rows(0).cat(_rows(0)))
    assert full.ids is None and torch.allclose(full.logp, torch.log_softmax(logits, -1))


def test_step_distribution_masked_candidates_do_not_set_normalize_range():
    """-inf logits inside the top-k (banned words, earlier processors) get no mass and no say in NORMALIZE."""
    from mavis_align.decoding.engine import step_distribution

    class Fixed:  # value scorer: V of token a is vals[a]
        def __init__(self, vals):
            self.vals = torch.tensor(vals)

        def score(self, ids, weights=None):
            return self.vals[ids][..., None]

    logits = torch.tensor([[0.0, -0.1, float("-inf"), -0.2, float("-inf")]])
    vals = [0.5, 0.6, 100.0, 0.4, -100.0]  # the masked tokens would stretch NORMALIZE's range
    d = step_distribution(logits, _rows(5, beta=3.0, weights=torch.tensor([1.0])), scorer=Fixed(vals))
    p = d.full(5).exp()[0]
    assert p[2] == 0 and p[4] == 0
    ref = torch.log_softmax(torch.tensor([0.0, -0.1, -0.2]), -1)
    v = torch.tensor([0.5, 0.6, 0.4])
    want = torch.softmax(ref + 3.0 * (v - v.min()) / (v.max() - v.min()), -1)
    torch.testing.assert_close(p[[0, 1, 3]], want)


def test_combine_and_normalize_closed_form():
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])  # [1, 3, 2]
    v = combine_values(values, torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(v, torch.tensor([[0.75, 0.25, 0.5]]))
    n = normalize_values(v)
    torch.testing.assert_close(n, torch.tensor([[1.0, 0.0, 0.5]]))
    # all equal -> zeros (tilt leaves pi_ref unchanged); masked entries do not set the range
    assert normalize_values(torch.full((2, 4), 3.0)).abs().sum() == 0
    valid = torch.tensor([[True, True, False]])
    torch.testing.assert_close(normalize_values(torch.tensor([[1.0, 3.0, 100.0]]), valid), torch.tensor([[0.0, 1.0, 0.0]]))


def test_tilted_distribution_closed_form():
    ref = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    v = torch.tensor([[0.0, 2.0, 1.0]])
    ref0, v0 = ref.clone(), v.clone()
    beta = 2.0
    got = tilted_logprobs(ref, v, beta).exp()
    w = torch.tensor([0.5 * math.exp(0.0), 0.3 * math.exp(beta * 1.0), 0.2 * math.exp(beta * 0.5)])
    torch.testing.assert_close(got, (w / w.sum())[None], atol=1e-6, rtol=1e-6)
    raw = tilted_logprobs(ref, v, beta, normalize=False).exp()
    w = torch.tensor([0.5, 0.3 * math.exp(4.0), 0.2 * math.exp(2.0)])
    torch.testing.assert_close(raw, (w / w.sum())[None], atol=1e-6, rtol=1e-6)
    assert torch.equal(ref, ref0) and torch.equal(v, v0)
    torch.testing.assert_close(tilted_logprobs(ref, v, 0.0).exp(), torch.tensor([[0.5, 0.3, 0.2]]))  # beta 0: pi_ref
    per_row = tilted_logprobs(ref.repeat(2, 1), v.repeat(2, 1), torch.tensor([0.0, beta])).exp()
    torch.testing.assert_close(per_row[1], got[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        tilted_logprobs(ref, v, -1.0)


def test_resolve_weights():
    w = resolve_weights(["a", "b", "c"], {"a": 2, "c": 2}, 2)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.0, 0.5]] * 2))
    rows = resolve_weights(["a", "b"], [{"a": 1}, {"b": 3}], 2)
    torch.testing.assert_close(rows, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    for bad, msg in [({"z": 1}, "unknown objective 'z'"), ({"a": -0.1}, ">= 0"), ({"a": 0}, "all be zero"), ({"a": float("nan")}, ">= 0")]:
        with pytest.raises(ValueError, match=msg):
            resolve_weights(["a", "b"], bad, 1)
    with pytest.raises(ValueError, match="3 weight dicts for a batch of 2"):
        resolve_weights(["a"], [{"a": 1}] * 3, 2)


# ------------------------------------------------------------------ exactness on a token MDP

VOCAB, PROMPT = 4, [1, 2]


def _mdp(horizon: int, seed: int = 0) -> TokenMDP:
    model = make_tiny_lm(VOCAB, seed=seed, hidden=16)
    model.config.eos_token_id = None
    return TokenMDP(model, PROMPT, VOCAB, horizon), model


def _random_reward(mdp: TokenMDP, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {y: float(torch.randn((), generator=g)) for y in mdp.sequences}


def mavis_sequence_logprobs(mdp, model, rewards, weights, eta) -> dict:
    """log pi_MAVIS(y) for every response, by teacher-forced decoding with exact soft values."""
    n = len(mdp.sequences)
    ids = torch.tensor([PROMPT] * n)
    scorer = SequenceValueScorer(mdp.value_fn(rewards, eta), [f"r{m}" for m in range(len(rewards))])
    config = SamplingConfig(max_new_tokens=mdp.horizon, top_k=VOCAB, normalize=False, beta=1.0 / eta)
    rows = decode_ids(
        CachedBase(model), ids, torch.ones_like(ids), config, eos_id=None, scorer=scorer,
        weights=torch.tensor([weights] * n, dtype=torch.float32), forced=[list(y) for y in mdp.sequences],
    )
    return {y: sum(r.logprobs_gen) for y, r in zip(mdp.sequences, rows)}


@pytest.mark.parametrize("horizon,eta", [(1, 0.5), (3, 0.5), (3, 2.0)])
def test_exact_values_reproduce_optimal_policy(horizon, eta):
    """Decoding with V* (beta = 1/eta, no normalisation, k = |V|) gives pi* over whole sequences."""
    mdp, model = _mdp(horizon)
    reward = _random_reward(mdp, 1)
    want = mdp.optimal_logprobs(reward, eta)
    got = mavis_sequence_logprobs(mdp, model, [reward], [1.0], eta)
    assert sum(math.exp(v) for v in got.values()) == pytest.approx(1.0, abs=1e-5)
    for y in mdp.sequences:
        assert math.exp(got[y]) == pytest.approx(math.exp(want[y]), abs=1e-5), y


def test_bandit_weighted_values_are_exact_for_the_combined_reward():
    """One step (bandit): sum_m lambda_m V*_m = V* of sum_m lambda_m R_m, so eq. 5 holds exactly."""
    mdp, model = _mdp(1)
    eta, lam = 0.7, [0.3, 0.7]
    r1, r2 = _random_reward(mdp, 2), _random_reward(mdp, 3)
    combined = {y: lam[0] * r1[y] + lam[1] * r2[y] for y in mdp.sequences}
    want = mdp.optimal_logprobs(combined, eta)
    got = mavis_sequence_logprobs(mdp, model, [r1, r2], lam, eta)
    for y in mdp.sequences:
        assert math.exp(got[y]) == pytest.approx(math.exp(want[y]), abs=1e-6)


def test_multistep_weighted_values_gap_is_measured_not_zero():
    """Horizon 3: the lambda-sum of per-objective soft values is an approximation (the paper's).
    It can never beat the exact optimum of the combined KL-regularised objective; we measure the gap
    (benchmarks/mdp_gap.py reports it over many random MDPs)."""
    mdp, model = _mdp(3)
    eta, lam = 0.5, [0.5, 0.5]
    r1, r2 = _random_reward(mdp, 4), _random_reward(mdp, 5)
    combined = {y: lam[0] * r1[y] + lam[1] * r2[y] for y in mdp.sequences}
    exact = mdp.optimal_logprobs(combined, eta)
    approx = mavis_sequence_logprobs(mdp, model, [r1, r2], lam, eta)
    j_exact = mdp.objective(exact, combined, eta)["objective"]
    j_approx = mdp.objective(approx, combined, eta)["objective"]
    assert j_exact >= j_approx - 1e-9
    assert kl_divergence(approx, exact) > 1e-6  # genuinely different from the exact optimum
    # and much closer to it than pi_ref is
    ref = {y: mdp.ref_logprob(y) for y in mdp.sequences}
    assert kl_divergence(approx, exact) < kl_divergence(ref, exact)


def test_tilt_without_normalize_is_the_v3_form():
    """normalize=False: pi(a) = softmax over the top-k of logits/T + beta * sum_m lambda_m V_m(s+a)
    (the paper's v3 / the authors' 2026 code), per row beside a NORMALIZE row of the same batch."""
    from mavis_align.decoding.engine import step_distribution

    class Scorer:  # fixed values per token id: V [V, M]
        table = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.4, 0.1], [1.5, 1.5], [0.0, -2.0]])

        def score(self, ids, weights=None):
            return self.table[ids]

    logits = torch.tensor([[0.5, 2.0, 1.0, 1.5, -1.0]] * 2)
    lam = torch.tensor([0.25, 0.75])
    raw = _rows(3, temperature=0.7, beta=4.0, weights=lam, normalize=False)
    norm = _rows(3, temperature=0.7, beta=4.0, weights=lam, normalize=True)
    d = step_distribution(logits, raw.cat(norm), scorer=Scorer())
    top = [1, 3, 2]  # the 3 largest logits
    assert d.ids[0].tolist() == top
    v = Scorer.table[top] @ lam
    torch.testing.assert_close(d.logp[0], torch.log_softmax(logits[0, top] / 0.7 + 4.0 * v, dim=-1))
    vn = (v - v.min()) / (v.max() - v.min())
    torch.testing.assert_close(d.logp[1], torch.log_softmax(logits[1, top] / 0.7 + 4.0 * vn, dim=-1))


def test_step_kl_cap_closed_form():
    """capped_beta: the tilt's KL to pi_ref's top-k distribution is monotone in beta; a row over its cap
    gets the beta whose KL equals the cap (checked against the closed-form KL), rows within it keep beta."""
    from mavis_align.decoding.tilt import capped_beta, tilt_kl

    ref = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.6, 0.4, 0.0]]))
    v = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    valid = torch.isfinite(ref)
    beta = torch.tensor([3.0, 3.0, 3.0])

    def closed_form(row, b):
        p = ref[row].exp()[valid[row]]
        w = p * torch.exp(b * v[row][valid[row]])
        q = w / w.sum()
        return float((q * (q / p).log()).sum())

    full = tilt_kl(ref, v, beta, valid)
    for r in range(3):
        assert float(full[r]) == pytest.approx(closed_form(r, 3.0), rel=1e-5)
    assert all(closed_form(0, b) < closed_form(0, b + 0.5) for b in (0.0, 0.5, 1.0, 2.0))  # monotone in beta
    cap = torch.tensor([0.1, float("inf"), 10.0])
    got = capped_beta(ref, v, beta, cap, valid)
    assert 0 < float(got[0]) < 3.0 and closed_form(0, float(got[0])) == pytest.approx(0.1, abs=1e-5)
    assert got[1:].tolist() == [3.0, 3.0]  # no cap; a cap the tilt stays within
    # the masked candidate (pi_ref 0, value 5) never counts, whatever its value
    assert float(tilt_kl(ref, v, beta, valid)[2]) == pytest.approx(closed_form(2, 3.0), rel=1e-5)
    capped = tilted_logprobs(ref, v, beta, normalize=False, valid=valid, max_step_kl=cap)
    torch.testing.assert_close(capped[0], tilted_logprobs(ref[:1], v[:1], got[:1], normalize=False)[0])
    torch.testing.assert_close(capped[1:], tilted_logprobs(ref[1:], v[1:], beta[1:], normalize=False, valid=valid[1:]))
    with pytest.raises(ValueError, match="max_step_kl"):
        SamplingConfig(max_step_kl=-1.0)


def test_step_kl_cap_bounds_every_step_of_a_decode():
    """A decode over the whole (tiny) vocabulary with max_step_kl: every step's recorded KL to pi_ref is
    at most the cap (no top-k truncation term here), while the same tilt uncapped spends far more."""
    from conftest import make_tiny_tokenizer
    from mavis_align.decoding.decoder import MavisDecoder
    from test_decoding import make_value_model

    tok = make_tiny_tokenizer()
    dec = MavisDecoder(make_tiny_lm(len(tok), seed=3), tok, [make_value_model(tok, ["v"], 1)])
    prompts = ["hello world", "the cat sat on the mat"] * 4
    strong = SamplingConfig(max_new_tokens=6, top_k=len(tok), beta=30.0)
    capped = SamplingConfig(max_new_tokens=6, top_k=len(tok), beta=30.0, max_step_kl=0.05)
    steps_strong = [k for g in dec.generate(prompts, weights={"v": 1.0}, config=strong, seed=1, chat=False) for k in g.step_kl]
    steps_capped = [k for g in dec.generate(prompts, weights={"v": 1.0}, config=capped, seed=1, chat=False) for k in g.step_kl]
    assert max(steps_capped) <= 0.05 + 1e-4 and max(steps_capped) > 0.04  # the cap binds and holds
    assert sum(steps_strong) / len(steps_strong) > 0.5


# ------------------------------------------------------------------ the tilt that keeps pi_ref's tail (issue 30)


def _keep_reference(logp_ref: torch.Tensor, v_all: torch.Tensor, k: int, beta: float, normalize: bool, tail: str) -> torch.Tensor:
    """The tail-keeping (or dropping) tilt of one state written out directly: [V] log-probabilities.

    logp_ref: [V] log pi_ref (after temperature); v_all: [V] combined value of every token (only the
    top-k's are read)."""
    top = torch.topk(logp_ref, k).indices
    v = v_all[top].double()
    if normalize:
        v = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else torch.zeros_like(v)
    pi0 = torch.softmax(logp_ref[top].double(), -1)
    scores = torch.full_like(logp_ref, float("-inf"), dtype=torch.float64)
    if tail == "keep":
        scores = logp_ref.double() + beta * float((pi0 * v).sum())
    scores[top] = logp_ref[top].double() + beta * v
    return torch.log_softmax(scores, -1)


@pytest.mark.parametrize("normalize", [True, False])
def test_tail_keep_closed_form_and_beta_zero_is_pi_ref(normalize):
    from mavis_align.decoding.engine import RowSpec, RowTensors, step_distribution

    table = torch.tensor([[0.3], [2.0], [-0.4], [1.5], [0.0], [0.9]])

    class Scorer:
        def score(self, ids, weights=None):
            return table[ids]

    logits = torch.tensor([[0.5, 2.0, 1.0, 1.5, -1.0, 0.2]] * 4)
    w = torch.tensor([1.0])
    specs = [RowSpec(SamplingConfig(top_k=3, beta=b, temperature=0.8, normalize=normalize, tail=t), weights=w, generator=torch.Generator())
             for b, t in [(4.0, "keep"), (4.0, "drop"), (0.0, "keep"), (1.5, "keep")]]
    d = step_distribution(logits, RowTensors.pack(specs, 1, "cpu"), scorer=Scorer())
    assert d.ids is None  # kept tails need the whole vocabulary
    ref = torch.log_softmax(logits[0] / 0.8, -1)
    for row, (b, t) in enumerate([(4.0, "keep"), (4.0, "drop"), (0.0, "keep"), (1.5, "keep")]):
        torch.testing.assert_close(d.logp[row].double(), _keep_reference(ref, table[:, 0], 3, b, normalize, t), atol=1e-5, rtol=1e-5)
    assert torch.equal(d.logp[2], ref)  # beta 0 keeping the tail: pi_ref (after temperature), bit for bit
    top = torch.topk(ref, 3).indices
    raw_baseline = float((torch.softmax(ref[top], -1) * table[top, 0]).sum())
    outside = [i for i in range(6) if i not in top.tolist()]
    assert d.values[0, outside].tolist() == pytest.approx([raw_baseline] * len(outside), abs=1e-6)
    assert torch.isnan(d.values[1, outside]).all()


def test_tail_keep_beta_zero_decodes_pi_ref_exactly(tiny_lm, tiny_tokenizer):
    """`generate --tail keep --beta 0` is pi_ref: the same tokens and log-probabilities as plain sampling, KL estimate 0."""
    from mavis_align.decoding.decoder import MavisDecoder
    from test_decoding import make_value_model

    dec = MavisDecoder(tiny_lm, tiny_tokenizer, [make_value_model(tiny_tokenizer, ["v"], 1)])
    prompts = ["hello world", "the cat sat on the mat", "why"]
    keep = dec.generate(prompts, weights={"v": 1}, config=SamplingConfig(max_new_tokens=8, top_k=3, beta=0.0, tail="keep"), seed=5, chat=False)
    plain = MavisDecoder(tiny_lm, tiny_tokenizer).generate(prompts, config=SamplingConfig(max_new_tokens=8), seed=5, chat=False)
    for a, b in zip(keep, plain):
        assert a.token_ids == b.token_ids
        assert a.logprobs_gen == b.logprobs_gen == a.logprobs_ref
        assert a.log_ratio == 0.0 and max(a.step_kl) == pytest.approx(0.0, abs=1e-6)


def _mdp_keep_exact(mdp, values: dict, k: int, beta: float, tail: str) -> dict:
    """Exact sequence log-probabilities of the (kept or dropped tail) tilt on the token MDP, by enumeration."""
    out = {}
    for y in mdp.sequences:
        lp = 0.0
        for t in range(mdp.horizon):
            prefix = y[:t]
            v_all = torch.tensor([values[prefix + (a,)] for a in range(VOCAB)])
            lp += float(_keep_reference(mdp._cond[prefix].float(), v_all, k, beta, True, tail)[y[t]])
        out[y] = lp
    return out


@pytest.mark.parametrize("tail", ["keep", "drop"])
def test_tail_keep_and_drop_exact_on_the_token_mdp(tail):
    """Horizon 3, |V| = 4, k = 2, several beta: teacher-forced log pi_gen of every sequence equals the
    enumerated tilt; and 6000 sampled sequences follow that distribution (total variation < 0.06)."""
    mdp, model = _mdp(3, seed=2)
    g = torch.Generator().manual_seed(9)
    values = {p: float(torch.randn((), generator=g)) for t in range(1, 4) for p in itertools.product(range(VOCAB), repeat=t)}

    def fn(seqs):
        return torch.tensor([[values[tuple(s[len(PROMPT):])]] for s in seqs])

    for beta in (0.0, 1.0, 4.0):
        config = SamplingConfig(max_new_tokens=3, top_k=2, beta=beta, tail=tail)
        want = _mdp_keep_exact(mdp, values, 2, beta, tail)
        n = len(mdp.sequences)
        ids = torch.tensor([PROMPT] * n)
        rows = decode_ids(CachedBase(model), ids, torch.ones_like(ids), config, eos_id=None, scorer=SequenceValueScorer(fn, ["v"]),
                          weights=torch.ones(n, 1), forced=[list(y) for y in mdp.sequences])
        for y, r in zip(mdp.sequences, rows):
            assert sum(r.logprobs_gen) == pytest.approx(want[y], abs=1e-4) or want[y] == float("-inf"), (beta, y)
        m = 6000
        ids = torch.tensor([PROMPT] * m)
        samples = decode_ids(CachedBase(model), ids, torch.ones_like(ids), config, eos_id=None, scorer=SequenceValueScorer(fn, ["v"]),
                             weights=torch.ones(m, 1), generator=torch.Generator().manual_seed(int(beta * 10) + 1))
        counts: dict = {}
        for r in samples:
            counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
        tv = 0.5 * sum(abs(counts.get(y, 0) / m - math.exp(want[y])) for y in mdp.sequences)
        assert tv < 0.06, (beta, tv)
        if tail == "drop" and beta > 0:
            assert sum(1 for y in mdp.sequences if want[y] == float("-inf")) > 0


@pytest.mark.parametrize("tail", ["keep", "drop"])
def test_tilt_tokens_tilts_only_the_first_steps_on_the_token_mdp(tail):
    """tilt_tokens = 1 on the horizon-3 token MDP: step 0 is the beta-4 tilt, steps 1-2 are beta 0
    (pi_ref with the tail kept, its top-k with it dropped), exactly, for every sequence."""
    mdp, model = _mdp(3, seed=4)
    g = torch.Generator().manual_seed(3)
    values = {p: float(torch.randn((), generator=g)) for t in range(1, 4) for p in itertools.product(range(VOCAB), repeat=t)}

    def fn(seqs):
        return torch.tensor([[values[tuple(s[len(PROMPT):])]] for s in seqs])

    config = SamplingConfig(max_new_tokens=3, top_k=2, beta=4.0, tail=tail, tilt_tokens=1)
    n = len(mdp.sequences)
    ids = torch.tensor([PROMPT] * n)
    rows = decode_ids(CachedBase(model), ids, torch.ones_like(ids), config, eos_id=None, scorer=SequenceValueScorer(fn, ["v"]),
                      weights=torch.ones(n, 1), forced=[list(y) for y in mdp.sequences])
    for y, r in zip(mdp.sequences, rows):
        want = []
        for t in range(3):
            v_all = torch.tensor([values[y[:t] + (a,)] for a in range(VOCAB)])
            want.append(float(_keep_reference(mdp._cond[y[:t]].float(), v_all, 2, 4.0 if t == 0 else 0.0, True, tail)[y[t]]))
        for got, w in zip(r.logprobs_gen, want):
            assert got == pytest.approx(w, abs=1e-5) or (w == float("-inf") and got == float("-inf"))
        if tail == "keep":  # after the horizon: pi_ref itself, log-ratio 0 at each later step
            assert r.logprobs_gen[1:] == pytest.approx(r.logprobs_ref[1:], abs=1e-6)
    with pytest.raises(ValueError, match="tilt_tokens must be >= 0"):
        SamplingConfig(tilt_tokens=-1)


@pytest.mark.parametrize("tail", ["keep", "drop"])
def test_candidate_p_keeps_the_fewest_top_tokens_holding_that_mass(tail):
    """candidate_p: the candidates are the shortest prefix of pi_ref's top-k whose mass reaches p (so the
    distribution is the top-k' tilt with k' that prefix's length); p = 1 is the plain top-k; untilted rows are
    untouched."""
    from mavis_align.decoding.engine import RowSpec, RowTensors, step_distribution

    table = torch.tensor([[0.3], [2.0], [-0.4], [1.5], [0.0], [0.9]])

    class Scorer:
        def score(self, ids, weights=None):
            return table[ids]

    logits = torch.tensor([[0.5, 2.0, 1.0, 1.5, -1.0, 0.2]])
    ref = torch.log_softmax(logits[0], -1)
    mass = ref.exp().sort(descending=True).values.cumsum(0)  # 1 -> 0.38, 3 -> 0.61, 2 -> 0.78, ...
    w = torch.tensor([1.0])
    for p, k_eff in [(0.3, 1), (0.5, 2), (float(mass[1]) + 1e-4, 3), (0.7, 3), (1.0, 4)]:
        spec = RowSpec(SamplingConfig(top_k=4, beta=3.0, normalize=False, tail=tail, candidate_p=p), weights=w, generator=torch.Generator())
        d = step_distribution(logits, RowTensors.pack([spec], 1, "cpu"), scorer=Scorer())
        got = d.full(6)[0].double()
        torch.testing.assert_close(got, _keep_reference(ref, table[:, 0], k_eff, 3.0, False, tail), atol=1e-5, rtol=1e-5)
    plain = RowSpec(SamplingConfig(top_k=3, candidate_p=0.3), generator=torch.Generator())  # untilted: its own top-k, p unused
    d = step_distribution(logits, RowTensors.pack([plain], 1, "cpu"), scorer=None)
    assert int(torch.isfinite(d.full(6)[0]).sum()) == 3
    with pytest.raises(ValueError, match="candidate_p must be in"):
        SamplingConfig(candidate_p=0.0)
