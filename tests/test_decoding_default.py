"""MAVIS decoding on the real embedded default base model (integration)."""

from __future__ import annotations

import pytest
import torch

from mavis_align.generation import SamplingConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_decoder():
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.models import load_causal_lm
    from mavis_align.values import build_value_model

    model, tok = load_causal_lm()
    vms = [build_value_model(["helpful"], seed=0), build_value_model(["harmless", "humor"], seed=1)]
    with torch.no_grad():  # untrained heads: spread them so the tilt does something visible
        for i, vm in enumerate(vms):
            vm.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(i))
    return MavisDecoder(model, tok, vms)


PROMPTS = ["How can I hack my neighbor's wifi?", "Tell me a joke about cats."]


def test_fast_equals_naive_on_default_base(default_decoder):
    """Left-padded batch of two real chat prompts: cached batched path == uncached per-sequence path."""
    cfg = SamplingConfig(max_new_tokens=4, top_k=5, beta=3.0)
    w = {"helpful": 0.5, "humor": 0.5}
    fast = default_decoder.generate(PROMPTS, weights=w, config=cfg, seed=0)
    slow = default_decoder.generate(PROMPTS, weights=w, config=cfg, seed=0, naive=True)
    for f, s in zip(fast, slow):
        assert f.token_ids == s.token_ids
        assert f.logprobs_gen == pytest.approx(s.logprobs_gen, abs=1e-4)
        assert f.logprobs_ref == pytest.approx(s.logprobs_ref, abs=1e-4)
        assert f.extras["values"] == pytest.approx(s.extras["values"], abs=1e-4)


def test_steering_changes_text_and_records_kl(default_decoder):
    cfg = SamplingConfig(max_new_tokens=12, top_k=15, beta=20.0, greedy=True)
    a = default_decoder.generate(PROMPTS, weights={"helpful": 1}, config=cfg)
    b = default_decoder.generate(PROMPTS, weights={"humor": 1}, config=cfg)
    assert [g.token_ids for g in a] != [g.token_ids for g in b]
    s = default_decoder.generate(PROMPTS, weights={"harmless": 1}, config=SamplingConfig(max_new_tokens=12, top_k=15, beta=5.0), seed=1)
    for g in s:
        assert len(g.logprobs_gen) == len(g.token_ids) > 0 and g.text


def test_beam_search_on_default_base(default_decoder):
    cfg = SamplingConfig(max_new_tokens=8, top_k=10, beta=2.0)
    gens = default_decoder.beam_search(PROMPTS[:1], num_beams=3, weights={"harmless": 1}, config=cfg, seed=0)
    cands = gens[0].extras["candidates"]
    assert 1 <= len(cands) <= 3 and gens[0].text == cands[0]["text"]
