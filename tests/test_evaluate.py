"""Evaluation harness: metrics on hand-built cases, KL of a policy against itself, every baseline
end to end on tiny models, and a Pareto sweep that resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer, save_tiny_model
from mavis_align.evaluate import (
    BestOfN, DecoderPolicy, ModelPolicy, MODPolicy, distinct_n, evaluate_policy, hypervolume, pareto_front, perplexity,
    teacher_forced_logprobs, weight_grid,
)
from mavis_align.generation import SamplingConfig
from mavis_align.rewards import get_rewards

PROMPTS = ["hello world", "the cat sat on the mat", "why is a dog good ?", "what"]


def test_distinct_n_and_perplexity():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "c d"], 2) == 1.0
    assert distinct_n([""], 1) == 0.0
    assert perplexity([[math.log(0.5)] * 4]) == pytest.approx(2.0)
    assert math.isnan(perplexity([[]]))


def test_hypervolume_and_front():
    assert hypervolume([(1, 2), (2, 1)], (0, 0)) == pytest.approx(3.0)
    assert hypervolume([(1, 2), (2, 1), (0.5, 0.5)], (0, 0)) == pytest.approx(3.0)  # dominated point adds nothing
    assert hypervolume([(1, 1, 1)], (0, 0, 0)) == pytest.approx(1.0)
    assert hypervolume([(2, 1, 1), (1, 2, 1), (1, 1, 2)], (0, 0, 0)) == pytest.approx(4.0)
    assert hypervolume([(-1, 5)], (0, 0)) == 0.0
    assert pareto_front([(1, 2), (2, 1), (0.5, 0.5), (2, 1)]) == [0, 1, 3]
    assert weight_grid(2, 0.5) == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    g3 = weight_grid(3, 0.5)
    assert len(g3) == 6 and all(abs(sum(x) - 1) < 1e-9 for x in g3)


@pytest.fixture(scope="module")
def tiny():
    tok = make_tiny_tokenizer()
    return make_tiny_lm(len(tok), seed=3), tok


def test_kl_of_policy_against_itself_is_zero(tiny):
    from mavis_align.decoding.decoder import MavisDecoder

    model, tok = tiny
    pol = DecoderPolicy("ref", MavisDecoder(model, tok), SamplingConfig(max_new_tokens=6), chat=False)
    res = evaluate_policy(pol, PROMPTS, get_rewards(["concise"]), model, tok, samples=2, chat=False)
    assert res["kl"]["mean"] == pytest.approx(0.0, abs=1e-4) and res["kl"]["n"] == 8
    assert res["fluency_ppl_ref"] > 1 and 0 <= res["distinct_1"] <= 1 and res["tokens_per_s"] > 0
    # a different model sampled against the same pi_ref: positive KL on average
    other = ModelPolicy("other", make_tiny_lm(len(tok), seed=9), tok, SamplingConfig(max_new_tokens=6), chat=False)
    assert evaluate_policy(other, PROMPTS * 4, get_rewards(["concise"]), model, tok, samples=2, chat=False)["kl"]["mean"] > 0


def test_kl_steps_reported_only_where_they_are_the_kl_to_pi_ref(tiny):
    """kl_steps (sums of recorded step KLs) estimate the same KL as eq. 7 for MAVIS sampling from pi_ref;
    a policy on another model, a beam search and a best-of-N selection get none (their step KLs, if any,
    are not to pi_ref or not of the returned sequence)."""
    from mavis_align.decoding.decoder import MavisDecoder
    from test_decoding import make_value_model

    model, tok = tiny
    dec = MavisDecoder(model, tok, [make_value_model(tok, ["v"], 1)])
    cfg = SamplingConfig(max_new_tokens=6, top_k=5, beta=4.0, normalize=False)
    mavis = DecoderPolicy("mavis", dec, cfg, weights={"v": 1.0}, chat=False, batch_size=64)
    res = evaluate_policy(mavis, PROMPTS * 50, get_rewards(["concise"]), model, tok, samples=1, chat=False)
    eq7, steps = res["kl"], res["kl_steps"]
    assert steps["n"] == eq7["n"] == 200 and steps["mean"] > 0.1
    assert abs(steps["mean"] - eq7["mean"]) < 3 * (eq7["se"] ** 2 + steps["se"] ** 2) ** 0.5
    assert steps["std"] < eq7["std"]
    ref = evaluate_policy(DecoderPolicy("ref", MavisDecoder(model, tok), SamplingConfig(max_new_tokens=6), chat=False), PROMPTS, [], model, tok, samples=1, chat=False)
    assert ref["kl_steps"]["mean"] == pytest.approx(0.0, abs=1e-5)
    other = ModelPolicy("other", make_tiny_lm(len(tok), seed=9), tok, SamplingConfig(max_new_tokens=6), chat=False)
    assert "kl_steps" not in evaluate_policy(other, PROMPTS, [], model, tok, samples=1, chat=False)
    beam = DecoderPolicy("beam", dec, cfg, weights={"v": 1.0}, chat=False, beam=2)
    assert "kl_steps" not in evaluate_policy(beam, PROMPTS, [], model, tok, samples=1, chat=False)
    bon = BestOfN("bon", mavis, 2, lambda ps, ts: [-len(t) for t in ts])
    assert "kl_steps" not in evaluate_policy(bon, PROMPTS, [], model, tok, samples=1, chat=False)
    system = ModelPolicy("sys", model, tok, SamplingConfig(max_new_tokens=6), chat=False, system="be brief")
    assert system.step_kl_base is None


def test_weightings_decoded_together_equal_each_alone(tiny):
    """evaluate_weightings decodes every weighting in one batch with per-row λ, each weighting's row i
    drawing from row_generator(seed, i): the same responses, rewards and KLs as evaluate_policy of
    each weighting alone (tiny fp32 model), so weightings keep sharing their random draws."""
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.evaluate import evaluate_weightings
    from test_decoding import make_value_model

    model, tok = tiny
    dec = MavisDecoder(model, tok, [make_value_model(tok, ["a"], 1), make_value_model(tok, ["b"], 2)])
    cfg = SamplingConfig(max_new_tokens=6, top_k=5, beta=4.0, normalize=False)
    weightings = [("a", {"a": 1.0}), ("b", {"b": 1.0}), ("a+b", {"a": 0.5, "b": 0.5})]
    rewards = get_rewards(["concise"])
    joint = evaluate_weightings(dec, cfg, weightings, PROMPTS, rewards, model, tok, samples=2, seed=3, chat=False, keep_examples=100, batch_size=5)
    assert list(joint) == ["a", "b", "a+b"]
    for label, w in weightings:
        alone = evaluate_policy(DecoderPolicy(label, dec, cfg, weights=w, chat=False), PROMPTS, rewards, model, tok, samples=2, seed=3, chat=False,
                                keep_examples=100)
        assert joint[label]["responses"] == alone["responses"] and joint[label]["decoded_with"] == ["a", "b", "a+b"]
        assert joint[label]["rewards"]["concise"]["values"] == pytest.approx(alone["rewards"]["concise"]["values"])
        assert joint[label]["kl"]["mean"] == pytest.approx(alone["kl"]["mean"], abs=1e-4)
        assert joint[label]["kl_steps"]["mean"] == pytest.approx(alone["kl_steps"]["mean"], abs=1e-4)
    assert joint["a"]["responses"] != joint["b"]["responses"]
    with pytest.raises(ValueError, match="unique"):
        evaluate_weightings(dec, cfg, [("a", {"a": 1.0}), ("a", {"b": 1.0})], PROMPTS, rewards, model, tok, chat=False)


def test_teacher_forcing_matches_recorded_ref_logprobs(tiny):
    from mavis_align.decoding.decoder import MavisDecoder
    from mavis_align.models import format_prompts
    from test_decoding import make_value_model

    model, tok = tiny
    dec = MavisDecoder(model, tok, [make_value_model(tok, ["v"], 1)])
    gens = dec.generate(PROMPTS, weights={"v": 1}, config=SamplingConfig(max_new_tokens=5, top_k=4, beta=3.0), chat=False)
    forced = teacher_forced_logprobs(model, tok, format_prompts(tok, PROMPTS, chat=False), [g.token_ids for g in gens])
    for g, lp in zip(gens, forced):
        assert lp == pytest.approx(g.logprobs_ref, abs=1e-4)


def test_mod_and_best_of_n(tiny):
    model, tok = tiny
    other = make_tiny_lm(len(tok), seed=9)
    cfg = SamplingConfig(max_new_tokens=5)
    only_first = MODPolicy("mod", [model, other], tok, [1.0, 0.0], cfg, chat=False).generate(PROMPTS, seed=4)
    plain = ModelPolicy("m", model, tok, cfg, chat=False).generate(PROMPTS, seed=4)
    assert [g.token_ids for g in only_first] == [g.token_ids for g in plain]  # lambda = (1, 0) is model 1
    mixed = MODPolicy("mod", [model, other], tok, [0.5, 0.5], cfg, chat=False).generate(PROMPTS, seed=4)
    from mavis_align.models import format_prompts

    fp = format_prompts(tok, PROMPTS, chat=False)
    lp1 = teacher_forced_logprobs(model, tok, fp, [g.token_ids for g in mixed])
    lp2 = teacher_forced_logprobs(other, tok, fp, [g.token_ids for g in mixed])
    for g, a, b in zip(mixed, lp1, lp2):
        # geometric mixture: log pi_MOD = (log pi_1 + log pi_2) / 2 - log Z with Z <= 1, so it sits at or above the mean
        assert all(x >= (u + v) / 2 - 1e-5 for x, u, v in zip(g.logprobs_gen, a, b))
        assert max(abs(x - u) for x, u in zip(g.logprobs_gen, a)) > 1e-4
    bon = BestOfN("bon", ModelPolicy("m", model, tok, cfg, chat=False), 4, lambda ps, ts: [-len(t) for t in ts])
    best = bon.generate(PROMPTS, seed=0)
    for g in best:
        assert -len(g.text) == max(g.extras["best_of_n_scores"])
    assert bon.kl_bound == pytest.approx(math.log(4) - 3 / 4)


def test_sweep_with_every_baseline_resumes(tmp_path):
    from mavis_align.baselines import RLConfig, soup, train_rl_policy
    from mavis_align.evaluate import SweepSpec, run_sweep
    from test_decoding import make_value_model

    tok = make_tiny_tokenizer()
    d = tmp_path / "m"
    save_tiny_model(d)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 10))
    rl = RLConfig(steps=2, prompts_per_step=2, num_generations=2, max_completion_length=5)
    train_p = PROMPTS * 2
    pa = train_rl_policy(str(d), train_p, {"concise": 1.0}, tmp_path / "rl-a", rl, chat=False, progress=False)
    pb = train_rl_policy(str(d), train_p, {"positive": 1.0}, tmp_path / "rl-b", rl, chat=False, progress=False)
    pm = train_rl_policy(str(d), train_p, {"concise": 0.5, "positive": 0.5}, tmp_path / "rl-m", rl, chat=False, progress=False)
    from mavis_align.baselines import train_conditioned_policy

    pc = train_conditioned_policy(str(d), train_p, ["concise", "positive"], tmp_path / "rl-c", rl, grid_step=0.5, chat=False, progress=False)
    from mavis_align.baselines import train_decorrelated_adapter

    pv = train_decorrelated_adapter(str(d), train_p, {"positive": 1.0}, tmp_path / "rl-v", rl, against=[pa], chat=False, progress=False)
    from mavis_align.baselines import MultiHeadConfig, train_multihead_policy

    ph = train_multihead_policy(str(d), train_p, ["concise", "positive"], tmp_path / "mh", MultiHeadConfig(max_new_tokens=5, epochs=1, min_margin=0.0,
                                head_rank=4, lora_rank=4), chat=False, progress=False)
    log = json.loads((pa / "log_history.json").read_text())
    assert log and all("kl" in h for h in log if "reward" in h)
    # a soup at lambda = (1, 0) is policy a
    from mavis_align.baselines import load_policy_model

    sa, _ = soup([pa, pb], [1.0, 0.0])
    ma, _ = load_policy_model(pa)
    for k, v in ma.state_dict().items():
        torch.testing.assert_close(sa.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    make_value_model(tok, ["concise"], 1).save(tmp_path / "va")
    make_value_model(tok, ["positive"], 2).save(tmp_path / "vb")
    from mavis_align.values import ValueModel, tiny_llama_backbone, tokenizer_fingerprint

    ValueModel(tiny_llama_backbone(len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=3), ["concise", "positive"], tokenizer_fingerprint(tok),
               head_hidden=8, conditioned=True).save(tmp_path / "vc")
    spec = SweepSpec(model=str(d), objectives=["concise", "positive"], values={"concise": str(tmp_path / "va"), "positive": str(tmp_path / "vb")},
                     policies={"concise": str(pa), "positive": str(pb)}, morlhf={"0.5": str(pm)}, conditioned=str(tmp_path / "vc"),
                     moodpo=str(pc), mva={"concise": str(pa), "positive": str(pv)}, extrapolate=0.5, mahalo=str(ph),
                     methods=["ref", "mavis", "mavis-beam", "mavis-step", "mavis-conditioned", "moodpo", "mva", "mahalo", "mahalo-step", "rsoup", "mod", "morlhf", "bon-ref"], grid_step=0.5, beta=2.0, n=2,
                     step_chunk=2, step_candidates=2,
                     dataset=str(data), split="test", prompts=2, samples=1, max_new_tokens=4, top_k=4, chat=False)
    out = tmp_path / "sweep"
    summary = run_sweep(spec, out, progress=False)
    assert set(summary["methods"]) == {"ref", "mavis", "mavis-beam", "mavis-step", "mavis-conditioned", "moodpo", "mva", "mahalo", "mahalo-step",
                                       "rsoup", "mod", "morlhf", "bon-ref"}
    assert sorted(tuple(p["lambda"]) for p in summary["methods"]["mva"]["points"]) == [(-0.5, 1.5), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (1.5, -0.5)]
    step_point = json.loads((out / "points" / "mavis-step@1-0.json").read_text())
    assert "step-level" in step_point["kl_note"] and step_point["kl"]["mean"] >= (math.log(2) - 0.5) - 1e-6
    assert len(summary["methods"]["mavis-conditioned"]["points"]) == 3 and len(summary["methods"]["moodpo"]["points"]) == 3
    # a pairwise judge (the tiny model, local) added afterwards: every point judged against ref, no point re-evaluated
    stamps = {p.name: json.loads(p.read_text())["seconds"] for p in (out / "points").glob("*.json")}
    run_sweep(SweepSpec(**{**spec.__dict__, "judge": str(d), "criteria": ["helpful", "balanced"]}), out, progress=False)
    for p in (out / "points").glob("*.json"):
        rec = json.loads(p.read_text())
        assert rec["seconds"] == stamps[p.name]
        if rec["method"] != "ref":
            assert [w["criterion"] for w in rec["judge"]["win_rates"]] == ["helpful", "balanced"]
            for w in rec["judge"]["win_rates"]:
                assert w["judgments"] == 2 * len(rec["responses"]) and w["win"] + w["loss"] + w["tie"] == pytest.approx(1.0), (p.name, w)
    assert "| mavis | 1/0 | helpful |" in (out / "judge.md").read_text()
    with pytest.raises(ValueError, match="judge_against"):
        SweepSpec(**{**spec.__dict__, "judge": str(d), "judge_against": "nosuch"})
    assert len(summary["methods"]["mavis"]["points"]) == 3 and len(summary["methods"]["morlhf"]["points"]) == 1
    for ext in ("png", "svg"):
        assert (out / f"front.{ext}").stat().st_size > 0 and (out / f"reward_kl.{ext}").stat().st_size > 0
    assert "hypervolume" in (out / "fronts.md").read_text()
    # every method at matched KL, paired over the same prompts (issue 30)
    matched = json.loads((out / "matched_kl.json").read_text())
    assert matched["kl_per_response"] and set(matched["lambdas"]) == {"0/1", "0.5/0.5", "1/0"}
    assert {"mavis", "rsoup", "bon-ref"} <= set(matched["lambdas"]["0.5/0.5"]["methods"]) and matched["cost"]["bon-ref"]["reward_calls_per_response"] == 2
    assert "At matched KL" in (out / "fronts.md").read_text() and "within a KL budget" in (out / "fronts.md").read_text()
    points = sorted((out / "points").glob("*.json"))
    stamps = {p.name: p.stat().st_mtime_ns for p in points}
    victim = out / "points" / "mod@0.5-0.5.json"
    victim.unlink()
    run_sweep(spec, out, progress=False)
    assert victim.exists()
    for p in points:
        if p != victim:
            assert p.stat().st_mtime_ns == stamps[p.name]  # finished points were not recomputed
    # another MAVIS beta: only the MAVIS points are stale and measured again (best-of-N steps do not read beta)
    stamps = {p.name: p.stat().st_mtime_ns for p in sorted((out / "points").glob("*.json"))}
    run_sweep(SweepSpec(**{**spec.__dict__, "beta": 3.0}), out, progress=False)
    for name, t in stamps.items():
        now = (out / "points" / name).stat().st_mtime_ns
        assert (now != t) == (name.startswith("mavis") and not name.startswith("mavis-step")), name
    assert json.loads((out / "sweep.json").read_text())["beta"] == 3.0
    with pytest.raises(ValueError, match="needs `values`"):
        SweepSpec(objectives=["a", "b"], methods=["mavis"])
    with pytest.raises(ValueError, match="needs `conditioned`"):
        SweepSpec(objectives=["a", "b"], methods=["mavis-conditioned"])
    with pytest.raises(ValueError, match="must be a preference-conditioned policy"):  # a plain policy is refused by name
        run_sweep(SweepSpec(**{**spec.__dict__, "moodpo": str(pa), "methods": ["moodpo"]}), tmp_path / "sweep2", progress=False)


def test_weighted_reward_normalises_and_validates():
    from mavis_align.rewards import Reward, weighted_reward

    a = Reward("a", "", (0, 1), True, lambda ps, rs: [1.0] * len(rs))
    b = Reward("b", "", (0, 1), True, lambda ps, rs: [float(len(r)) for r in rs])
    fn = weighted_reward([a, b], {"a": 3, "b": 1})
    assert fn(["p", "q"], ["xy", ""]) == pytest.approx([0.75 + 0.5, 0.75])
    with pytest.raises(ValueError, match="no reward named"):
        weighted_reward([a], {"c": 1})
    with pytest.raises(ValueError, match=">= 0"):
        weighted_reward([a], {"a": 0})


def test_sweep_settings_added_later_keep_old_points_and_normalize_is_mavis_only(tmp_path):
    from mavis_align.evaluate.pareto import SweepSpec, drop_stale_points

    spec = SweepSpec(objectives=["a", "b"], methods=["ref", "mavis"], values={"a": "x", "b": "y"})
    (tmp_path / "points").mkdir()
    old = {k: v for k, v in json.loads(json.dumps(spec.__dict__, default=str)).items() if k not in ("normalize", "device", "dtype")}
    (tmp_path / "sweep.json").write_text(json.dumps(old))  # written before these settings existed
    for name in ("ref@ref.json", "mavis@1-0.json", "moodpo@1-0.json"):
        (tmp_path / "points" / name).write_text("{}")
    drop_stale_points(tmp_path, spec)
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == ["mavis@1-0.json", "moodpo@1-0.json", "ref@ref.json"]
    drop_stale_points(tmp_path, SweepSpec(**{**spec.__dict__, "normalize": False}))  # the v3 tilt: only MAVIS points are stale
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == ["moodpo@1-0.json", "ref@ref.json"]
    # adding methods (the study's new comparisons) keeps every measured point; a new policy only stales its own
    grown = SweepSpec(**{**spec.__dict__, "normalize": False, "moodpo": "p", "methods": ["ref", "mavis", "moodpo"]})
    drop_stale_points(tmp_path, grown)
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == ["ref@ref.json"]
    (tmp_path / "points" / "moodpo@1-0.json").write_text("{}")
    drop_stale_points(tmp_path, SweepSpec(**{**grown.__dict__, "methods": ["ref", "mavis", "moodpo", "bon-ref"]}))
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == ["moodpo@1-0.json", "ref@ref.json"]


def test_step_level_points_go_stale_with_beta_only_when_they_draw_by_the_tilt(tmp_path):
    from mavis_align.evaluate.pareto import SweepSpec, drop_stale_points, stale_methods

    spec = SweepSpec(objectives=["a", "b"], methods=["ref", "mavis", "mavis-step", "mahalo-step"], values={"a": "x", "b": "y"}, mahalo="h")
    assert stale_methods({"beta"}, spec) == {"mavis", "mavis-beam", "mavis-conditioned"}  # best-of-N steps ignore beta
    assert stale_methods({"beta"}, SweepSpec(**{**spec.__dict__, "step_select": "tilt"})) >= {"mavis-step", "mahalo-step"}
    assert {"mavis-step", "mahalo-step"} <= stale_methods({"values"}, spec)  # the step methods' process rewards are the value models
    assert stale_methods({"dataset"}, spec) is None
    (tmp_path / "points").mkdir()
    drop_stale_points(tmp_path, spec)
    for name in ("ref@ref.json", "mavis@1-0.json", "mavis-step@1-0.json", "mahalo-step@1-0.json"):
        (tmp_path / "points" / name).write_text("{}")
    drop_stale_points(tmp_path, SweepSpec(**{**spec.__dict__, "beta": 2.0}))
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == ["mahalo-step@1-0.json", "mavis-step@1-0.json", "ref@ref.json"]
    drop_stale_points(tmp_path, SweepSpec(**{**spec.__dict__, "beta": 2.0, "values": {"a": "x2", "b": "y"}}))
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == ["ref@ref.json"]
