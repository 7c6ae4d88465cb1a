import json

import pytest

from mavis_align import data
from mavis_align.data import Prompt, dedupe, filter_by_tokens, load_prompts, split_prompts


def _prompts(n, cat="helpful"):
    return [Prompt(f"question number {i} ?", cat, "t") for i in range(n)]


def test_dedupe_normalises_case_and_space():
    ps = [Prompt("Hello  there", "a", "s"), Prompt("hello there", "a", "s"), Prompt("other", "a", "s"), Prompt("  ", "a", "s")]
    assert [p.text for p in dedupe(ps)] == ["Hello  there", "other"]


def test_filter_by_tokens(tiny_tokenizer):
    ps = [Prompt("hello", "a", "s"), Prompt("hello world the cat", "a", "s")]
    assert [p.text for p in filter_by_tokens(ps, tiny_tokenizer, 2, 10)] == ["hello world the cat"]
    assert [p.text for p in filter_by_tokens(ps, tiny_tokenizer, 1, 1)] == ["hello"]


def test_split_is_seeded_disjoint_complete_and_stratified():
    ps = _prompts(100, "helpful") + _prompts(50, "harmful")
    parts = {s: split_prompts(ps, s, seed=1) for s in data.SPLITS}
    texts = [{(p.text, p.category) for p in parts[s]} for s in data.SPLITS]
    assert sum(len(t) for t in texts) == 150 and len(set.union(*texts)) == 150
    assert len([p for p in parts["train"] if p.category == "harmful"]) == 40
    assert split_prompts(ps, "test", seed=1) == parts["test"]
    # the held-out 10 % is test + final, cut in two in its seeded order: test's prompts stay what they were
    held = parts["test"] + parts["final"]
    assert len(parts["test"]) == len(parts["final"]) + (len(held) % 2) and {p.text for p in parts["test"]}.isdisjoint(p.text for p in parts["final"])
    assert split_prompts(ps, "test", seed=2) != parts["test"]
    balanced = split_prompts(ps, "train", seed=1, balance=True)
    assert sum(p.category == "helpful" for p in balanced) == sum(p.category == "harmful" for p in balanced) == 40
    with pytest.raises(ValueError, match="unknown split"):
        split_prompts(ps, "dev", seed=0)


def test_user_jsonl_and_csv(tmp_path, tiny_tokenizer):
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps({"question": f"what is the cat {i} ?"}) for i in range(20)))
    got = load_prompts(str(j), "train", tokenizer=tiny_tokenizer, field="question")
    assert len(got) == 16 and all(p.category == "user" for p in got)
    c = tmp_path / "p.csv"
    c.write_text("prompt,category\nhello world,helpful\nwhat is the dog ?,harmful\n")
    allp = sum((load_prompts(str(c), s, tokenizer=tiny_tokenizer) for s in data.SPLITS), [])
    assert sorted(p.category for p in allp) == ["harmful", "helpful"]
    with pytest.raises(ValueError, match="no 'prompt' field"):
        load_prompts(str(j), tokenizer=tiny_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompts(str(bad), tokenizer=tiny_tokenizer)


def test_unknown_dataset_lists_registered(tiny_tokenizer):
    with pytest.raises(ValueError) as info:
        load_prompts("nope", tokenizer=tiny_tokenizer)
    for name in data.DATASETS:
        assert name in str(info.value)


@pytest.mark.integration
def test_default_mix_is_balanced_filtered_and_split():
    from mavis_align.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    parts = {s: load_prompts("hh-mix", s, tokenizer=tok) for s in data.SPLITS}
    parts["held out"] = parts.pop("test") + parts.pop("final")
    for s, ps in parts.items():
        cats = {c: sum(p.category == c for p in ps) for c in ("helpful", "harmful")}
        assert cats["helpful"] == cats["harmful"] > 100, (s, cats)
    final = load_prompts("hh-mix", "final", tokenizer=tok)
    assert len(final) == 114 and min(sum(p.category == c for p in final) for c in ("helpful", "harmful")) > 40
    seen = [set(p.text for p in ps) for ps in parts.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert max(len(tok(p.text)["input_ids"]) for p in parts["train"]) <= 200
    sources = {p.source.split("/")[0] for p in parts["train"]}
    assert {"chitchat", "chatterbot", "mavis", "donotanswer", "harmbench"} <= sources
    summ = load_prompts("aclsum", "test", tokenizer=tok)
    assert summ and all(p.reference and p.text.startswith("Summarize") for p in summ)
