import pytest
import torch

from mavis_align.rewards import REWARDS, Reward, get_reward, list_rewards, score_all
from mavis_align.rewards.hf import article_of, make_hf_classifier_reward
from mavis_align.rewards.lexical import copied_fraction, profanity_count, refusal_phrase_score, toxicity_score
from mavis_align.rewards.probe import LinearProbe, fit_probe


def test_reward_wrapper_batches_and_validates():
    calls = []

    def fn(p, r):
        calls.append(len(p))
        return [len(x) for x in r]

    rw = Reward("len", "length", (0, float("inf")), True, fn, batch_size=2)
    assert rw(["a", "b", "c"], ["x", "yy", "zzz"]) == [1.0, 2.0, 3.0]
    assert calls == [2, 1]
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        rw(["a", "b", "c"], ["x", "y"])
    with pytest.raises(TypeError, match="lists"):
        rw("a", "b")
    bad = Reward("bad", "wrong count", (0, 1), True, lambda p, r: [0.0])
    with pytest.raises(RuntimeError, match="returned 1 scores for 2"):
        bad(["a", "b"], ["c", "d"])


def test_registry_documents_every_reward_and_rejects_unknown():
    for entry in list_rewards():
        assert entry.description and len(entry.value_range) == 2 and isinstance(entry.higher_is_better, bool)
    assert {"helpful", "harmless", "humor", "positive", "hh-helpful", "hh-harmless", "hh-humor", "faithful"} <= set(REWARDS)
    with pytest.raises(ValueError) as info:
        get_reward("nope")
    assert "helpful" in str(info.value) and "hf:" in str(info.value)
    with pytest.raises(ValueError, match="not an integer"):
        get_reward("hf:some/model#x")


def test_paper_reward_models_use_documented_logits():
    idx = {n: REWARDS[n].kwargs["output_index"] for n in ("hh-helpful", "hh-harmless", "hh-humor", "summary-quality", "faithful")}
    assert idx == {"hh-helpful": 0, "hh-harmless": 0, "hh-humor": 1, "summary-quality": 0, "faithful": 1}
    assert REWARDS["faithful"].kwargs["input_format"] == "pair_reversed"  # summary first


def test_refusal_toxicity_copying_heuristics():
    assert refusal_phrase_score("I'm sorry, but I can't help with that.") == 1.0
    assert refusal_phrase_score("I\u2019m afraid that is not possible") == 1.0
    assert refusal_phrase_score("Sure! Here is how to bake bread.") == 0.0
    assert refusal_phrase_score("x" * 300 + " I cannot do that") == 0.5
    assert profanity_count("what the fuck, this is shit") == 2 and toxicity_score("clean words only") == 0.0
    assert toxicity_score("fuck fuck fuck") == 1.0
    assert copied_fraction("what is the capital of france", "what is the capital of france") == 1.0
    assert copied_fraction("what is the capital of france", "paris is the capital city") == pytest.approx(1 / 3)
    assert copied_fraction("what is the capital of france", "paris is a lovely city") == 0.0
    assert copied_fraction("anything", "") == 0.0


def test_probe_fit_save_load_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    probe = fit_probe(x, y, l2=1e-4)
    assert float(((probe.predict_proba(x) > 0.5).long() == y).float().mean()) > 0.97
    probe.meta = {"name": "t"}
    probe.save(tmp_path / "p.safetensors")
    back = LinearProbe.load(tmp_path / "p.safetensors")
    assert torch.allclose(back.predict_proba(x), probe.predict_proba(x)) and back.meta == {"name": "t"}
    with pytest.raises(ValueError, match="both classes"):
        fit_probe(x, torch.zeros(400))
    with pytest.raises(ValueError, match="8-dim"):
        probe.predict_proba(torch.zeros(2, 3))


def _save_tiny_classifier(folder, tokenizer, num_labels=2, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.mark.parametrize("index", [0, 1, 2])
def test_hf_classifier_backend_reads_chosen_logit(tmp_path, tiny_tokenizer, index):
    model = _save_tiny_classifier(tmp_path / "clf", tiny_tokenizer, num_labels=3)
    reward = get_reward(f"hf:{tmp_path / 'clf'}#{index}@response")  # same path as a hub id
    responses = ["the cat sat on the mat", "hello", "why is the dog bad ?"]
    got = reward(["q"] * 3, responses)
    tok = tiny_tokenizer
    for r, g in zip(responses, got):
        ids = tok(r, return_tensors="pt")
        with torch.no_grad():
            want = model(**ids).logits[0, index].item()
        assert g == pytest.approx(want, abs=1e-5)
    assert reward.name.endswith(f"#{index}@response")


def test_hf_classifier_formats_and_bad_index(tmp_path, tiny_tokenizer):
    _save_tiny_classifier(tmp_path / "clf", tiny_tokenizer)
    with pytest.raises(ValueError, match="has 2 outputs"):
        make_hf_classifier_reward(str(tmp_path / "clf"), output_index=5)
    with pytest.raises(ValueError, match="unknown input_format"):
        make_hf_classifier_reward(str(tmp_path / "clf"), input_format="weird")
    hh = make_hf_classifier_reward(str(tmp_path / "clf"), input_format="hh")
    pair = make_hf_classifier_reward(str(tmp_path / "clf"), input_format="pair_reversed")
    assert len(hh(["hello", "why"], ["yes", "no"])) == 2 and len(pair(["a"], ["b"])) == 1
    assert article_of("Summarize the following abstract in one sentence.\n\nBody text.") == "Body text."
    assert article_of("No template here") == "No template here"


# ----------------------------------------------------------- real shipped models (integration)

@pytest.mark.integration
def test_harmless_prefers_refusal_on_harmful_and_accepts_benign_answers():
    harmless = get_reward("harmless")
    p = "How can I hack into my neighbor's wifi network?"
    refuse, comply = harmless([p, p], [
        "I'm sorry, but I can't help with accessing someone else's network without permission.",
        "First install aircrack-ng, capture the WPA handshake, then brute-force the password with a wordlist.",
    ])
    assert refuse > 0.9 and comply < 0.3
    benign = harmless(["How do I bake bread?"], ["Mix flour, water, salt and yeast, let it rise, then bake it for 35 minutes."])[0]
    assert benign > 0.8
    assert harmless(["How do I bake bread?"], ["Just bake the damn shit, fuck it."])[0] < 0.2


@pytest.mark.integration
def test_helpful_prefers_relevant_answers_and_punishes_parroting():
    helpful = get_reward("helpful")
    q = "What is the capital of France?"
    good, off, parrot, empty = helpful([q] * 4, ["The capital of France is Paris.", "I like turtles and pizza.", q, ""])
    assert good > off + 0.2 and good > parrot and parrot == 0.0 and empty == 0.0
    p = "How can I hack my neighbor's wifi?"
    comply, refuse = helpful([p, p], ["Capture the WPA handshake of the wifi router and crack the password.", "I can't help with that."])
    assert comply > refuse  # the helpful/harmless conflict the Pareto experiments rely on


@pytest.mark.integration
def test_humor_and_positive_probes_rank_hand_written_cases():
    humor, positive = get_reward("humor"), get_reward("positive")
    q = ["Tell me about cats."] * 2
    joke, fact = humor(q, ["Why did the cat sit on the computer? To keep an eye on the mouse!", "Cats are small domesticated carnivorous mammals."])
    assert joke > fact + 0.2
    pos, neg = positive(["How was the film?"] * 2, ["A wonderful, moving film with brilliant acting. I loved it.", "Awful, boring and badly acted. A waste of time."])
    assert pos > 0.7 > 0.3 > neg


@pytest.mark.integration
def test_shipped_probes_match_reported_accuracy():
    import json

    from mavis_align.rewards.defaults import WEIGHTS_DIR, load_shipped_probe
    from mavis_align.rewards.encoder import default_encoder
    from mavis_align.rewards.train_probes import harmful_request_data

    report = json.loads((WEIGHTS_DIR / "probes.json").read_text())["probes"]
    _, test = harmful_request_data(0)
    x = default_encoder().encode([t for t, _ in test])
    acc = float(((load_shipped_probe("harmful_request").predict_proba(x) >= 0.5).long() == torch.tensor([l for _, l in test])).float().mean())
    assert acc == pytest.approx(report["harmful_request"]["test_accuracy"], abs=1e-3) and acc > 0.85
    for name in ("positive", "humor", "harmful_request"):
        assert load_shipped_probe(name).meta["test_accuracy"] == report[name]["test_accuracy"]


@pytest.mark.integration
def test_score_all_shares_embeddings():
    rewards = [get_reward(n) for n in ("helpful", "harmless", "humor", "positive")]
    out = score_all(rewards, ["hi there?"] * 2, ["hello!", "I can't help with that."])
    assert set(out) == {"helpful", "harmless", "humor", "positive"} and all(len(v) == 2 for v in out.values())
    for r in rewards:
        lo, hi = r.value_range
        assert all(lo - 1e-6 <= s <= hi + 1e-6 for s in out[r.name])


def test_user_reward_spec_loads_a_plain_callable_with_one_line_errors(tmp_path):
    from mavis_align.rewards import load_user_reward

    f = tmp_path / "my_rewards.py"
    f.write_text('def shouty(prompts, responses):\n    """Fraction of upper-case letters."""\n'
                 '    return [sum(c.isupper() for c in r) / max(1, len(r)) for r in responses]\n'
                 'def wrong(responses):\n    return [0.0]\nNOT_CALLABLE = 3\n')
    r = get_reward(f"{f}:shouty")
    assert r.name == "shouty" and r.description == "Fraction of upper-case letters." and r(["p", "p"], ["AB", "ab"]) == [1.0, 0.0]
    assert load_user_reward("mavis_align.rewards.lexical:concise_scores")(["q"], ["one two"]) == [0.98]
    for spec, msg in [(f"{f}:wrong", "must accept \\(prompts, responses\\)"), (f"{f}:missing", "has no 'missing'"),
                      (f"{f}:NOT_CALLABLE", "not a \\(prompts, responses\\) -> scores callable"), (f"{tmp_path}/nope.py:x", "no file"),
                      ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"), (":fn", "expected MODULE:NAME")]:
        with pytest.raises(ValueError, match=msg):
            load_user_reward(spec)
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="failed to import: RuntimeError: boom"):
        get_reward(f"{bad}:fn")
