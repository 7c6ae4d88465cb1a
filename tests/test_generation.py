import pytest
import torch

from mavis_align.decoding import MavisDecoder, decode_ids
from mavis_align.decoding.steppers import CachedBase
from mavis_align.generation import SamplingConfig


def generate(model, tokenizer, prompts, config=SamplingConfig(), **kw):
    """Plain sampling from pi_ref: the decoder without value models."""
    return MavisDecoder(model, tokenizer).generate(prompts, config=config, **kw)


def reference_greedy(model, tokenizer, text, steps):
    """Uncached greedy decoding of one unpadded prompt; returns (tokens, log pi_ref per token)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    toks, lps = [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
        tok = int(torch.argmax(logits))
        toks.append(tok)
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        if tok == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return toks, lps


def test_batched_cached_greedy_matches_uncached_reference(tiny_lm, tiny_tokenizer):
    prompts = ["hello world the cat sat on the mat", "why", "the dog ran ?"]  # unequal lengths -> left padding
    gens = generate(tiny_lm, tiny_tokenizer, prompts, SamplingConfig(max_new_tokens=6, greedy=True), chat=False)
    for p, g in zip(prompts, gens):
        toks, lps = reference_greedy(tiny_lm, tiny_tokenizer, p, 6)
        assert g.token_ids == toks
        assert g.logprobs_ref == pytest.approx(lps, abs=1e-5)


def test_same_seed_same_output_and_seed_matters(tiny_lm, tiny_tokenizer):
    prompts = ["hello", "the cat"] * 3
    cfg = SamplingConfig(max_new_tokens=12)
    a = generate(tiny_lm, tiny_tokenizer, prompts, cfg, seed=3, chat=False, batch_size=4)
    b = generate(tiny_lm, tiny_tokenizer, prompts, cfg, seed=3, chat=False, batch_size=4)
    c = generate(tiny_lm, tiny_tokenizer, prompts, cfg, seed=4, chat=False, batch_size=4)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # every prompt draws from its own generator: on this tiny model the batch size changes no response
    d = generate(tiny_lm, tiny_tokenizer, prompts, cfg, seed=3, chat=False, batch_size=1)
    assert [g.token_ids for g in a] == [g.token_ids for g in d]


def test_logprobs_and_log_ratio(tiny_lm, tiny_tokenizer):
    g = generate(tiny_lm, tiny_tokenizer, ["hello"], SamplingConfig(max_new_tokens=8), seed=0, chat=False)[0]
    assert len(g.logprobs_ref) == len(g.token_ids) == len(g.logprobs_gen)
    assert g.log_ratio == pytest.approx(0.0, abs=1e-6)  # pi_gen == pi_ref at temperature 1
    hot = generate(tiny_lm, tiny_tokenizer, ["hello"], SamplingConfig(max_new_tokens=8, top_k=3), seed=0, chat=False)[0]
    assert all(lg >= lr - 1e-6 for lg, lr in zip(hot.logprobs_gen, hot.logprobs_ref))  # top-k renormalises upward
    assert hot.log_ratio > 0


def test_eos_stops_and_is_reported(tiny_tokenizer):
    from conftest import make_tiny_lm

    model = make_tiny_lm(len(tiny_tokenizer), seed=1)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits equal -> greedy picks id 0 == <eos>
    g = generate(model, tiny_tokenizer, ["hello", "the cat sat"], SamplingConfig(max_new_tokens=5, greedy=True), chat=False)
    assert [x.token_ids for x in g] == [[0], [0]]
    assert [x.finish_reason for x in g] == ["stop", "stop"]  # OpenAI's reason for EOS


def test_stop_string_cuts_text(tiny_lm, tiny_tokenizer):
    free = generate(tiny_lm, tiny_tokenizer, ["hello"], SamplingConfig(max_new_tokens=10, greedy=True), chat=False)[0]
    words = free.text.split()
    assert len(words) >= 3, "fixture model should produce several words"
    stop = words[2]
    g = generate(tiny_lm, tiny_tokenizer, ["hello"], SamplingConfig(max_new_tokens=10, greedy=True, stop_strings=(stop,)), chat=False)[0]
    assert g.finish_reason == "stop"
    assert stop not in g.text
    # decoding stopped at the first token whose text completes the stop string
    assert g.token_ids == free.token_ids[: len(g.token_ids)]
    assert stop in tiny_tokenizer.decode(g.token_ids, skip_special_tokens=True)
    assert stop not in tiny_tokenizer.decode(g.token_ids[:-1], skip_special_tokens=True)


@pytest.mark.parametrize(
    "kwargs, msg",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": 0.0}, "temperature"), ({"top_k": -1}, "top_k")],
)
def test_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**kwargs)


def test_sampling_requires_generator(tiny_lm, tiny_tokenizer):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="Generator"):
        decode_ids(CachedBase(tiny_lm), ids, torch.ones_like(ids), SamplingConfig(), eos_id=0)


def test_min_new_tokens_bans_eos(tiny_tokenizer):
    from conftest import make_tiny_lm

    model = make_tiny_lm(len(tiny_tokenizer), seed=1)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # greedy would pick <eos> (id 0) at once
    g = generate(model, tiny_tokenizer, ["hello"], SamplingConfig(max_new_tokens=5, min_new_tokens=3, greedy=True), chat=False)[0]
    assert g.token_ids[:3] != [0, 0, 0] and 0 not in g.token_ids[:3] and g.token_ids[3] == 0 and g.finish_reason == "stop"
