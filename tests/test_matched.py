"""Matched-KL comparison (issue 30): envelopes, interpolation without extrapolation, paired
bootstrap intervals and hypervolume at a KL budget, on hand-built numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mavis_align.evaluate.matched import Point, envelope, hypervolume_at_budget, matched_kl, per_prompt, point_of, reward_at


def test_envelope_is_the_nondecreasing_upper_concave_hull():
    # (2, 0.6) lies under the chord (1, 0.5)-(3, 1.0); (2.5, 0.4) is beaten by a cheaper point
    hull = envelope([0, 1, 2, 3, 2.5], [0.0, 0.5, 0.6, 1.0, 0.4])
    assert hull == [(0.0, 0.0), (1.0, 0.5), (3.0, 1.0)]
    at = reward_at(hull, [0.5, 2.0, 3.0, 3.5])
    assert at.tolist() == pytest.approx([0.25, 0.75, 1.0, 1.0])  # beyond the last point: its reward, never extrapolated
    assert math.isnan(reward_at(envelope([2.0, 4.0], [0.3, 0.5]), [1.0])[0])  # below a method's cheapest point, without pi_ref
    assert envelope([1.0, 1.0], [0.2, 0.3]) == [(1.0, 0.3)]


def test_per_prompt_and_point_of_an_evaluator_result():
    assert per_prompt([1, 3, 5, 7], 2).tolist() == [2.0, 6.0]
    with pytest.raises(ValueError, match="whole prompts"):
        per_prompt([1, 2, 3], 2)
    res = {"samples": 2, "rewards": {"a": {"values": [1, 3, 0, 0]}, "b": {"values": [0, 2, 4, 4]}},
           "kl": {"mean": 1.5, "values": [1, 1, 2, 2]}, "kl_best_of_n_bound": 0.5}
    p = point_of(res, ["a", "b"], weights=[0.5, 0.5])
    assert p.reward.tolist() == [1.5, 2.0] and p.kl.tolist() == [1.5, 2.5]
    old = point_of({**res, "kl": {"mean": 3.0}}, ["a", "b"])  # an older result: its mean KL for every prompt
    assert old.reward.shape == (2, 2) and old.kl.tolist() == [3.5, 3.5]


def _two_methods():
    rng = np.random.default_rng(0)
    p = 40
    ref = Point(rng.normal(0.3, 0.1, p), np.zeros(p), "ref")
    a = [Point(ref.reward + 0.1 * b + rng.normal(0, 0.05, p), np.full(p, 2.0 * b) + rng.normal(0, 0.2, p), f"a{b}") for b in (1, 2, 4)]
    b = [Point(ref.reward + 0.05 * k + rng.normal(0, 0.05, p), np.full(p, 1.0 * k) + rng.normal(0, 0.2, p), f"b{k}") for k in (1, 3, 6)]
    return ref, {"a": a, "b": b}


def test_matched_kl_estimates_intervals_and_paired_differences():
    ref, methods = _two_methods()
    out = matched_kl(methods, levels=[1.0, 4.0, 7.0, 100.0], anchor=ref, against="b", n_boot=400, seed=1)
    a_at = {r["kl"]: r for r in out["methods"]["a"]["at"]}
    # the estimate is the envelope of the full-data means
    means = [(0.0, float(ref.reward.mean()))] + [(float(p.kl.mean()), float(p.reward.mean())) for p in methods["a"]]
    want = reward_at(envelope(*zip(*means)), [4.0])[0]
    assert a_at[4.0]["reward"] == pytest.approx(want)
    assert a_at[4.0]["lo"] < a_at[4.0]["reward"] < a_at[4.0]["hi"]
    assert a_at[1.0]["mixture_with_ref"] and not a_at[4.0]["mixture_with_ref"]  # a's cheapest own point is at ~2 nats
    assert a_at[100.0]["plateau"] and a_at[100.0]["reward"] == pytest.approx(max(float(p.reward.mean()) for p in methods["a"]))
    assert a_at[4.0]["diff"] == pytest.approx(a_at[4.0]["reward"] - {r["kl"]: r for r in out["methods"]["b"]["at"]}[4.0]["reward"])
    assert a_at[4.0]["diff_lo"] <= a_at[4.0]["diff"] <= a_at[4.0]["diff_hi"]
    # a method against itself: every paired replicate differs by exactly 0
    same = matched_kl({"a": methods["a"], "a2": methods["a"]}, levels=[4.0], anchor=ref, against="a", n_boot=100)
    row = same["methods"]["a2"]["at"][0]
    assert row["diff"] == row["diff_lo"] == row["diff_hi"] == 0.0
    # reproducible with the seed
    assert matched_kl(methods, levels=[4.0], anchor=ref, n_boot=50, seed=3) == matched_kl(methods, levels=[4.0], anchor=ref, n_boot=50, seed=3)


def test_matched_kl_refuses_points_over_different_prompts():
    ref, methods = _two_methods()
    with pytest.raises(ValueError, match="same prompts"):
        matched_kl({"a": methods["a"], "c": [Point(np.zeros(5), np.zeros(5))]}, n_boot=10)
    with pytest.raises(ValueError, match="against"):
        matched_kl(methods, against="z", n_boot=10)


def test_hypervolume_at_budget_keeps_points_within_it():
    p = 30
    rng = np.random.default_rng(2)
    cheap = Point(np.stack([np.full(p, 0.5), np.full(p, 0.5)], 1) + rng.normal(0, 0.01, (p, 2)), np.full(p, 1.0))
    dear = Point(np.stack([np.full(p, 0.9), np.full(p, 0.9)], 1), np.full(p, 10.0))
    out = hypervolume_at_budget({"m": [cheap, dear]}, 5.0, [0.0, 0.0], n_boot=200)
    assert out["m"]["points_within"] == 1
    assert out["m"]["hypervolume"] == pytest.approx(float(np.prod(cheap.reward.mean(0))))
    assert out["m"]["lo"] <= out["m"]["hypervolume"] <= out["m"]["hi"]
    assert hypervolume_at_budget({"m": [cheap, dear]}, 20.0, [0.0, 0.0], n_boot=10)["m"]["hypervolume"] == pytest.approx(0.81)


def test_verdict_rules_at_matched_kl():
    from mavis_align.evaluate.matched import FAILS, HOLDS, MIXED, combine, verdict_front, verdict_single

    def table(diff, lo, hi, mixture):
        return {"methods": {"m": {"at": [{"kl": 2.0, "diff": diff, "diff_lo": lo, "diff_hi": hi, "mixture_with_ref": mixture}]}}}

    assert verdict_single(table(-0.1, -0.2, -0.01, False), "m", "rl", 2.0)["verdict"] == FAILS
    assert verdict_single(table(-0.05, -0.2, 0.05, False), "m", "rl", 2.0)["verdict"] == HOLDS  # tied, at its own point
    assert verdict_single(table(-0.05, -0.2, 0.05, True), "m", "rl", 2.0)["verdict"] == MIXED  # tied, but only mixed with pi_ref

    def summary(intervals):
        return {"lambdas": {f"l{i}": {"against": "mavis", "methods": {"mavis": {"at": []}, "r": {"at": [{"kl": 4.0, "diff": (lo + hi) / 2, "diff_lo": lo,
                                                                                                           "diff_hi": hi}]}}}
                            for i, (lo, hi) in enumerate(intervals)}}

    assert verdict_front(summary([(-0.2, -0.1), (-0.3, -0.01)]), "r")["verdict"] == HOLDS
    assert verdict_front(summary([(-0.2, -0.1), (-0.1, 0.05)]), "r")["verdict"] == MIXED
    assert verdict_front(summary([(-0.2, -0.1), (0.01, 0.2)]), "r")["verdict"] == FAILS
    assert verdict_front(summary([(-0.2, -0.1)]), "absent")["verdict"] == MIXED  # never compared: no verdict either way
    assert combine([HOLDS, HOLDS]) == HOLDS and combine([FAILS, FAILS]) == FAILS and combine([HOLDS, FAILS]) == MIXED


def test_t_quantile_matches_tables():
    from mavis_align.evaluate.summary import t_quantile

    for df, exact in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (11, 2.2010), (30, 2.0423), (1000, 1.9623)]:
        assert t_quantile(0.975, df) == pytest.approx(exact, abs=4e-3 if df == 3 else 5e-4)
    assert t_quantile(0.025, 11) == pytest.approx(-2.2010, abs=5e-4) and t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError):
        t_quantile(1.0, 5)


def test_single_objective_reads_the_independent_scorer_of_the_same_policies(tmp_path):
    import json

    from mavis_align.evaluate.matched_study import render_single, single_objective

    rng = np.random.default_rng(0)
    folder = tmp_path / "single" / "points"
    folder.mkdir(parents=True)

    def write(name, label, indep, kl):
        res = {"samples": 1, "kl": {"mean": kl, "values": list(rng.normal(kl, 0.1, 8))},
               "rewards": {"helpful": {"values": list(rng.normal(label, 0.05, 8))}, "helpful-pmi": {"values": list(rng.normal(indep, 0.05, 8))}}}
        (folder / f"{name}.json").write_text(json.dumps(res))

    # the labeller rises with beta, the independent scorer does not (what reward hacking looks like)
    write("ref", 0.3, 0.5, 0.0)
    write("rl-helpful", 0.4, 0.6, 2.0)
    write("iter0-helpful-beta0", 0.3, 0.5, 0.5)
    write("iter0-helpful-beta1", 0.5, 0.5, 2.0)
    write("iter0-helpful-beta5", 0.7, 0.5, 6.0)
    labels = single_objective(tmp_path, ["helpful", "harmless"], n_boot=200)
    indep = single_objective(tmp_path, ["helpful", "harmless"], n_boot=200, scored_by={"helpful": "helpful-pmi", "harmless": "harmless-lm"})
    assert set(labels) == set(indep) == {"helpful"} and indep["helpful"]["scored_by"] == "helpful-pmi"

    def at(table, kl):
        return next(r for r in table["methods"]["mavis (all iterations)"]["at"] if abs(r["kl"] - kl) < 1e-9)

    assert at(labels["helpful"], 4.0)["reward"] > 0.55 and at(indep["helpful"], 4.0)["reward"] < 0.55
    assert "scored by helpful-pmi" in "\n".join(render_single(indep, "## independent"))
    # points without the independent scorer's values (measured before it existed): left out, not an error
    assert single_objective(tmp_path, ["helpful"], n_boot=50, scored_by={"helpful": "humor-lexical"}) == {}
