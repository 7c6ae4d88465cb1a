"""MAVIS decoding: the fast batched + cached path against the naive per-sequence reference,
seeding, lambda steering and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mavis_align.decoding.decoder import MavisDecoder, parse_value_spec, parse_weights
from mavis_align.decoding.engine import decode_ids
from mavis_align.decoding.steppers import CachedBase, CachedValueScorer, NaiveBase, SequenceValueScorer, bind_objectives, naive_value_fn
from mavis_align.generation import SamplingConfig
from mavis_align.values import ValueModel, tiny_llama_backbone, tokenizer_fingerprint


def make_value_model(tokenizer, objectives, seed: int, hidden: int = 32) -> ValueModel:
    backbone = tiny_llama_backbone(len(tokenizer), hidden_size=hidden, num_layers=2, num_heads=4, seed=seed)
    vm = ValueModel(backbone, objectives, tokenizer_fingerprint(tokenizer))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        vm.head.weight.copy_(torch.randn(vm.head.weight.shape, generator=g))  # values spread well beyond init scale
    return vm.eval()


@pytest.fixture(scope="module")
def value_models(tiny_tokenizer):
    return [make_value_model(tiny_tokenizer, ["a"], 1), make_value_model(tiny_tokenizer, ["b", "c"], 2)]


PROMPTS = ["hello world the cat sat on the mat", "why", "what is a good dog ?"]


def _batch(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _trace(base, scorer, tok, forced, config, weights, beta, eos_id=None):
    ids, mask = _batch(tok, PROMPTS)
    dists = []
    rows = decode_ids(
        base, ids, mask, config, eos_id=eos_id, scorer=scorer, weights=weights, beta=beta,
        forced=forced, on_step=lambda t, d: dists.append((None if d.ids is None else d.ids.clone(), d.logp.exp().clone(), d.values.clone())),
    )
    return rows, dists


@pytest.mark.parametrize("k", [1, 5, 24])
def test_fast_path_matches_naive_reference(tiny_lm, tiny_tokenizer, value_models, k):
    """Left-padded batch of unequal prompts: cached + one-forward candidate scoring == per-sequence uncached."""
    tok = tiny_tokenizer
    bindings = bind_objectives(value_models)
    config = SamplingConfig(max_new_tokens=6, top_k=k, beta=3.0)
    weights = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.0, 0.3, 0.7]])
    beta = torch.tensor([3.0, 1.0, 8.0])
    # a forced continuation per row (different lengths) so both paths walk the same states
    g = torch.Generator().manual_seed(0)
    forced = [torch.randint(4, len(tok), (n,), generator=g).tolist() for n in (6, 4, 5)]
    fast_rows, fast = _trace(CachedBase(tiny_lm), CachedValueScorer(value_models, bindings), tok, forced, config, weights, beta)
    slow_rows, slow = _trace(NaiveBase(tiny_lm), SequenceValueScorer(naive_value_fn(value_models, bindings), [b.name for b in bindings]), tok, forced, config, weights, beta)
    assert len(fast) == len(slow) == 6
    for t, ((fi, fp, fv), (si, sp, sv)) in enumerate(zip(fast, slow)):
        # finished rows leave the batch: the distributions cover the rows still running
        assert fi.shape[0] == sum(1 for f in forced if t < len(f))
        assert torch.equal(fi, si), f"step {t}: candidates differ"
        torch.testing.assert_close(fv, sv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fp, sp, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_rows, slow_rows):
        assert a.token_ids == b.token_ids
        assert a.logprobs_ref == pytest.approx(b.logprobs_ref, abs=1e-5)
        assert a.logprobs_gen == pytest.approx(b.logprobs_gen, abs=1e-5)


def test_sampled_sequences_match_naive(tiny_lm, tiny_tokenizer, value_models):
    """Sampling end to end (own choices, EOS allowed): same generator -> same tokens on both paths."""
    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    cfg = SamplingConfig(max_new_tokens=8, top_k=6, beta=4.0)
    fast = dec.generate(PROMPTS, weights={"a": 1, "c": 2}, config=cfg, seed=3, chat=False)
    slow = dec.generate(PROMPTS, weights={"a": 1, "c": 2}, config=cfg, seed=3, chat=False, naive=True)
    for f, s in zip(fast, slow):
        assert f.token_ids == s.token_ids
        assert f.logprobs_gen == pytest.approx(s.logprobs_gen, abs=1e-5)


def test_multi_head_equals_separate_models(tiny_lm, tiny_tokenizer, value_models):
    """A 2-head model gives the same tilt as two single-head copies of its heads."""
    two_head = value_models[1]
    singles = []
    for h, name in enumerate(two_head.objectives):
        vm = ValueModel(two_head.backbone, [name], two_head.tokenizer_fingerprint)
        with torch.no_grad():
            vm.head.weight.copy_(two_head.head.weight[h : h + 1])
            vm.head.bias.copy_(two_head.head.bias[h : h + 1])
        singles.append(vm.eval())
    cfg = SamplingConfig(max_new_tokens=6, top_k=5, beta=5.0)
    w = {"b": 0.4, "c": 0.6}
    a = MavisDecoder(tiny_lm, tiny_tokenizer, [two_head]).generate(PROMPTS, weights=w, config=cfg, seed=1, chat=False)
    b = MavisDecoder(tiny_lm, tiny_tokenizer, singles).generate(PROMPTS, weights=w, config=cfg, seed=1, chat=False)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.logprobs_gen == pytest.approx(y.logprobs_gen, abs=1e-5)


def test_seed_determinism_and_lambda_changes_output(tiny_lm, tiny_tokenizer, value_models):
    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    cfg = SamplingConfig(max_new_tokens=10, top_k=8, beta=50.0, greedy=True)
    # greedy with a large beta: the argmax is the highest-value candidate, so opposite objectives
    # (a vs its negation via another head) must pick different tokens somewhere.
    x = dec.generate(PROMPTS, weights={"a": 1}, config=cfg, chat=False)
    y = dec.generate(PROMPTS, weights={"b": 1}, config=cfg, chat=False)
    assert [g.token_ids for g in x] != [g.token_ids for g in y]
    s = SamplingConfig(max_new_tokens=10, top_k=8, beta=2.0)
    r1 = dec.generate(PROMPTS, weights={"a": 1, "b": 1}, config=s, seed=11, chat=False)
    r2 = dec.generate(PROMPTS, weights={"a": 1, "b": 1}, config=s, seed=11, chat=False)
    assert [g.token_ids for g in r1] == [g.token_ids for g in r2]
    r3 = dec.generate(PROMPTS, weights={"a": 1, "b": 1}, config=s, seed=12, chat=False)
    assert [g.token_ids for g in r1] != [g.token_ids for g in r3]


def test_kl_estimate_recorded(tiny_lm, tiny_tokenizer, value_models):
    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    gens = dec.generate(PROMPTS, weights={"a": 1}, config=SamplingConfig(max_new_tokens=8, top_k=5, beta=4.0), seed=0, chat=False)
    for g in gens:
        assert len(g.logprobs_ref) == len(g.logprobs_gen) == len(g.token_ids) == len(g.extras["values"])
        assert all(lg > float("-inf") for lg in g.logprobs_gen)
    # averaged over many samples, E[sum log pi_gen/pi_ref] is a KL: positive
    many = dec.generate(PROMPTS * 20, weights={"a": 1}, config=SamplingConfig(max_new_tokens=4, top_k=5, beta=4.0), seed=0, chat=False, batch_size=30)
    assert sum(g.log_ratio for g in many) / len(many) > 0


def test_beta_zero_is_top_k_sampling(tiny_lm, tiny_tokenizer, value_models):
    """beta = 0: pi_MAVIS is pi_ref restricted to its top-k, whatever the values."""
    cfg = SamplingConfig(max_new_tokens=6, top_k=4, beta=0.0)
    m = MavisDecoder(tiny_lm, tiny_tokenizer, value_models).generate(PROMPTS, weights={"a": 1}, config=cfg, seed=5, chat=False)
    p = MavisDecoder(tiny_lm, tiny_tokenizer).generate(PROMPTS, config=SamplingConfig(max_new_tokens=6, top_k=4), seed=5, chat=False)
    for x, y in zip(m, p):
        assert x.token_ids == y.token_ids
        assert x.logprobs_gen == pytest.approx(y.logprobs_gen, abs=1e-5)


def test_no_value_models_is_plain_sampling_by_inverse_cdf(tiny_lm, tiny_tokenizer):
    """Without value models, prompt i follows an uncached loop that inverts pi_ref's CDF with one
    uniform per token from ``row_generator(seed, i)``."""
    from mavis_align.decoding import row_generator

    cfg = SamplingConfig(max_new_tokens=6)
    got = MavisDecoder(tiny_lm, tiny_tokenizer).generate(PROMPTS, config=cfg, seed=2, chat=False)
    for i, (prompt, g) in enumerate(zip(PROMPTS, got)):
        gen = row_generator(2, i)
        ids = tiny_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        want = []
        for _ in range(cfg.max_new_tokens):
            with torch.no_grad():
                p = torch.softmax(tiny_lm(ids).logits[0, -1].double(), -1)
            u = torch.rand((), generator=gen, dtype=torch.float64)
            tok = int(torch.searchsorted(torch.cumsum(p, 0), u * p.sum(), right=True))
            want.append(tok)
            if tok == tiny_tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[tok]])], 1)
        assert g.token_ids == want


def test_bad_input_fails_before_decoding(tiny_lm, tiny_tokenizer, value_models):
    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    cfg = SamplingConfig(max_new_tokens=4, top_k=5)
    with pytest.raises(ValueError, match="unknown objective 'nope'.*a, b, c"):
        dec.generate(PROMPTS, weights={"nope": 1}, config=cfg)
    with pytest.raises(ValueError, match=">= 0"):
        dec.generate(PROMPTS, weights={"a": -1}, config=cfg)
    with pytest.raises(ValueError, match="all be zero"):
        dec.generate(PROMPTS, weights={"a": 0, "b": 0}, config=cfg)
    with pytest.raises(ValueError, match="beta"):
        SamplingConfig(beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        dec.generate(PROMPTS, weights={"a": 1}, beta=[1.0, -2.0, 1.0], config=cfg)
    with pytest.raises(ValueError, match="top_k"):
        dec.generate(PROMPTS, weights={"a": 1}, config=SamplingConfig(top_k=0))
    with pytest.raises(ValueError, match="no value models"):
        MavisDecoder(tiny_lm, tiny_tokenizer).generate(PROMPTS, weights={"a": 1})
    with pytest.raises(ValueError, match="more than one value model"):
        MavisDecoder(tiny_lm, tiny_tokenizer, [value_models[0], value_models[0]])


def test_tokenizer_mismatch_refused(tiny_lm, tiny_tokenizer):
    from mavis_align.values import TokenizerMismatchError

    vm = make_value_model(tiny_tokenizer, ["a"], 0)
    vm.tokenizer_fingerprint = "0" * 64
    with pytest.raises(TokenizerMismatchError, match="different tokenizer"):
        MavisDecoder(tiny_lm, tiny_tokenizer, [vm])


def test_cli_spec_parsing():
    assert parse_value_spec("helpful=runs/v") == ("helpful", "runs/v")
    assert parse_value_spec("runs/v") == (None, "runs/v")
    assert parse_weights(["a=0.5", "b=2"]) == {"a": 0.5, "b": 2.0}
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_weights(["a"])
    with pytest.raises(ValueError, match="not a number"):
        parse_weights(["a=x"])


@pytest.mark.parametrize("cap,tail,tilt", [(0.0, "drop", 0), (0.05, "drop", 0), (0.0, "keep", 0), (0.05, "keep", 0), (0.0, "drop", 2), (0.0, "keep", 2)])
def test_logits_processor_matches_native_decoder(tiny_lm, tiny_tokenizer, value_models, cap, tail, tilt):
    """model.generate(logits_processor=[MavisLogitsProcessor]) gives the native decoder's distribution
    (with and without a per-step KL cap; the paper's tilt and the one that keeps pi_ref's tail)."""
    from mavis_align.decoding.processor import MavisLogitsProcessor

    tok = tiny_tokenizer
    ids, mask = _batch(tok, PROMPTS)
    w = {"a": 0.6, "c": 0.4}
    proc = MavisLogitsProcessor(value_models, w, beta=4.0, top_k=5, attention_mask=mask, max_step_kl=cap, tail=tail, tilt_tokens=tilt)
    seen = []

    def record(input_ids, scores):
        out = proc(input_ids, scores)
        seen.append(out.clone())
        return out

    class Recorder:
        def __call__(self, input_ids, scores):
            return record(input_ids, scores)

    from transformers import LogitsProcessorList

    out = tiny_lm.generate(
        input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([Recorder()]), do_sample=False,
        max_new_tokens=5, min_new_tokens=5, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, top_k=None, top_p=None, temperature=None,
    )
    gen = out[:, ids.shape[1]:]
    forced = gen.tolist()
    # generate's min_new_tokens bans EOS before our processor runs: the native decode bans it the same way
    cfg = SamplingConfig(max_new_tokens=5, min_new_tokens=5, top_k=5, beta=4.0, max_step_kl=cap, tail=tail, tilt_tokens=tilt)
    rows, dists = _trace(CachedBase(tiny_lm), CachedValueScorer(value_models, bind_objectives(value_models)), tok, forced, cfg,
                         torch.tensor([[0.6, 0.0, 0.4]] * 3), torch.tensor([4.0] * 3), eos_id=tok.eos_token_id)
    assert len(seen) == 5
    for t, (ids_t, p_t, _) in enumerate(dists):
        dense = p_t if ids_t is None else torch.zeros(3, len(tok)).scatter(-1, ids_t, p_t)
        torch.testing.assert_close(seen[t].exp(), dense, atol=1e-5, rtol=1e-5)
        assert (tail == "keep") == bool((dense > 0).sum(-1).min() > 5)
    assert all(g.argmax().item() >= 0 for g in seen[0])


def test_beam_search_returns_ranked_candidates(tiny_lm, tiny_tokenizer, value_models):
    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    cfg = SamplingConfig(max_new_tokens=6, top_k=6, beta=2.0)
    gens = dec.beam_search(PROMPTS, num_beams=3, weights={"a": 1}, config=cfg, seed=0, chat=False)
    assert len(gens) == 3
    for g in gens:
        cands = g.extras["candidates"]
        assert 1 <= len(cands) <= 3
        values = [c["value"] for c in cands]
        assert values == sorted(values, reverse=True)
        assert g.text == cands[0]["text"]
        assert len(g.token_ids) == len(g.logprobs_gen) == len(g.extras["values"])
    again = dec.beam_search(PROMPTS, num_beams=3, weights={"a": 1}, config=cfg, seed=0, chat=False)
    assert [g.token_ids for g in gens] == [g.token_ids for g in again]
    # a re-ranker picks its favourite among the kept candidates
    pick_longest = dec.beam_search(PROMPTS, num_beams=3, weights={"a": 1}, config=cfg, seed=0, chat=False, rerank=lambda p, r: [len(x) for x in r])
    for g in pick_longest:
        assert len(g.text) == max(len(c["text"]) for c in g.extras["candidates"])


def test_beam_search_greedy_one_beam_follows_highest_value(tiny_lm, tiny_tokenizer, value_models):
    """With one beam and expand = k, the kept child each step is the top-value candidate."""
    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    cfg = SamplingConfig(max_new_tokens=5, top_k=4, beta=1.0, greedy=True)
    g = dec.beam_search(PROMPTS[:1], num_beams=1, expand=4, weights={"b": 1}, config=cfg, chat=False)[0]
    forced = [g.token_ids]
    ids, mask = _batch(tiny_tokenizer, PROMPTS[:1])
    dists = []
    decode_ids(CachedBase(tiny_lm), ids, mask, cfg, eos_id=None, scorer=CachedValueScorer(value_models, bind_objectives(value_models)),
               weights=torch.tensor([[0.0, 1.0, 0.0]]), beta=torch.tensor([1.0]), forced=forced, on_step=lambda t, d: dists.append(d))
    for t, d in enumerate(dists):
        assert d.ids[0, d.values[0].argmax()].item() == g.token_ids[t]


def test_row_source_and_per_row_budgets(tiny_lm, tiny_tokenizer, value_models):
    """Rows that share a prompt (prefilled once) == the same prompts duplicated; budgets end rows."""
    tok = tiny_tokenizer
    ids, mask = _batch(tok, PROMPTS[:2])
    src = torch.tensor([0, 0, 1, 1, 1])
    dup_ids, dup_mask = ids[src], mask[src]
    g = torch.Generator().manual_seed(1)
    forced = [torch.randint(4, len(tok), (6,), generator=g).tolist() for _ in range(5)]
    budgets = [6, 2, 0, 5, 3]
    cfg = SamplingConfig(max_new_tokens=6, top_k=5, beta=2.0)
    w, b = torch.tensor([[1.0, 0.0, 0.0]] * 5), torch.tensor([2.0] * 5)
    bind = bind_objectives(value_models)
    shared = decode_ids(CachedBase(tiny_lm), ids, mask, cfg, eos_id=None, scorer=CachedValueScorer(value_models, bind),
                        weights=w, beta=b, forced=forced, row_source=src, max_new_tokens=budgets)
    dup = decode_ids(CachedBase(tiny_lm), dup_ids, dup_mask, cfg, eos_id=None, scorer=CachedValueScorer(value_models, bind),
                     weights=w, beta=b, forced=forced, max_new_tokens=budgets)
    for r, (x, y) in enumerate(zip(shared, dup)):
        assert len(x.token_ids) == budgets[r] and x.token_ids == forced[r][: budgets[r]]
        assert x.logprobs_gen == pytest.approx(y.logprobs_gen, abs=1e-5)
        assert x.logprobs_ref == pytest.approx(y.logprobs_ref, abs=1e-5)
    sampled = decode_ids(CachedBase(tiny_lm), ids, mask, cfg, eos_id=None, generator=torch.Generator().manual_seed(0),
                         row_source=src, max_new_tokens=budgets)
    assert [len(r.token_ids) for r in sampled] == budgets
    assert all(r.finish_reason == "length" for r in sampled)


def test_merging_running_batches_equals_one_batch(tiny_lm, tiny_tokenizer, value_models):
    """Rows started separately and merged mid-decode (as a server admits requests) see the same
    distributions as rows decoded in one batch from the start."""
    tok = tiny_tokenizer
    bind = bind_objectives(value_models)
    a_ids, a_mask = _batch(tok, PROMPTS[:2])
    b_ids, b_mask = _batch(tok, PROMPTS[2:])
    base_a, base_b = CachedBase(tiny_lm), CachedBase(tiny_lm)
    sc_a, sc_b = CachedValueScorer(value_models, bind), CachedValueScorer(value_models, bind)
    base_a.start(a_ids, a_mask)
    sc_a.start(a_ids, a_mask)
    # batch a runs two steps alone
    for tok_id in (5, 7):
        sc_a.score(torch.tensor([[4, 5, 6]] * 2))
        base_a.step(torch.tensor([tok_id] * 2))
        sc_a.append(torch.tensor([tok_id] * 2))
    base_b.start(b_ids, b_mask)
    sc_b.start(b_ids, b_mask)
    base_a.merge(base_b)
    sc_a.merge(sc_b)
    cands = torch.tensor([[4, 8, 9]] * 3)
    merged_values = sc_a.score(cands)
    merged_logits = base_a.step(torch.tensor([6, 6, 6]))
    # reference: each side on its own
    ref_a_vals = CachedValueScorer(value_models, bind)
    ref_a_vals.start(a_ids, a_mask)
    rb = CachedBase(tiny_lm)
    rb.start(a_ids, a_mask)
    for tok_id in (5, 7):
        ref_a_vals.score(torch.tensor([[4, 5, 6]] * 2))
        rb.step(torch.tensor([tok_id] * 2))
        ref_a_vals.append(torch.tensor([tok_id] * 2))
    torch.testing.assert_close(merged_values[:2], ref_a_vals.score(cands[:2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_logits[:2], rb.step(torch.tensor([6, 6])), atol=1e-5, rtol=1e-5)
    ref_b_vals = CachedValueScorer(value_models, bind)
    ref_b_vals.start(b_ids, b_mask)
    torch.testing.assert_close(merged_values[2:], ref_b_vals.score(cands[2:]), atol=1e-5, rtol=1e-5)
    rbb = CachedBase(tiny_lm)
    rbb.start(b_ids, b_mask)
    torch.testing.assert_close(merged_logits[2:], rbb.step(torch.tensor([6])), atol=1e-5, rtol=1e-5)


def test_sample_positions_is_padding_invariant_and_distributed_right():
    from mavis_align.decoding import sample_positions

    p = torch.tensor([[0.1, 0.6, 0.3]]).log()
    padded = torch.cat([p, torch.full((1, 5), float("-inf"))], 1)
    no = torch.tensor([False])
    a = [int(sample_positions(p, no, [torch.Generator().manual_seed(s)])) for s in range(300)]
    b = [int(sample_positions(padded, no, [torch.Generator().manual_seed(s)])) for s in range(300)]
    assert a == b
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_positions(p, no, [g])) for _ in range(4000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert freq == pytest.approx([0.1, 0.6, 0.3], abs=0.03)
    # a row's draw does not depend on its neighbours; greedy rows take the argmax and draw nothing
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    both = sample_positions(torch.cat([padded, torch.tensor([[0.0, -1.0, -9.0, -9.0, -9.0, -9.0, -9.0, -9.0]])]), torch.tensor([False, True]), [g1, None])
    assert int(both[0]) == int(sample_positions(p, no, [g2])) and int(both[1]) == 0
    # the candidates' order does not matter: the CDF runs in token-id order
    perm = torch.tensor([[2, 0, 1]])
    for s in range(50):
        x = int(sample_positions(p, no, [torch.Generator().manual_seed(s)]))
        y = int(sample_positions(p.gather(1, perm), no, [torch.Generator().manual_seed(s)], ids=perm))
        assert perm[0, y] == x


def test_processor_ignores_masked_candidates_inside_top_k(tiny_lm, tiny_tokenizer, value_models):
    """Another processor left 3 tokens finite (constrained decoding); with top_k = 5 the two -inf
    candidates must neither get mass nor set NORMALIZE's range: the processor equals the tilt over
    the 3 allowed tokens."""
    from mavis_align.decoding import MavisLogitsProcessor

    ids, mask = _batch(tiny_tokenizer, PROMPTS)
    allowed = torch.tensor([[5, 9, 12], [7, 8, 23], [11, 20, 21]])
    scores = torch.full((3, len(tiny_tokenizer)), float("-inf"))
    scores.scatter_(1, allowed, torch.tensor([[0.5, 0.1, -0.3], [0.0, 0.2, 0.4], [1.0, -1.0, 0.0]]))
    proc = MavisLogitsProcessor(value_models, {"a": 1.0}, beta=4.0, top_k=5, attention_mask=mask)
    got = proc(ids, scores).exp()
    fn = naive_value_fn(value_models, bind_objectives(value_models))
    for b in range(3):
        prompt = ids[b][mask[b].bool()].tolist()
        v = fn([prompt + [int(a)] for a in allowed[b]])[:, 0]
        ref = torch.log_softmax(scores[b, allowed[b]], -1)
        want = torch.softmax(ref + 4.0 * (v - v.min()) / (v.max() - v.min()), -1)
        torch.testing.assert_close(got[b, allowed[b]], want, atol=1e-5, rtol=1e-5)
        assert float(got[b].sum()) == pytest.approx(1.0, abs=1e-5)


def test_beam_search_keeps_live_beams_after_n_children_finish(tiny_lm, tiny_tokenizer):
    """EOS is a child of every beam at every step (k = vocabulary). Finished children must not end
    the search: the beams live on to the token budget, and with values that prefer longer
    unfinished states the best candidates are the full-length ones."""
    from mavis_align.decoding import value_beam_search

    eos = tiny_tokenizer.eos_token_id
    vocab = len(tiny_tokenizer)

    def fn(seqs):  # value: -1 for a finished state, else its length
        return torch.tensor([[-1.0 if s[-1] == eos else float(len(s))] for s in seqs])

    ids, mask = _batch(tiny_tokenizer, PROMPTS[:2])
    cfg = SamplingConfig(max_new_tokens=6, top_k=vocab, beta=1.0)
    res = value_beam_search(CachedBase(tiny_lm), SequenceValueScorer(fn, ["len"]), ids, mask, cfg, num_beams=2, expand=vocab,
                            weights=torch.ones(2, 1), beta=torch.ones(2), eos_id=eos, generators=[torch.Generator().manual_seed(i) for i in range(2)])
    for r in res:
        assert len(r.candidates) == 2
        assert all(len(c.row.token_ids) == 6 and c.row.finish_reason == "length" for c in r.candidates)


# ---------------------------------------------------------------------------------- step-level guidance


def _step_search(tiny_lm, tok, value_models, prompts, *, n, chunk, select, weights, beta=2.0, max_new=9, seed=0, on_select=None):
    from mavis_align.decoding.engine import row_generator
    from mavis_align.decoding.steplevel import step_guided_search

    ids, mask = _batch(tok, prompts)
    return step_guided_search(CachedBase(tiny_lm), CachedValueScorer(value_models, bind_objectives(value_models)), ids, mask,
                              SamplingConfig(max_new_tokens=max_new), n=n, chunk=chunk, select=select,
                              weights=torch.tensor([weights] * len(prompts)), beta=torch.tensor([beta] * len(prompts)),
                              eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                              generators=[row_generator(seed, i) for i in range(len(prompts))], on_select=on_select)


@pytest.mark.parametrize("select", ["best", "tilt"])
def test_step_guidance_scores_whole_steps_and_keeps_the_chosen_one(tiny_lm, tiny_tokenizer, value_models, select):
    """Every candidate's value is V(prompt ⊕ its tokens so far) by the naive per-sequence path; best keeps
    the argmax; the response continues the kept candidate; a step is `chunk` tokens."""
    tok = tiny_tokenizer
    lam = [0.2, 0.5, 0.3]
    naive = naive_value_fn(value_models, bind_objectives(value_models))
    seen = []
    res = _step_search(tiny_lm, tok, value_models, PROMPTS, n=3, chunk=3, select=select, weights=lam,
                       on_select=lambda p, cands, vals, at: seen.append((p, cands, vals, at)))
    assert len(seen) >= len(PROMPTS)
    kept: dict[int, list[int]] = {}
    for p, cands, vals, at in seen:
        prompt_ids = tok(PROMPTS[p], add_special_tokens=False)["input_ids"]
        v = naive([prompt_ids + c for c in cands]) @ torch.tensor(lam)
        assert torch.allclose(v, torch.tensor(vals), atol=1e-4)
        if select == "best":
            assert at == max(range(len(vals)), key=lambda i: vals[i])
        before = kept.get(p, [])
        for c in cands:  # every candidate continues the previously kept prefix
            assert c[: len(before)] == before
            assert len(c) - len(before) <= 3 and (len(c) - len(before) == 3 or c[-1] == tok.eos_token_id or len(c) == 9)
        kept[p] = cands[at]
    for p, r in enumerate(res):
        assert r.row.token_ids == kept[p]
        assert len(r.step_values) == sum(1 for s in seen if s[0] == p)
        assert r.row.logprobs_gen == pytest.approx(r.row.logprobs_ref, abs=1e-5)  # proposal = pi_ref, full vocabulary, T = 1


def test_step_guidance_is_independent_of_its_batch(tiny_lm, tiny_tokenizer, value_models):
    """Prompts decoded together (finished prompts leaving the batch) == each decoded alone, with the same seed."""
    together = _step_search(tiny_lm, tiny_tokenizer, value_models, PROMPTS, n=3, chunk=2, select="tilt", weights=[0.0, 1.0, 0.0])
    from mavis_align.decoding.engine import row_generator
    from mavis_align.decoding.steplevel import step_guided_search

    for i, prompt in enumerate(PROMPTS):
        ids, mask = _batch(tiny_tokenizer, [prompt])
        alone = step_guided_search(CachedBase(tiny_lm), CachedValueScorer(value_models, bind_objectives(value_models)), ids, mask,
                                   SamplingConfig(max_new_tokens=9), n=3, chunk=2, select="tilt", weights=torch.tensor([[0.0, 1.0, 0.0]]),
                                   beta=torch.tensor([2.0]), eos_id=tiny_tokenizer.eos_token_id, pad_id=tiny_tokenizer.pad_token_id,
                                   generators=[row_generator(0, i)])[0]
        assert alone.row.token_ids == together[i].row.token_ids
        assert alone.selection_kl == pytest.approx(together[i].selection_kl)


def test_step_guidance_kl_bounds_hold_exactly_on_a_small_distribution():
    """Exact selection distributions over all N-tuples of a 4-outcome pi: KL(q||pi) <= log N - (N-1)/N
    for best-of-N and <= E[log N - H(p)] for tilt sampling (the bounds steplevel records)."""
    import itertools
    import math

    from mavis_align.decoding.steplevel import best_of_n_kl, tilt_selection_kl
    from mavis_align.decoding.tilt import tilted_logprobs

    pi = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    value = torch.tensor([0.1, 0.9, 0.4, 0.7])
    for n in (2, 3):
        q_best = torch.zeros(4, dtype=torch.float64)
        q_tilt = torch.zeros(4, dtype=torch.float64)
        bound = 0.0
        for tup in itertools.product(range(4), repeat=n):
            prob = float(torch.prod(pi[list(tup)]))
            v = value[list(tup)][None]
            logp = tilted_logprobs(torch.zeros_like(v), v, 3.0)[0]
            bound += prob * tilt_selection_kl(logp)
            best = max(range(n), key=lambda i: (float(v[0, i]), -i))
            q_best[tup[best]] += prob
            for i, x in enumerate(tup):
                q_tilt[x] += prob * math.exp(float(logp[i]))
        kl = lambda q: float((q[q > 0] * torch.log(q[q > 0] / pi[q > 0])).sum())  # noqa: E731
        assert kl(q_best) <= best_of_n_kl(n) + 1e-9
        assert kl(q_tilt) <= bound + 1e-9
        assert kl(q_tilt) > 0.0
    assert tilt_selection_kl(torch.log(torch.full((4,), 0.25))) == pytest.approx(0.0, abs=1e-6)
    assert tilt_selection_kl(torch.tensor([0.0, float("-inf"), float("-inf")])) == pytest.approx(math.log(3))


def test_step_guidance_through_the_decoder_and_evaluator(tiny_lm, tiny_tokenizer, value_models):
    """MavisDecoder.step_search records the selection KL; the evaluator adds it to the token log-ratios."""
    from mavis_align.evaluate.evaluator import evaluate_policy
    from mavis_align.evaluate.policies import DecoderPolicy

    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    cfg = SamplingConfig(max_new_tokens=6)
    pol = DecoderPolicy("mavis-step", dec, cfg, weights={"a": 1.0}, beta=2.0, chunk=2, candidates=4, chat=False)
    gens = pol.generate(PROMPTS, seed=1)
    assert [g.token_ids for g in gens] == [g.token_ids for g in pol.generate(PROMPTS, seed=1)]
    for g in gens:
        steps = len(g.extras["step_values"])
        assert 1 <= steps <= 3
        assert g.extras["selection_kl"] == pytest.approx(steps * (math.log(4) - 3 / 4))

    class Const:
        name = "const"

        def __call__(self, prompts, texts):
            return [0.0] * len(texts)

    res = evaluate_policy(pol, PROMPTS, [Const()], tiny_lm, tiny_tokenizer, samples=1, chat=False)
    expected = sum(g.extras["selection_kl"] + g.log_ratio for g in gens) / len(gens)
    assert res["kl"]["mean"] == pytest.approx(expected, abs=1e-3)
    assert "step-level" in res["kl_note"]
    with pytest.raises(ValueError, match="select"):
        dec.step_search(PROMPTS, select="worst", config=cfg)
    with pytest.raises(ValueError, match="value model"):
        MavisDecoder(tiny_lm, tiny_tokenizer).step_search(PROMPTS, config=cfg)


def test_step_guidance_over_token_tilted_proposals(tiny_lm, tiny_tokenizer, value_models):
    """proposal_beta > 0: the candidate steps are sampled from the token tilt (the top-k only with tail drop,
    log pi_gen = the tilted step distribution's), the KL the evaluator adds stays tokens' log-ratios + the
    selections' bound; the tilted rows score with the one scorer the selection uses."""
    from mavis_align.decoding.engine import step_distribution, RowSpec, RowTensors

    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    cfg = SamplingConfig(max_new_tokens=6, top_k=3, beta=4.0)
    plain = dec.step_search(PROMPTS, n=3, chunk=2, weights={"a": 1.0}, config=cfg, seed=2, chat=False)
    assert [g.token_ids for g in plain] == [g.token_ids for g in dec.step_search(PROMPTS, n=3, chunk=2, weights={"a": 1.0}, config=cfg, seed=2,
                                                                                chat=False, proposal_beta=0.0)]
    tilted = dec.step_search(PROMPTS, n=3, chunk=2, weights={"a": 1.0}, config=cfg, seed=2, chat=False, proposal_beta=8.0)
    assert any(a.token_ids != b.token_ids for a, b in zip(plain, tilted))
    ids, mask = _batch(tiny_tokenizer, PROMPTS)
    for i, g in enumerate(tilted):
        assert all(a != b for a, b in zip(g.logprobs_gen, g.logprobs_ref))  # a tilt, not pi_ref's top-k
        # the first token's log-probability is the tilted step distribution's at the prompt
        row_ids = ids[i : i + 1][:, mask[i].bool()]
        scorer = CachedValueScorer(value_models, bind_objectives(value_models))
        scorer.start(row_ids, torch.ones_like(row_ids))
        logits = tiny_lm(input_ids=row_ids).logits[:, -1]
        spec = RowSpec(cfg, weights=torch.tensor([1.0, 0.0, 0.0]), beta=8.0)
        d = step_distribution(logits, RowTensors.pack([spec], 3, logits.device), scorer=scorer)
        full = d.full(logits.shape[-1])[0]
        assert g.logprobs_gen[0] == pytest.approx(float(full[g.token_ids[0]]), abs=1e-4)
    with pytest.raises(ValueError, match="proposal_beta"):
        dec.step_search(PROMPTS, weights={"a": 1.0}, config=SamplingConfig(max_new_tokens=4), proposal_beta=2.0)


def test_mavis_responses_do_not_depend_on_batch_size(tiny_lm, tiny_tokenizer, value_models):
    """Per-row generators: another batch size keeps every row's random draws, so on a tiny fp32
    model (no rounding flips) the responses are the same token for token."""
    dec = MavisDecoder(tiny_lm, tiny_tokenizer, value_models)
    cfg = SamplingConfig(max_new_tokens=6, top_k=5, beta=3.0)
    prompts = [p for p in PROMPTS for _ in range(2)]
    one = dec.generate(prompts, weights={"a": 1}, config=cfg, seed=7, chat=False, batch_size=1)
    big = dec.generate(prompts, weights={"a": 1}, config=cfg, seed=7, chat=False, batch_size=len(prompts))
    assert [g.token_ids for g in one] == [g.token_ids for g in big]
    for x, y in zip(one, big):
        assert x.logprobs_gen == pytest.approx(y.logprobs_gen, abs=1e-4)


def test_step_kl_is_the_kl_of_the_step_distribution():
    """StepDistribution.kl_to: sum_a pi_gen(a)(log pi_gen(a) - log pi_ref(a)) over candidates, with
    impossible candidates (-inf) contributing nothing; the whole-vocabulary form agrees."""
    from mavis_align.decoding.engine import StepDistribution

    ref_full = torch.log_softmax(torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]), dim=-1)
    ids = torch.tensor([[0, 4, 1], [2, 3, 0]])
    gen = torch.log_softmax(torch.tensor([[0.3, 1.2, float("-inf")], [1.0, 1.0, 1.0]]), dim=-1)
    want = [sum(math.exp(g) * (g - ref_full[b, i].item()) for g, i in zip(gen[b].tolist(), ids[b].tolist()) if g > float("-inf")) for b in range(2)]
    got = StepDistribution(ids, gen, None).kl_to(ref_full)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert all(x > 0 for x in want)
    full = StepDistribution(ids, gen, None).full(5)
    assert StepDistribution(None, full, None).kl_to(ref_full).tolist() == pytest.approx(want, abs=1e-6)
    assert StepDistribution(None, ref_full, None).kl_to(ref_full).tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_decode_records_step_kl_with_the_mean_of_the_log_ratios(tiny_lm, tiny_tokenizer, value_models):
    """Every decoded token carries its step's KL(pi_gen || pi_ref): the recorded KL is the one of
    the distribution the token was drawn from, 0 for plain sampling, and its sum over a response
    has the same expectation as the sampled log-ratios' sum (averaged over many samples)."""
    tok = tiny_tokenizer
    cfg = SamplingConfig(max_new_tokens=6, top_k=5, beta=4.0)
    scorer = CachedValueScorer(value_models, bind_objectives(value_models))
    w = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    ids, mask = _batch(tok, PROMPTS)
    dists, refs = [], []
    base = CachedBase(tiny_lm)
    gens = lambda n: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
    rows = decode_ids(base, ids, mask, cfg, eos_id=None, scorer=scorer, weights=w, beta=torch.tensor([4.0] * 3),
                      on_step=lambda t, d: dists.append(d), generators=gens(3))
    # the recorded KL of step t is the distribution's own KL to the full-vocabulary pi_ref
    for r, row in enumerate(rows):
        assert len(row.kl) == len(row.token_ids) == 6
        assert all(k >= -1e-6 for k in row.kl) and max(row.kl) > 1e-3
    with torch.no_grad():
        full = torch.cat([ids, torch.tensor([row.token_ids for row in rows])], dim=1)
        fmask = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1)
        pos = fmask.cumsum(-1) - 1
        logits = tiny_lm(input_ids=full, attention_mask=fmask, position_ids=pos.clamp(min=0)).logits
    for t, d in enumerate(dists):
        refs = torch.log_softmax(logits[:, ids.shape[1] - 1 + t].float(), dim=-1)
        assert d.kl_to(refs).tolist() == pytest.approx([row.kl[t] for row in rows], abs=1e-4)
    plain = decode_ids(base, ids, mask, SamplingConfig(max_new_tokens=6), eos_id=None, generators=gens(3))
    assert all(abs(k) < 1e-5 for row in plain for k in row.kl)
    n = 600
    big_ids, big_mask = ids[[0] * n], mask[[0] * n]
    many = decode_ids(base, big_ids, big_mask, SamplingConfig(max_new_tokens=4, top_k=5, beta=4.0, normalize=False), eos_id=None, scorer=scorer,
                      weights=w[[0] * n], beta=torch.tensor([4.0] * n), generators=gens(n))
    sampled = torch.tensor([sum(g - r for g, r in zip(row.logprobs_gen, row.logprobs_ref)) for row in many])
    expected = torch.tensor([sum(row.kl) for row in many])
    se = (sampled - expected).std() / math.sqrt(n)
    print(f"\nlog-ratio sum {sampled.mean():.4f} (var {sampled.var():.4f}), step-KL sum {expected.mean():.4f} (var {expected.var():.4f}), se {se:.4f}")
    assert abs(sampled.mean() - expected.mean()) < 3 * se + 1e-3, (sampled.mean(), expected.mean(), se)
    assert expected.var() < sampled.var()  # the point of the per-step KL: same mean, less spread
