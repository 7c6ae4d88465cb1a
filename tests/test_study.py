"""The reproduction study: recipe validation, the paper-scale recipe, and every verdict rule on
hand-built evaluator results (no models)."""

from __future__ import annotations

import math

import pytest

from mavis_align import report
from mavis_align.data import hh_first_turn
from mavis_align.study import StudySpec, check_study, final_value_dir, load_study, matched_beta, point_name


def res(rewards: dict[str, tuple[float, float]], kl: float) -> dict:
    """An evaluator result: {objective: (mean, se)} and mean KL."""
    return {"rewards": {m: {"mean": r, "se": s} for m, (r, s) in rewards.items()}, "kl": {"mean": kl}}


# ------------------------------------------------------------------ recipes


def test_packaged_study_recipes_load_and_check():
    spec = load_study("reproduce-default")
    assert spec.recipe.objectives == ["helpful", "harmless", "humor"] and spec.pair == ["helpful", "harmless"]
    lines = check_study(spec)
    assert any("embedded" in l for l in lines)
    paper = load_study("reproduce-paper")
    assert paper.recipe.model == "meta-llama/Llama-2-7b-chat-hf" and paper.recipe.backbone == "TinyLlama/TinyLlama_v1.1"
    assert paper.recipe.dataset == "hh-rlhf" and paper.recipe.tree == {"num_layers": 5, "k_root": 4, "k": 2, "max_new_tokens": 128, "max_rows": 64}
    assert paper.rl_config.steps == 2000
    checked = "\n".join(check_study(paper))
    # resolved as hub names (not downloaded), paper rewards registered
    assert "meta-llama/Llama-2-7b-chat-hf -> hub id" in checked and "Ray2333/gpt2-large-helpful-reward_model" in checked


def test_study_recipe_errors_are_precise(tmp_path):
    with pytest.raises(ValueError, match="sweep.bogus: unknown key"):
        StudySpec(name="x", mavis={}, sweep={"bogus": 1})
    with pytest.raises(ValueError, match="`pair` must name two"):
        StudySpec(name="x", mavis={}, pair=["helpful", "concise"])
    with pytest.raises(ValueError, match="sweep.beta"):
        StudySpec(name="x", mavis={}, sweep={"beta": "big"})
    with pytest.raises(ValueError, match="unknown"):
        StudySpec(name="x", mavis={}, sweep={"methods": ["mavis", "ppo"]})
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\nmavis: {modle: foo}\n")
    with pytest.raises(ValueError, match="mavis.modle: unknown key"):
        load_study(bad)
    with pytest.raises(FileNotFoundError):
        load_study("no-such-study")
    unregistered = StudySpec(name="x", mavis={"objectives": ["helpful", "harmless", "nope"]})
    with pytest.raises(ValueError, match="not a registered reward"):
        check_study(unregistered)


def test_hh_first_turn_extracts_the_first_human_message():
    d = "\n\nHuman: How do I bake  bread?\n\nAssistant: Mix flour.\n\nHuman: thanks\n\nAssistant: ok"
    assert hh_first_turn(d) == "How do I bake bread?"
    with pytest.raises(ValueError, match="not an HH-RLHF dialogue"):
        hh_first_turn("no turns here")


def test_final_value_dir_picks_the_last_finished_iteration(tmp_path):
    for i in (0, 1):
        (tmp_path / f"iter{i}" / "helpful" / "value" / "best").mkdir(parents=True)
        (tmp_path / f"iter{i}" / "helpful" / "value" / "best" / "meta.json").write_text("{}")
    (tmp_path / "iter2" / "helpful" / "value").mkdir(parents=True)  # unfinished
    assert final_value_dir(tmp_path, "helpful") == (1, tmp_path / "iter1" / "helpful" / "value" / "best")
    with pytest.raises(FileNotFoundError):
        final_value_dir(tmp_path, "humor")


def test_matched_beta_picks_the_kl_closest_to_the_rl_policies():
    pts = {"rl-a": res({"a": (0, 0)}, 2.0), "rl-b": res({"b": (0, 0)}, 4.0)}  # mean RL KL 3
    for beta, kl in ((1.0, 1.0), (2.0, 2.5), (5.0, 9.0)):
        pts[point_name(1, "a", beta)] = res({"a": (0, 0)}, kl)
        pts[point_name(0, "b", beta)] = res({"b": (0, 0)}, kl + 1)
    # mean MAVIS KL: beta 1 -> 1.5, beta 2 -> 3.0, beta 5 -> 9.5
    assert matched_beta(pts, ["a", "b"], {"a": 1, "b": 0}, [1.0, 2.0, 5.0]) == 2.0
    pts[point_name(1, "a", 0.0)], pts[point_name(0, "b", 0.0)] = res({"a": (0, 0)}, 3.0), res({"b": (0, 0)}, 3.0)
    assert matched_beta(pts, ["a", "b"], {"a": 1, "b": 0}, [0.0, 1.0, 2.0, 5.0]) == 2.0  # beta 0 does not steer: never chosen


# ------------------------------------------------------------------ verdict rules


def test_reward_at_kl_interpolates_and_never_extrapolates():
    curve = [(0.0, 0.1, 0.01), (2.0, 0.5, 0.02), (4.0, 0.7, 0.03)]
    assert report.reward_at_kl(curve, 1.0) == pytest.approx((0.3, 0.02, True))
    assert report.reward_at_kl(curve, 3.0)[0] == pytest.approx(0.6)
    assert report.reward_at_kl(curve, 9.0) == (0.7, 0.03, False)


def single_points(rl_reward: float, mavis: dict[int, list[tuple[float, float]]]) -> dict:
    pts = {"ref": res({"h": (0.2, 0.01)}, 0.0), "rl-h": res({"h": (rl_reward, 0.01)}, 2.0)}
    for it, rows in mavis.items():
        for beta, (kl, r) in zip([1.0, 5.0], rows):
            pts[point_name(it, "h", beta)] = res({"h": (r, 0.01)}, kl)
    return pts


def test_claim_single_holds_when_mavis_reaches_rl_reward_at_its_kl():
    pts = single_points(0.40, {0: [(1.0, 0.35), (3.0, 0.55)]})  # at KL 2 MAVIS interpolates to 0.45
    c = report.claim_single(pts, ["h"], {"h": 0}, [1.0, 5.0])
    assert c["verdict"] == report.HOLDS and c["rows"][0]["mavis_at_rl_kl"] == pytest.approx(0.45)
    pts = single_points(0.60, {0: [(1.0, 0.35), (3.0, 0.55)]})
    assert report.claim_single(pts, ["h"], {"h": 0}, [1.0, 5.0])["verdict"] == report.FAILS


def test_claim_single_uses_the_upper_envelope_across_iterations():
    # iteration 1 is better at low KL; a worse high-KL point does not pull the envelope down
    pts = single_points(0.40, {0: [(1.0, 0.25), (6.0, 0.30)], 1: [(1.5, 0.45), (8.0, 0.20)]})
    c = report.claim_single(pts, ["h"], {"h": 1}, [1.0, 5.0])
    assert c["rows"][0]["mavis_at_rl_kl"] == pytest.approx(0.45) and c["verdict"] == report.HOLDS
    assert c["rows"][0]["best_mavis"]["reward"] == 0.45


def test_claim_iteration_compares_at_matched_kl():
    better = single_points(0.4, {0: [(2.0, 0.30), (6.0, 0.40)], 1: [(2.0, 0.40), (6.0, 0.50)]})
    assert report.claim_iteration(better, ["h"], {"h": 1}, [1.0, 5.0])["verdict"] == report.HOLDS
    # iteration 1 has higher reward at the same beta but only by paying more KL: not an improvement
    costly = single_points(0.4, {0: [(2.0, 0.30), (6.0, 0.45)], 1: [(6.0, 0.40), (7.0, 0.45)]})
    c = report.claim_iteration(costly, ["h"], {"h": 1}, [1.0, 5.0])
    assert c["verdict"] == report.FAILS and c["rows"][0]["same_beta"][0]["last"] > c["rows"][0]["same_beta"][0]["iter0"]
    only0 = single_points(0.4, {0: [(2.0, 0.30), (6.0, 0.45)]})
    assert report.claim_iteration(only0, ["h"], {"h": 0}, [1.0, 5.0])["verdict"] == report.FAILS


def test_claim_iteration_reports_the_rule_as_first_written_beside_the_widened_one():
    # iteration 1 improves, the final iteration 2 falls back below iteration 0: the widened rule ("any later
    # iteration") holds, the original ("the final iteration") does not
    pts = single_points(0.4, {0: [(2.0, 0.30), (6.0, 0.40)], 1: [(2.0, 0.40), (6.0, 0.50)], 2: [(2.0, 0.20), (6.0, 0.30)]})
    c = report.claim_iteration(pts, ["h"], {"h": 2}, [1.0, 5.0])
    assert c["verdict"] == report.HOLDS and c["verdict_final_iteration_rule"] == report.FAILS
    pts = single_points(0.4, {0: [(2.0, 0.30), (6.0, 0.40)], 1: [(2.0, 0.20), (6.0, 0.30)], 2: [(2.0, 0.40), (6.0, 0.50)]})
    c = report.claim_iteration(pts, ["h"], {"h": 2}, [1.0, 5.0])
    assert c["verdict"] == c["verdict_final_iteration_rule"] == report.HOLDS


def fronts(**methods) -> dict:
    """methods: name -> (hypervolume, [(lambda_1, r_a, r_b, kl)])"""
    return {"objectives": ["a", "b"], "methods": {m: {"hypervolume": hv, "points": [{"lambda": [l, 1 - l], "rewards": {"a": ra, "b": rb}, "kl": kl}
                                                                                     for l, ra, rb, kl in pts]} for m, (hv, pts) in methods.items()}}


def test_claim_fronts_needs_dominance_and_closeness_to_morlhf():
    f = fronts(mavis=(0.3, [(0.5, 0.6, 0.6, 5)]), rsoup=(0.2, []), mod=(0.1, []), morlhf=(0.1, [(0.5, 0.6, 0.61, 2)]))
    c = report.claim_fronts(f)
    assert c["verdict"] == report.HOLDS and c["morlhf"][0]["mavis"] == pytest.approx(0.6)
    f = fronts(mavis=(0.15, [(0.5, 0.6, 0.6, 5)]), rsoup=(0.2, []), mod=(0.1, []), morlhf=(0.1, [(0.5, 0.9, 0.9, 2)]))
    assert report.claim_fronts(f)["verdict"] == report.MIXED
    f = fronts(mavis=(0.05, [(0.5, 0.1, 0.1, 5)]), rsoup=(0.2, []), mod=(0.1, []), morlhf=(0.1, [(0.5, 0.9, 0.9, 2)]))
    assert report.claim_fronts(f)["verdict"] == report.FAILS


def test_claim_neighbours_compares_each_rival_and_lists_extrapolated_points():
    f = fronts(mavis=(0.3, [(0.5, 0.6, 0.6, 5)]), mva=(0.31, [(0.5, 0.5, 0.5, 1), (1.2, 0.7, 0.1, 2)]), mahalo=(0.1, [(0.5, 0.4, 0.4, 1)]))
    c = report.claim_neighbours(f)
    assert c["rivals"] == ["mahalo", "mva"] and c["verdict"] == report.MIXED
    assert c["off_grid"] == {"mva": [{"lambda": [1.2, pytest.approx(-0.2)], "weighted": pytest.approx(0.82), "rewards": {"a": 0.7, "b": 0.1}, "kl": 2}]}
    assert report.claim_neighbours(fronts(mavis=(0.3, []), **{"mavis-step": (0.2, [])}))["verdict"] == report.HOLDS
    assert report.claim_neighbours(fronts(mavis=(0.3, []), rsoup=(0.2, []))) is None


def test_matched_kl_interpolates_mavis_between_ref_and_its_betas():
    ref = (0.0, [(0.5, 0.4, 0.4, 0.0)])
    primary = fronts(ref=ref, mavis=(0.3, [(0.5, 0.6, 0.6, 8.0)]), **{"mavis-step": (0.2, [(0.5, 0.55, 0.55, 4.0)])},
                     mva=(0.2, [(0.5, 0.3, 0.3, 1.0), (1.2, 0.9, 0.1, 2.0)]))
    primary["methods"]["ref"]["points"][0]["lambda"] = None
    beta5 = fronts(mavis=(0.3, [(0.5, 0.7, 0.7, 20.0)]))
    se = lambda method, lam: 0.03  # noqa: E731
    rows = report.matched_kl({"sweep": {"fronts": primary, "se": se}, "sweep-beta5": {"fronts": beta5, "se": se}}, ["mavis-step", "mva"])
    assert [(r["method"], r["lambda"][0]) for r in rows] == [("mavis-step", 0.5), ("mva", 0.5)]  # no MAVIS point at the extrapolated lambda
    assert rows[0]["mavis_at_kl"] == pytest.approx(0.5) and rows[0]["diff"] == pytest.approx(0.05) and rows[0]["inside"]
    assert rows[0]["z"] == pytest.approx(0.05 / math.sqrt(2 * 0.03**2))
    assert rows[1]["mavis_at_kl"] == pytest.approx(0.425)


def test_claim_search_compares_weighted_reward_per_lambda():
    f = fronts(**{"mavis-beam": (0.3, [(1.0, 0.9, 0.0, 9), (0.0, 0.0, 0.5, 9)]), "bon-ref": (0.2, [(1.0, 0.5, 0.0, 0.8), (0.0, 0.0, 0.7, 0.8)]),
                  "bon-rsoup": (0.2, [(1.0, 0.6, 0.0, 0.8), (0.0, 0.0, 0.4, 0.8)])})
    c = report.claim_search(f)
    assert [r["wins"] for r in c["rows"]] == [True, False] and c["verdict"] == report.MIXED


def test_claim_conditioned_compares_hypervolumes_and_is_absent_without_the_methods():
    f = fronts(mavis=(0.3, [(0.5, 0.6, 0.6, 5)]), **{"mavis-conditioned": (0.2, [(0.5, 0.5, 0.6, 4)]), "moodpo": (0.35, [(0.5, 0.7, 0.7, 3)])})
    c = report.claim_conditioned(f)
    assert c["verdict"] == report.MIXED and c["rows"][0]["mavis-conditioned"] == pytest.approx(0.55) and c["rows"][0]["moodpo_kl"] == 3
    assert report.claim_conditioned(fronts(mavis=(0.3, []), **{"mavis-conditioned": (0.2, [])}))["verdict"] == report.HOLDS
    assert report.claim_conditioned(fronts(mavis=(0.3, []), rsoup=(0.2, []))) is None


def test_claim_distill_and_cost_rules():
    sep = {"a": res({"a": (0.50, 0.02)}, 3.0), "b": res({"b": (0.70, 0.02)}, 3.0)}
    dis = {"a": res({"a": (0.45, 0.02)}, 3.0), "b": res({"b": (0.50, 0.02)}, 3.0)}
    c = report.claim_distill(sep, dis, {"speedup": 1.3, "separate": 10.0, "distilled": 13.0})
    assert c["verdict"] == report.MIXED and [r["within"] for r in c["rows"]] == [True, False]
    assert report.claim_distill(sep, sep, {"speedup": 1.1})["verdict"] == report.HOLDS
    cost = report.claim_cost({"collect:iter0/trees.h5": 100.0, "train:iter0/a/value": 50.0, "train:iter0/b/value": 50.0},
                             {"rl-a": 60.0, "rl-b": 60.0, "rl-morlhf-0.5": 60.0}, ["a", "b"])
    assert cost["ratio"] == pytest.approx(200 / 120) and cost["verdict"] == report.HOLDS
    assert report.claim_cost({"collect:x": 1000.0}, {"rl-a": 100.0}, ["a"])["verdict"] == report.FAILS


# ------------------------------------------------------------------ the whole study on tiny models


def test_whole_study_on_tiny_models_writes_a_report_and_resumes(tmp_path):
    import json

    from conftest import save_tiny_model
    from mavis_align.study import run_study

    d = tmp_path / "m"
    save_tiny_model(d)
    data = tmp_path / "p.jsonl"
    heads, tails = ["hello world", "the cat sat", "why is the dog bad", "what is good", "how the cat ran", "a dog sat"], ["?", ".", "on the mat", "yes", "no"]
    data.write_text("".join(json.dumps({"prompt": f"{h} {t}"}) + "\n" for h in heads for t in tails))  # 30 distinct prompts
    spec = StudySpec(
        name="tiny-study",
        mavis=dict(name="tiny", model=str(d), objectives=["concise", "positive"], dataset=str(data), train_prompts=6, eval_prompts=2, chat=False,
                   tree={"num_layers": 2, "k_root": 2, "k": 2, "max_new_tokens": 5}, backbone=str(d),
                   train={"lr": 3e-3, "epochs": 1, "batch_size": 8, "eval_every": 0}, iterations=[{"beta": 2.0, "zeta": 0.1}],
                   eval={"beta": 2.0, "top_k": 5, "max_new_tokens": 5, "samples": 1}, group_size=3, val_fraction=0.4),
        baselines={"prompts": 6, "rl": {"steps": 1, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 5}, "morlhf": ["0.5"]},
        pair=["concise", "positive"],
        evaluation={"split": "test", "prompts": 2, "samples": 1, "max_new_tokens": 5, "top_k": 5},
        single={"betas": [1.0, 4.0]},
        sweep={"grid_step": 0.5, "beta": "matched", "extra_betas": [3.0], "n": 2, "methods": ["ref", "mavis", "mavis-beam", "rsoup", "mod", "morlhf", "bon-ref", "bon-rsoup"]},
        distill={"backbone": str(d), "epochs": 1.0, "beta": 2.0},
        conditioned={"head_hidden": 8, "epochs": 1.0, "round_epochs": 1.0, "grid": [1.0, 0.0], "prompts_per_weighting": 3, "policy_grid_step": 0.5},
        neighbours={"multihead": {"epochs": 1, "head_rank": 4, "lora_rank": 4, "max_new_tokens": 5, "min_margin": 0.0}, "multihead_prompts": 4,
                    "step_chunk": 2, "step_candidates": 2, "extrapolate": 0.5},
    )
    out = tmp_path / "study"
    run_study(spec, out, stages=["mavis", "baselines"], progress=False)  # an interrupted study ...
    assert (out / "baselines" / "rl-morlhf-0.5" / "mavis_policy.json").exists() and not (out / "single").exists()
    report_path = run_study(spec, out, progress=False, report=tmp_path / "results")  # ... resumed
    text = report_path.read_text()
    for k in range(1, 9):
        assert f"## Claim {k}" in text
    # claim 7: one conditioned value model by policy iteration (iter0 + one round on trees at each λ of the grid) and one conditioned policy
    assert (out / "conditioned" / "iter1" / "trees-1.h5").exists() and (out / "conditioned" / "iter1" / "value" / "best" / "meta.json").exists()
    assert (out / "conditioned" / "moodpo" / "mavis_policy.json").exists()
    assert {"mavis-conditioned", "moodpo"} <= set(json.loads((out / "sweep" / "fronts.json").read_text())["methods"])
    # claim 8: the neighbouring systems trained and swept (mva with its two extrapolated weightings)
    assert (out / "neighbours" / "mahalo" / "heads.safetensors").exists() and (out / "neighbours" / "mva-positive" / "mavis_policy.json").exists()
    sweep_methods = json.loads((out / "sweep" / "fronts.json").read_text())["methods"]
    assert {"mavis-step", "mahalo", "mahalo-step", "mva"} <= set(sweep_methods) and len(sweep_methods["mva"]["points"]) == 5
    assert "λ = 1.5/-0.5 (beyond the simplex)" in text
    verdicts = json.loads((out / "verdicts.json").read_text())["claims"]
    assert all(v["verdict"] in ("holds", "does not hold", "mixed") for v in verdicts.values())
    # the same claims at matched KL, beside the raw verdicts (issue 30)
    matched = json.loads((out / "verdicts.json").read_text())["matched_kl_verdicts"]
    assert set(matched) == {"1", "3", "4", "7", "8"} and all(v in ("holds", "does not hold", "mixed") for v in matched.values())
    assert "# At matched KL" in text and "### Verdicts at matched KL" in text and "| claim | raw verdict" in text
    assert (tmp_path / "results" / "REPORT.md").exists() and (tmp_path / "results" / "single_objective.png").stat().st_size > 0
    assert (tmp_path / "results" / "data" / "single" / "points" / "ref.json").exists()
    assert (tmp_path / "results" / "data" / "sweep-beta3" / "fronts.json").exists()
    assert "MAVIS β = 3" in text and (out / "sweep-beta3" / "fronts.json").exists()
    shared = out / "sweep-beta3" / "points" / "rsoup@0.5-0.5.json"  # baselines' points are copied, not recomputed
    assert shared.read_text() == (out / "sweep" / "points" / "rsoup@0.5-0.5.json").read_text()
    costs = json.loads((out / "costs.json").read_text())
    assert set(costs) == {"mavis", "baselines", "conditioned", "neighbours", "single", "sweep", "distill"}
    assert any(k.startswith("collect:") for k in json.loads((out / "mavis" / "costs.json").read_text()))
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/points/*.json")}
    run_study(spec, out, progress=False)  # everything finished: nothing is evaluated again
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    with pytest.raises(ValueError, match="another recipe"):
        run_study(StudySpec(**{**spec.to_dict(), "pair": ["positive", "concise"]}), out, progress=False)


def test_beta_zero_is_never_credited_to_mavis():
    pts = single_points(0.40, {0: [(1.0, 0.30), (3.0, 0.35)]})
    pts[point_name(0, "h", 0.0)] = res({"h": (0.90, 0.01)}, 1.0)  # top-k sampling alone, no values
    c = report.claim_single(pts, ["h"], {"h": 0}, [0.0, 1.0, 5.0])
    assert c["verdict"] == report.FAILS and c["rows"][0]["best_mavis"]["beta"] > 0
