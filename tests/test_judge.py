"""Pairwise judge win rates: both orders, ties in the denominator, position bias cancelled; an
OpenAI-compatible judge served locally by `mavis-align serve`'s app; `evaluate --judge`."""

from __future__ import annotations

import json

import pytest
import torch

from mavis_align.cli import main
from mavis_align.evaluate.judge import CRITERIA, OpenAIJudge, judge_prompt, parse_verdict, win_rate


@pytest.mark.parametrize("answer, verdict", [("1", "1"), ("2.", "2"), ("**1**", "1"), ("Tie", "tie"), (" tie - both fine", "tie"),
                                             ("12", None), ("Response 1", None), ("", None), ("3", None)])
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


def _first_and_second(ask: str) -> tuple[str, str]:
    first = ask.split("Response 1:\n", 1)[1].split("\n\nResponse 2:\n", 1)[0]
    second = ask.split("Response 2:\n", 1)[1].split("\n\n", 1)[0]
    return first, second


def test_win_rate_counts_both_orders_and_ties():
    prompts, a, b = ["p1", "p2", "p3", "p4"], ["long answer here", "x", "same", "long one too"], ["short", "longer answer", "same", "s"]

    def longer(asks):  # an unbiased judge: the longer response wins, equal lengths tie
        out = []
        for ask in asks:
            f, s = _first_and_second(ask)
            out.append("1" if len(f) > len(s) else "2" if len(s) > len(f) else "tie")
        return out

    r = win_rate(longer, prompts, a, b, "helpful")
    assert (r["win"], r["loss"], r["tie"], r["judgments"], r["consistency"]) == (0.5, 0.25, 0.25, 8, 1.0)
    biased = win_rate(lambda asks: ["1"] * len(asks), prompts, a, b, "harmless")  # always the first position
    assert (biased["win"], biased["loss"], biased["consistency"]) == (0.5, 0.5, 0.0)  # both orders cancel it
    junk = win_rate(lambda asks: ["I cannot say"] * len(asks), prompts, a, b, "balanced")
    assert (junk["tie"], junk["invalid"]) == (1.0, 8)
    assert all(CRITERIA[c] in judge_prompt(c, "p", "x", "y") for c in CRITERIA)
    with pytest.raises(ValueError, match="unknown criterion"):
        judge_prompt("funny", "p", "a", "b")
    with pytest.raises(ValueError, match="answers for"):
        win_rate(lambda asks: ["1"], prompts, a, b, "helpful")


def test_openai_compatible_judge_served_locally(tiny_tokenizer):
    """A tiny model whose every greedy token is 'cat' or 'tie', behind the project's own OpenAI-compatible server."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tiny_lm, serving
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.serve import create_app

    vocab = {"<eos>": 0, "<pad>": 1, "<bos>": 2, "<unk>": 3, "1": 4, "2": 5, "tie": 6, "cat": 7}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
    tok.padding_side = "left"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    lm = make_tiny_lm(len(vocab), seed=1)
    head = torch.nn.Linear(lm.config.hidden_size, len(vocab), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[vocab["tie"]] = 10.0  # greedy: always "tie"
    lm.lm_head = head
    app = create_app(MavisDecoder(lm, tok), model_name="judge")
    try:
        with serving(app) as url:
            judge = OpenAIJudge(f"{url}/v1", "judge", max_tokens=2)
            r = win_rate(judge, ["cat ?", "1 2"], ["cat", "1"], ["2", "cat cat"], "balanced")
            assert (r["tie"], r["invalid"], r["judgments"], r["consistency"]) == (1.0, 0, 4, 1.0)
    finally:
        app.state.scheduler.shutdown()


def test_evaluate_judge_cli_against_an_earlier_run(tmp_path, tiny_lm, tiny_tokenizer, capsys):
    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a} {b}"}) + "\n" for a in ["hello", "the", "cat", "dog"] for b in ["world", "mat", "sat", "ran"]))
    common = ["--model", str(tmp_path / "m"), "--dataset", str(data), "--split", "train", "--samples", "2", "--max-new-tokens", "3", "--no-chat", "--reward", "concise"]
    base = [*common, "--limit", "2"]
    ref = tmp_path / "ref.json"
    assert main(["evaluate", "--method", "ref", *base, "--output", str(ref)]) == 0
    assert len(json.loads(ref.read_text())["responses"]) == 4
    out = tmp_path / "other.json"
    assert main(["evaluate", "--method", "ref", *base, "--seed", "5", "--judge", str(tmp_path / "m"), "--judge-against", str(ref),
                 "--criteria", "helpful,harmless", "--output", str(out)]) == 0
    judged = json.loads(out.read_text())["judge"]
    assert judged["against"] == "ref" and [w["criterion"] for w in judged["win_rates"]] == ["helpful", "harmless"]
    assert all(w["judgments"] == 8 and w["win"] + w["loss"] + w["tie"] == pytest.approx(1.0) for w in judged["win_rates"])
    capsys.readouterr()
    assert main(["evaluate", "--method", "ref", *base, "--judge", str(tmp_path / "m"), "--judge-against", str(ref), "--criteria", "funny"]) == 2
    assert "--criteria: unknown ['funny']" in capsys.readouterr().err
    assert main(["evaluate", "--method", "ref", *common, "--limit", "3", "--judge", str(tmp_path / "m"), "--judge-against", str(ref)]) == 2
    assert "answered other prompts" in capsys.readouterr().err
