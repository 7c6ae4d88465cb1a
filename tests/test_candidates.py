"""The candidate-level value benchmark (evaluate.candidates): its statistics on hand-built states, and
collection + scoring end to end on a tiny random model (resumable)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import save_tiny_model
from mavis_align.evaluate.candidates import (
    CandidateBenchConfig, CandidateState, candidate_metrics, collect_candidates, random_effects, read_candidates, score_benchmark, value_of_candidates,
)


def _state(true_means, n, noise, rng, key="s"):
    k = len(true_means)
    x = np.asarray(true_means)[:, None] + noise * rng.standard_normal((k, n))
    return CandidateState(key, "p", "helpful", 0, 3, np.arange(5), np.arange(k)[:, None], np.zeros(k), x[:, :, None].astype(np.float32), 0.9)


def test_random_effects_recovers_the_between_candidate_spread():
    rng = np.random.default_rng(0)
    means = np.linspace(0, 1, 8)
    sd, p = random_effects(means[:, None] + 0.1 * rng.standard_normal((8, 64)), rng)
    assert sd == pytest.approx(means.std(ddof=1), rel=0.1) and p < 0.01
    sd, p = random_effects(0.1 * rng.standard_normal((8, 64)), rng)
    assert sd < 0.02 and p > 0.01
    assert random_effects(np.ones((4, 4)), rng) == (0.0, 1.0)


def test_candidate_metrics_score_orderings_against_the_rollout_means():
    rng = np.random.default_rng(1)
    states = [_state([0.0, 0.3, 0.6, 0.9], 16, 0.05, rng, key=f"s{i}") for i in range(6)]
    right = [np.array([[0.0], [1.0], [2.0], [3.0]]) for _ in states]
    wrong = [-v for v in right]
    m = candidate_metrics(states, right, ["h"])["h"]
    assert m["resolved"]["concordance"] == 1.0 and m["resolved"]["pairs"] == 36 and m["spearman"] == pytest.approx(1.0)
    assert m["half_vs_half"]["concordance"] == 1.0 and m["states_with_signal"] == 1.0
    assert candidate_metrics(states, wrong, ["h"])["h"]["resolved"]["concordance"] == 0.0
    ties = [np.zeros((4, 1)) for _ in states]
    assert candidate_metrics(states, ties, ["h"])["h"]["all_pairs"]["concordance"] == 0.5
    # no signal: nothing resolves, split halves at chance, and the values' spread is reported all the same
    flat = [_state([0.5] * 4, 16, 0.05, rng, key=f"f{i}") for i in range(40)]
    f = candidate_metrics(flat, [rng.standard_normal((4, 1)) for _ in flat], ["h"])["h"]
    assert f["resolved_pairs"] <= 12 and abs(f["half_vs_half"]["concordance"] - 0.5) < 0.12 and f["value_sd_median"] > 0.3
    assert f["half_vs_half"]["se"] > 0 and f["states_with_signal"] < 0.2
    only = candidate_metrics(states, None, ["h"])["h"]
    assert "resolved" not in only and only["half_vs_half"]["concordance"] == 1.0


def test_bench_config_rejects_what_it_cannot_measure():
    with pytest.raises(ValueError, match="k must be >= 2"):
        CandidateBenchConfig(k=1)
    with pytest.raises(ValueError, match="rollouts must be >= 2"):
        CandidateBenchConfig(rollouts=1)
    with pytest.raises(ValueError, match="positions"):
        CandidateBenchConfig(positions=[40], max_new_tokens=40)


def test_collect_and_score_on_a_tiny_model_resumes(tmp_path, monkeypatch):
    from test_decoding import make_value_model

    model_dir = save_tiny_model(tmp_path / "lm")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello world", "the cat sat", "why is a dog good", "what is the mat"]))
    cfg = CandidateBenchConfig(model=str(model_dir), objectives=["concise"], dataset=str(prompts), split="test", prompts=2, positions=[0, 2],
                               k=3, rollouts=4, max_new_tokens=6, chat=False)
    out = tmp_path / "bench"
    collect_candidates(cfg, out, progress=False)
    objectives, states = read_candidates(out)
    assert objectives == ["concise"] and 1 <= len(states) <= 4
    for s in states:
        assert s.rewards.shape == (3, 4, 1) and s.candidates.shape == (3, 1) and 0 < s.top_k_mass <= 1 + 1e-6
        assert np.all(np.diff(s.ref_logp) <= 1e-6)  # top-k in pi_ref order
    from mavis_align.collect import builder

    with monkeypatch.context() as mp:  # finished: a rerun decodes nothing
        mp.setattr(builder.GenPolicy, "extend", lambda *a, **k: pytest.fail("a finished state was decoded again"))
        collect_candidates(cfg, out, progress=False)
    assert read_candidates(out)[1][0].rewards.tolist() == states[0].rewards.tolist()
    with pytest.raises(ValueError, match="other settings"):
        collect_candidates(CandidateBenchConfig(**{**cfg.__dict__, "k": 4}), out, progress=False)
    # the values of every candidate, batched, equal one row scored alone
    from mavis_align.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    vm = make_value_model(tok, ["concise"], 5)
    vals = value_of_candidates(vm, states, ["concise"], batch_size=2)
    s = states[-1]
    ids = torch.tensor([list(s.state_ids) + [int(s.candidates[1, 0])]])
    with torch.no_grad():
        one = vm.score(ids, torch.ones_like(ids), prompt_lengths=torch.tensor([s.prompt_len]))
    assert vals[-1][1, 0] == pytest.approx(float(one[0, 0]), abs=1e-5)
    folder = tmp_path / "vm"
    vm.save(folder)
    summary = score_benchmark(out, str(folder))
    assert set(summary["metrics"]) == {"concise"} and (out / f"scores-{str(folder).replace('/', '-').strip('-.')}.md").exists()
    assert score_benchmark(out, None)["values"] == "none"
    other = make_value_model(tok, ["elsewhere"], 6)
    other.save(tmp_path / "vm2")
    with pytest.raises(ValueError, match="missing \\['concise'\\]"):
        score_benchmark(out, str(tmp_path / "vm2"))
    # several single-head models (one per objective, as policy iteration trains them): each objective from the one that has it
    two = score_benchmark(out, [str(tmp_path / "vm2"), str(folder)], write=False)
    assert json.dumps(two["metrics"]["concise"]) == json.dumps(summary["metrics"]["concise"])
