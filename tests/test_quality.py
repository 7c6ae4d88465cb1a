"""Value-model quality metrics on hand-built arrays, the frozen-trunk value model (features computed
once, heads only, MLP heads) and the shared-trunk forward at decode time."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer
from mavis_align.collect.dataset import NodeExample
from mavis_align.decoding.steppers import CachedValueScorer, bind_objectives, naive_value_fn, trunk_groups
from mavis_align.train.quality import quality_report, r_squared, sibling_concordance, sibling_pairs
from mavis_align.train.regression import TrainConfig, prefix_carriers, train_value_model, trunk_features
from mavis_align.values import (ValueModel, ValueModelError, prompt_response_features, prompt_response_means, tokenizer_fingerprint,
                                truncated_backbone)


def test_r_squared_closed_forms():
    target = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]])
    assert np.allclose(r_squared(target, target)[0], 1.0)
    mean = np.repeat(target.mean(0, keepdims=True), 3, 0)
    r2 = r_squared(mean, target)
    assert r2[0] == pytest.approx(0.0) and math.isnan(r2[1])  # no variance to explain
    worse = target + np.array([[1.0, 0.0]] * 3)
    assert r_squared(worse, target)[0] == pytest.approx(1 - 1 / (2 / 3))
    with pytest.raises(ValueError, match=r"\[N, M\]"):
        r_squared(target[:, 0], target[:, 0])


def test_sibling_pairs_group_by_tree_and_parent():
    groups = [(0, 0), (0, 0), (0, 0), (0, 1), (1, 0), (1, 0), (0, 1)]
    pairs = sibling_pairs(groups)
    assert sorted(pairs) == [(0, 1), (0, 2), (1, 2), (3, 6), (4, 5)]


def test_concordance_counts_order_ties_and_clusters():
    # tree 0: three siblings, targets 0 < 1 < 2; V orders (0,1) right, (0,2) right, (1,2) wrong
    # tree 1: two siblings with equal targets (skipped), two with a V tie (counts 1/2)
    target = np.array([0.0, 1.0, 2.0, 5.0, 5.0, 0.0, 1.0])
    pred = np.array([0.0, 0.9, 0.5, 1.0, 2.0, 3.0, 3.0])
    groups = [(0, 0), (0, 0), (0, 0), (1, 4), (1, 4), (1, 7), (1, 7)]
    res = sibling_concordance(pred, target, sibling_pairs(groups), [g[0] for g in groups])
    assert res["pairs"] == 4 and res["trees"] == 2
    assert res["concordance"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    # clustered SE: residuals per tree (2 - 0.625*3) and (0.5 - 0.625*1), g/(g-1) = 2
    expected = math.sqrt(2 * ((2 - 1.875) ** 2 + (0.5 - 0.625) ** 2)) / 4
    assert res["se"] == pytest.approx(expected)
    empty = sibling_concordance(pred, np.zeros(7), sibling_pairs(groups), [g[0] for g in groups])
    assert empty["pairs"] == 0 and math.isnan(empty["concordance"])


def test_quality_report_is_json_ready():
    target = np.array([[0.0], [1.0], [0.5], [0.7]])
    rep = quality_report(target * 2, target, [(0, 0), (0, 0), (1, 0), (1, 0)], ["h"])
    json.dumps(rep)
    q = rep["per_objective"]["h"]
    assert q["concordance"] == 1.0 and q["pairs"] == 2 and rep["trees"] == 2
    assert q["r2"] == pytest.approx(1 - ((target) ** 2).mean() / target.var())


def _example(ids, tree, node=1, parent=0, value=0.0, prompt_length=0):
    return NodeExample(list(ids), np.array([value]), 0.0, tree, node, 1, False, 0.0, parent, prompt_length=prompt_length)


def test_prefix_carriers_share_sequences_within_a_tree():
    ex = [_example([5, 6], 0), _example([5, 6, 7, 8], 0), _example([5, 6, 9], 0), _example([5, 6], 1), _example([5], 0)]
    carriers, where = prefix_carriers(ex)
    assert len(carriers) == 3  # [5,6,7,8] and [5,6,9] in tree 0; [5,6] in tree 1
    for e, (c, p) in zip(ex, where):
        assert carriers[c][: p + 1] == e.input_ids and p == len(e.input_ids) - 1


def frozen_model(objectives=("a", "b"), head_hidden=0, seed=0, pool="last") -> ValueModel:
    tok = make_tiny_tokenizer()
    trunk = truncated_backbone(make_tiny_lm(len(tok), seed=3, layers=2), 1)
    torch.manual_seed(seed)
    vm = ValueModel(trunk, list(objectives), tokenizer_fingerprint(tok), {"backbone": "trunk:1"}, tok, head_hidden=head_hidden, pool=pool)
    vm.freeze_backbone()
    return vm.eval()


def test_trunk_features_equal_each_examples_own_forward():
    vm = frozen_model()
    rng = np.random.default_rng(0)
    ex = []
    for t in range(3):
        root = rng.integers(4, 20, size=6).tolist()
        for n in range(1, 6):
            ex.append(_example(root[: n + 1] + rng.integers(4, 20, size=n % 3).tolist(), t, node=n, prompt_length=2))
    feats = trunk_features(vm, ex, pad_id=1, batch_size=4)
    assert feats.shape == (len(ex), 4, vm.hidden_size)
    for i, e in enumerate(ex):
        own = vm.backbone(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0]
        assert torch.allclose(feats[i, 0], own[-1], atol=1e-5), i
        assert torch.allclose(feats[i, 1], own.mean(0), atol=1e-5), i
        assert torch.allclose(feats[i, 2], own[:2].mean(0), atol=1e-5), i
        assert torch.allclose(feats[i, 3], own[2:].mean(0), atol=1e-5), i


def test_prompt_response_features_by_hand():
    p, r = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    centre = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    x = prompt_response_features(p, r, centre)
    # p, r, u(p - c_p) * u(r - c_r) = (0, 1) * (1, 0), cos(p, r) = 24/25, cos of the centred = 0
    assert torch.allclose(x, torch.tensor([[3.0, 4.0, 4.0, 3.0, 0.0, 0.0, 0.96, 0.0]]))
    # causal means: prompt = first 2 real tokens, response = the rest (none yet: zeros); left padding skipped
    h = torch.arange(1.0, 6.0)[None, :, None]  # states 1..5
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    prompt, response = prompt_response_means(h, mask, torch.tensor([2]))
    assert prompt[0, :, 0].tolist() == [0.0, 2.0, 2.5, 2.5, 2.5] and response[0, :, 0].tolist() == [0.0, 0.0, 0.0, 4.0, 4.5]


def test_running_mean_pool_reads_real_tokens_only(tiny_tokenizer):
    vm = frozen_model(pool="mean+last")
    with torch.no_grad():
        vm.head.weight.normal_()
    texts = ["hello world the cat sat", "why ?"]
    single = torch.cat([vm.score(*tiny_tokenizer(t, return_tensors="pt").values()) for t in texts])
    for side in ("left", "right"):
        tiny_tokenizer.padding_side = side
        enc = tiny_tokenizer(texts, return_tensors="pt", padding=True)
        assert torch.allclose(vm.score(enc["input_ids"], enc["attention_mask"]), single, atol=1e-5), side
    tiny_tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="pool must be one of"):
        frozen_model(pool="max")


def test_mlp_heads_roundtrip_and_frozen_fingerprint_checked(tmp_path):
    vm = frozen_model(head_hidden=8, pool="mean")
    with torch.no_grad():
        vm.head.w2.normal_()
    ids = torch.tensor([[5, 6, 7, 8]])
    vm.save(tmp_path / "v")
    back = ValueModel.load(tmp_path / "v")
    assert back.head_hidden == 8 and back.pool == "mean" and back.frozen_backbone and back.trunk_key == vm.trunk_key
    assert not any(p.requires_grad for p in back.backbone.parameters())
    assert torch.allclose(back(ids).values, vm(ids).values, atol=1e-6)
    # a changed trunk no longer matches its recorded fingerprint
    meta = json.loads((tmp_path / "v" / "meta.json").read_text())
    meta["trunk_fingerprint"] = "0" * 64
    (tmp_path / "v" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueModelError, match="fingerprint"):
        ValueModel.load(tmp_path / "v")
    with pytest.raises(ValueError, match="frozen"):
        vm.add_lora(4)


@pytest.fixture(scope="module")
def cat_trees():
    from test_train import build_cat_trees

    return build_cat_trees()


def test_frozen_trunk_trains_heads_only_and_reports_quality(tmp_path, cat_trees):
    data = cat_trees
    vm = frozen_model(("cat",), head_hidden=16)
    trunk_before = {k: v.clone() for k, v in vm.backbone.state_dict().items()}
    res = train_value_model(vm, [data], tmp_path / "v", TrainConfig(lr=3e-3, epochs=8, batch_size=16, eval_every=10, sibling_weight=0.5), progress=False)
    assert all(torch.equal(v, trunk_before[k]) for k, v in vm.backbone.state_dict().items())
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    q = res["quality"]["per_objective"]["cat"]
    assert res["quality"]["trees"] == 4 and q["pairs"] > 10 and q["r2"] is not None and 0 <= q["concordance"] <= 1
    assert json.loads((tmp_path / "v" / "result.json").read_text())["quality"] == res["quality"]
    # the checkpoint holds the heads, not the frozen trunk
    from safetensors.torch import load_file

    assert all(not k.startswith("backbone.") for k in load_file(str(tmp_path / "v" / "checkpoint" / "model.safetensors")))


def test_sibling_loss_settings_are_checked():
    with pytest.raises(ValueError, match="sibling_weight"):
        TrainConfig(sibling_weight=-1.0)


def test_value_models_on_one_frozen_trunk_share_one_forward():
    models = [frozen_model(("a",), seed=1, pool="mean"), frozen_model(("b", "c"), head_hidden=4, seed=2, pool="mean+last"),
              frozen_model(("e",), seed=4, pool="prompt+response")]
    for vm in models:
        with torch.no_grad():
            for p in vm.head.parameters():
                p.normal_()
    models[2].set_pool_centre(torch.randn(models[2].hidden_size), torch.randn(models[2].hidden_size))
    other = frozen_model(("d",), seed=3)
    with torch.no_grad():
        for p in other.backbone.parameters():
            p.mul_(1.1)
    other.freeze_backbone()  # a different trunk: its own group
    models.append(other)
    assert models[0].trunk_key == models[1].trunk_key != other.trunk_key
    bindings = bind_objectives(models)
    scorer = CachedValueScorer(models, bindings)
    assert scorer.groups == [[0, 1, 2], [3]] == trunk_groups(models, [0, 1, 2, 3])
    prompts = torch.tensor([[1, 1, 5, 6], [7, 8, 9, 10]])
    mask = (prompts != 1).long()
    scorer.start(prompts, mask)
    cands = torch.tensor([[4, 5, 6], [7, 8, 9]])
    first = scorer.score(cands)
    scorer.append(torch.tensor([5, 9]))
    second = scorer.score(cands)
    fn = naive_value_fn(models, bindings)

    def naive(seqs):  # prompts are the rows' first 2 (row 0) or 4 (row 1) tokens: their first token tells
        return fn(seqs, prompt_lengths=[2 if s[0] == 5 else 4 for s in seqs])

    rows = [[5, 6], [7, 8, 9, 10]]
    expect1 = naive([r + [c] for r, cs in zip(rows, cands.tolist()) for c in cs]).view(2, 3, -1)
    expect2 = naive([r + [t, c] for r, t, cs in zip(rows, [5, 9], cands.tolist()) for c in cs]).view(2, 3, -1)
    assert torch.allclose(first, expect1, atol=1e-5) and torch.allclose(second, expect2, atol=1e-5)
    # beam search reorders rows (running sums included); two appends in a row flush the first
    scorer.append(torch.tensor([6, 4]))
    scorer.reorder(torch.tensor([1, 1, 0]))
    scorer.append(torch.tensor([7, 8, 9]))
    third = scorer.score(cands[[1, 1, 0]])
    rows3 = [[7, 8, 9, 10, 9, 4, 7], [7, 8, 9, 10, 9, 4, 8], [5, 6, 5, 6, 9]]
    expect3 = naive([r + [c] for r, cs in zip(rows3, cands[[1, 1, 0]].tolist()) for c in cs]).view(3, 3, -1)
    assert torch.allclose(third, expect3, atol=1e-5)
    # continuous batching: rows started apart and merged score as if started together
    left, right = CachedValueScorer(models, bindings), CachedValueScorer(models, bindings)
    left.start(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
    right.start(torch.tensor([[7, 8, 9, 10]]), torch.ones(1, 4, dtype=torch.long))
    left.merge(right)
    assert torch.allclose(left.score(cands), expect1, atol=1e-5)


def test_fit_ridge_recovers_a_linear_map_and_picks_penalties_by_group_cv():
    from mavis_align.train.regression import fit_ridge

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0, 1.0, 3.0]) + 4.0
    w_true = torch.tensor([[0.5, -0.2, 3.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    noise = torch.randn(300, 2, generator=g) * torch.tensor([0.01, 1.0])
    y = x @ w_true.T + torch.tensor([1.0, 2.0]) + noise
    groups = [i // 10 for i in range(300)]
    weight, bias, alphas, cv = fit_ridge(x, y, groups, alphas=(1e-3, 1.0, 1e6))
    assert torch.allclose(weight[0], w_true[0], atol=0.02) and abs(float(bias[0]) - 1.0) < 0.1
    assert alphas[0] < 1e6 and alphas[1] == 1e6  # signal: little penalty; pure noise: the largest
    assert len(cv) == 3 and len(cv[0]) == 2
    with pytest.raises(ValueError, match="at least 2 trees"):
        fit_ridge(x, y, [0] * 300)


def test_fit_ridge_pair_term_fits_the_within_group_differences():
    """With pairs, the fit also matches the pairs' target differences: the levels carry a per-group
    offset that follows the group's mean of feature 0 (so a level fit over-weights feature 0), the
    differences within a group do not; a heavy pair weight recovers the within-group map, none does
    not; pair_weight 0 is the plain fit."""
    from mavis_align.train.regression import fit_ridge

    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, generator=g)
    group = torch.arange(200) // 4
    groups = group.tolist()
    group_mean0 = torch.zeros(50).index_add(0, group, x[:, 0]) / 4
    a = torch.tensor([1.0, -2.0, 0.5])
    y = (x @ a + 4.0 * group_mean0[group])[:, None]
    pairs = [(i, j) for i in range(200) for j in range(i + 1, 200) if groups[i] == groups[j]]
    plain, _, _, _ = fit_ridge(x, y, groups, alphas=(1e-3,))
    paired, _, _, _ = fit_ridge(x, y, groups, alphas=(1e-3,), pairs=pairs, pair_weight=100.0)
    assert torch.allclose(paired[0], a, atol=0.05)
    assert float(plain[0, 0] - a[0]) > 0.3  # the level fit credits feature 0 with the groups' offsets
    same, _, _, _ = fit_ridge(x, y, groups, alphas=(1e-3,), pairs=pairs, pair_weight=0.0)
    assert torch.equal(same, plain)


def test_prompt_response_model_fits_its_centre_and_roundtrips(tmp_path, cat_trees):
    vm = frozen_model(("cat",), pool="prompt+response")
    assert vm.head.weight.shape[1] == 3 * vm.hidden_size + 2
    res = train_value_model(vm, [cat_trees], tmp_path / "v", TrainConfig(solver="ridge"), progress=False)
    assert res["quality"]["per_objective"]["cat"]["pairs"] > 0
    back = ValueModel.load(tmp_path / "v" / "best")
    assert back.pool == "prompt+response" and back.meta["pool_centre_fitted"] and float(back.pool_centre.abs().sum()) > 0
    assert torch.equal(back.pool_centre, vm.pool_centre)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(back(ids, prompt_lengths=torch.tensor([2])).values, vm(ids, prompt_lengths=torch.tensor([2])).values, atol=1e-6)
    with pytest.raises(ValueError, match="prompt_lengths"):
        back(ids)
    # trained further (policy iteration), the centre stays: the heads keep reading the same features
    centre = back.pool_centre.clone()
    train_value_model(back, [cat_trees], tmp_path / "w", TrainConfig(solver="ridge", seed=1, keep_leaf_fraction=1.0), progress=False)
    assert torch.equal(back.pool_centre, centre)
    # its centre is fitted on trunk features: a trainable backbone cannot use it
    tok = make_tiny_tokenizer()
    free = ValueModel(truncated_backbone(make_tiny_lm(len(tok), seed=3, layers=2), 1), ["cat"], tokenizer_fingerprint(tok), {}, tok,
                      pool="prompt+response")
    with pytest.raises(ValueError, match="frozen trunk"):
        train_value_model(free, [cat_trees], tmp_path / "x", TrainConfig(epochs=1), progress=False)


def test_ridge_solver_fits_frozen_linear_heads_only(tmp_path, cat_trees):
    data = cat_trees
    vm = frozen_model(("cat",), pool="mean")
    res = train_value_model(vm, [data], tmp_path / "v", TrainConfig(solver="ridge"), progress=False)
    assert res["solver"] == "ridge" and res["ridge_alpha"]["cat"] > 0 and res["quality"]["per_objective"]["cat"]["pairs"] > 0
    back = ValueModel.load(tmp_path / "v" / "best")
    assert back.meta["ridge_alpha"] == res["ridge_alpha"]
    with pytest.raises(ValueError, match="frozen trunk"):
        train_value_model(frozen_model(("cat",), head_hidden=4), [data], tmp_path / "w", TrainConfig(solver="ridge"), progress=False)
    with pytest.raises(ValueError, match="solver must be"):
        TrainConfig(solver="adam")


def test_kl_penalised_training_also_reports_quality_against_rewards_alone(tmp_path, cat_trees):
    """With zeta > 0 the eq. 6 targets of siblings also differ by zeta times their continuations'
    log-ratios; result.json then carries the quality against the MC rewards alone beside it."""
    from mavis_align.collect.dataset import node_examples
    from mavis_align.collect.store import LabelledTrees
    from mavis_align.train.regression import value_quality

    rng = np.random.default_rng(0)
    d = cat_trees
    tilted = LabelledTrees(d.trees, d.values, [rng.uniform(0, 20, size=len(x)) for x in d.lprs], d.splits, d.texts)
    res = train_value_model(frozen_model(("cat",), pool="mean"), [tilted], tmp_path / "z", TrainConfig(solver="ridge", zeta=0.05), progress=False)
    val, _ = node_examples(tilted, "val", keep_leaf_fraction=1.0)
    back = ValueModel.load(tmp_path / "z" / "best")
    tok = make_tiny_tokenizer()
    alone = value_quality(back, val, tok.pad_token_id, zeta=0.0)
    assert res["quality_reward"]["per_objective"]["cat"] == pytest.approx(alone["per_objective"]["cat"])
    assert res["quality_reward"]["per_objective"]["cat"]["r2"] != pytest.approx(res["quality"]["per_objective"]["cat"]["r2"])
    plain = train_value_model(frozen_model(("cat",), pool="mean"), [d], tmp_path / "p", TrainConfig(solver="ridge"), progress=False)
    assert plain["quality_reward"] is None


def test_separate_ridge_fits_values_and_kl_term_apart(tmp_path, cat_trees):
    """ridge_kl='separate': the head is w_values − ζ · w_KL with each part's own cross-validated
    penalty, so it is affine in ζ around the values-only head (ζ = 0), and records the KL part's penalty."""
    from mavis_align.collect.store import LabelledTrees

    rng = np.random.default_rng(0)
    d = cat_trees
    tilted = LabelledTrees(d.trees, d.values, [rng.uniform(0, 20, size=len(x)) for x in d.lprs], d.splits, d.texts)
    heads = {}
    for name, zeta, how in (("plain", 0.0, "joint"), ("a", 0.05, "separate"), ("b", 0.1, "separate")):
        train_value_model(frozen_model(("cat",), pool="mean"), [tilted], tmp_path / name,
                          TrainConfig(solver="ridge", zeta=zeta, ridge_kl=how, keep_leaf_fraction=1.0), progress=False)
        back = ValueModel.load(tmp_path / name / "best")
        heads[name] = (back.head.weight.detach().clone(), back.head.bias.detach().clone(), back.meta)
    for i in (0, 1):
        step_a = heads["a"][i] - heads["plain"][i]
        assert float(step_a.abs().max()) > 1e-6
        torch.testing.assert_close(heads["b"][i] - heads["plain"][i], 2 * step_a, atol=1e-4, rtol=1e-3)
    assert heads["a"][2]["ridge_alpha_kl"] > 0 and "ridge_alpha_kl" not in heads["plain"][2]
    with pytest.raises(ValueError, match="ridge_kl must be"):
        TrainConfig(ridge_kl="both")
