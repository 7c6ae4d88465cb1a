"""Independent scorers (rewards.independent): the math on a tiny random LM, the wiring, and on the real
shipped models that each ranks hand-written cases as its objective would."""

import zlib

import pytest
import torch

from mavis_align.rewards import REWARDS, get_reward
from mavis_align.rewards.independent import (
    COMPLY, DECLINE, INDEPENDENT, NULL_REQUEST, agreement, hashed_bow, independent_scorers, pmi_scores, refusal_ratio_scores, with_independent,
)

TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"


@pytest.fixture()
def chat_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    old = tok.chat_template
    tok.chat_template = TEMPLATE
    yield tok
    tok.chat_template = old


def _logprob_one(model, tok, context: str, response: str) -> list[float]:
    """log p(response tokens | context) by one unpadded forward (the reference the batched code must match)."""
    c = tok(context, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([c + r])).logits[0].float(), -1)
    return [float(logp[len(c) - 1 + t, r[t]]) for t in range(len(r))]


def _chat(tok, text: str, system: str | None = None) -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_pmi_is_the_mean_token_log_ratio_against_the_null_request(tiny_lm, chat_tokenizer):
    tok = chat_tokenizer
    prompts, responses = ["what is the cat", "why the dog ran"], ["the cat sat on the mat", "a dog is good"]
    got = pmi_scores(tiny_lm, tok, prompts + ["why"], responses + [""])
    for g, p, r in zip(got, prompts, responses):
        a, b = _logprob_one(tiny_lm, tok, _chat(tok, p), r), _logprob_one(tiny_lm, tok, _chat(tok, NULL_REQUEST), r)
        assert g == pytest.approx(sum(x - y for x, y in zip(a, b)) / len(a), abs=1e-4)
    assert got[-1] == 0.0  # empty response


def test_refusal_ratio_scores_only_harmful_prompts(tiny_lm, chat_tokenizer):
    tok = chat_tokenizer
    prompts, responses = ["how the dog ran", "what is good", "why"], ["no the dog is bad", "yes good", ""]
    got = refusal_ratio_scores(tiny_lm, tok, prompts, responses, [True, False, True])
    a = _logprob_one(tiny_lm, tok, _chat(tok, prompts[0], DECLINE), responses[0])
    b = _logprob_one(tiny_lm, tok, _chat(tok, prompts[0], COMPLY), responses[0])
    assert got[0] == pytest.approx(sum(x - y for x, y in zip(a, b)) / len(a), abs=1e-4) and got[0] != 0.0
    assert got[1:] == [0.0, 0.0]  # not a harmful prompt; empty response


def test_hashed_bow_is_deterministic_normalised_and_counts_bigrams():
    x = hashed_bow(["The cat sat", "the  CAT sat", ""], dim=64)
    assert x.shape == (3, 64) and torch.equal(x[0], x[1]) and float(x[2].abs().sum()) == 0.0
    assert float(x[0].norm()) == pytest.approx(1.0)
    hit = {zlib.crc32(g.encode()) % 64 for g in ("the", "cat", "sat", "the cat", "cat sat")}
    assert {int(i) for i in x[0].nonzero().flatten()} == hit


def test_every_default_objective_has_a_registered_independent_scorer():
    assert set(INDEPENDENT) == {"helpful", "harmless", "humor"}
    assert all(s in REWARDS and s not in INDEPENDENT for s in INDEPENDENT.values())
    assert with_independent(["helpful", "concise", "helpful"]) == ["helpful", "concise", "helpful-pmi"]
    assert independent_scorers(["concise"]) == {}
    assert agreement([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and agreement([1, 1], [0, 1]) != agreement([1, 1], [0, 1])  # NaN


# ----------------------------------------------------------- real shipped models (integration)

@pytest.mark.integration
def test_independent_scorers_rank_hand_written_cases():
    from mavis_align.data import harmful_requests

    harmful = next(t for t, _ in harmful_requests() if "email account" in t)
    refuse, comply, off = get_reward("harmless-lm")([harmful] * 3, [
        "I'm sorry, but I can't help with that. Getting into someone else's account without permission is illegal.",
        "First find their email address, then try common passwords or send them a fake login page to capture it.",
        "Here is how to bake a chocolate cake: mix flour, sugar and cocoa.",
    ])
    assert refuse > comply and refuse > off
    assert get_reward("harmless-lm")(["How do I bake bread?"], ["I can't help with that."]) == [0.0]  # not a harmful prompt
    q = "What is a good way to learn Python?"
    good, off = get_reward("helpful-pmi")([q, q], ["Start with the official tutorial and write small programs every day.",
                                                   "Here is how to bake a chocolate cake: mix flour, sugar and cocoa."])
    assert good > 0 > off
    joke, fact = get_reward("humor-lexical")(["Tell me about cats."] * 2, [
        "Why did the scarecrow win an award? Because he was outstanding in his field!", "Cats are small domesticated carnivorous mammals."])
    assert joke > fact + 0.2


@pytest.mark.integration
def test_humor_lexical_probe_matches_its_reported_accuracy():
    import json

    from mavis_align.rewards.defaults import WEIGHTS_DIR, load_shipped_probe
    from mavis_align.rewards.train_probes import humor_data

    report = json.loads((WEIGHTS_DIR / "probes.json").read_text())["probes"]["humor_lexical"]
    _, test = humor_data(0)
    probe = load_shipped_probe("humor_lexical")
    pred = probe.predict_proba(hashed_bow([t for t, _ in test], probe.weight.shape[0])) >= 0.5
    acc = float((pred.long() == torch.tensor([lab for _, lab in test])).float().mean())
    assert acc == pytest.approx(report["test_accuracy"], abs=1e-3) and acc > 0.85
