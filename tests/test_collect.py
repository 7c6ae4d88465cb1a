"""Rollout trees: shape rules, labels, HDF5 store, resume after kill -9, Ray == local, training view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm, make_tiny_tokenizer, save_tiny_model
from mavis_align.collect import (
    CollectSpec, GenPolicy, TreeConfig, TreeFileError, build_trees, chunk_upper, collect, label_trees, node_examples,
    read_trees, relabel, sample_chunk_length, write_trees,
)
from mavis_align.collect.store import LabelledTrees
from mavis_align.rewards import get_rewards

PROMPTS = ["hello world", "the cat sat on the mat", "why is a dog good ?", "what", "how is the cat", "yes", "no dog ran", "a good mat ?", "the dog"]


def test_chunk_length_range():
    g = torch.Generator().manual_seed(0)
    for budget in range(1, 40):
        for L in (1, 2, 3, 5):
            for layer in range(L):
                up = chunk_upper(budget, layer, L)
                assert 1 <= up <= budget
                if layer == L - 1:
                    assert up == budget
                else:
                    assert up == max(1, min(budget, 2 * int(budget / (L - layer) + 0.5) - 1))
                for _ in range(3):
                    assert 1 <= sample_chunk_length(budget, layer, L, g) <= up
    with pytest.raises(ValueError):
        chunk_upper(0, 0, 2)


@pytest.fixture(scope="module")
def policy():
    tok = make_tiny_tokenizer()
    return GenPolicy(make_tiny_lm(len(tok), seed=3), tok)


def _items(tok, prompts):
    return [(i, p, tok(p, add_special_tokens=False)["input_ids"]) for i, p in enumerate(prompts)]


def test_tree_shape_without_eos(policy):
    eos = policy.eos_id
    policy.eos_id = None
    try:
        cfg = TreeConfig(num_layers=2, k_root=3, k=2, max_new_tokens=30)
        trees = build_trees(policy, _items(policy.tokenizer, PROMPTS[:3]), cfg, torch.Generator().manual_seed(0))
        for tree in trees:
            assert len(tree.nodes) == 1 + 3 + 3 * 2
            assert [len(tree.nodes[0].children)] + [len(tree.nodes[c].children) for c in tree.nodes[0].children] == [3, 2, 2, 2]
            assert max(n.depth for n in tree.nodes) == 2
            for leaf in tree.leaves():
                assert tree.response_length(leaf) == 30
        cfg3 = TreeConfig(num_layers=3, k_root=2, k=2, max_new_tokens=12)
        for tree in build_trees(policy, _items(policy.tokenizer, PROMPTS), cfg3, torch.Generator().manual_seed(1)):
            for i, node in enumerate(tree.nodes):
                assert node.depth <= 3
                if node.children:
                    assert len(node.children) == (2 if i == 0 else 2)
            for leaf in tree.leaves():
                assert tree.response_length(leaf) == 12  # no EOS: every leaf runs to the budget
    finally:
        policy.eos_id = eos


def test_tree_with_eos_labels_and_logprobs(policy):
    tok, model = policy.tokenizer, policy.model
    cfg = TreeConfig(num_layers=3, k_root=3, k=2, max_new_tokens=10)
    trees = build_trees(policy, _items(tok, PROMPTS), cfg, torch.Generator().manual_seed(2))
    assert any(n.terminal for t in trees for n in t.nodes), "the tiny model should emit EOS sometimes"
    values, lprs, texts = label_trees(trees, get_rewards(["concise"]), tok)
    for tree, v, l in zip(trees, values, lprs):
        for i, node in enumerate(tree.nodes):
            if node.children:
                np.testing.assert_allclose(v[i], v[node.children].mean(0))
                assert l[i] == pytest.approx(l[node.children].mean())
            elif i > 0:
                if node.terminal:
                    assert node.tokens[-1] == tok.eos_token_id
                else:
                    assert tree.response_length(i) == 10
                assert l[i] == pytest.approx(0.0, abs=1e-5)  # pi_gen = pi_ref: no log-ratio
        # concatenation root -> leaf is the sequence the model saw: per-token log pi_ref matches one full forward
        leaf = tree.leaves()[0]
        resp = tree.response(leaf)
        ids = torch.tensor([tree.prompt_ids + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want = [float(logp[len(tree.prompt_ids) - 1 + j, t]) for j, t in enumerate(resp)]
        got = [x for n in tree.path(leaf) for x in tree.nodes[n].logp_ref]
        assert got == pytest.approx(want, abs=1e-4)


def test_two_layer_rule_splits_eos_root_children(policy):
    tok = policy.tokenizer
    orig = policy.eos_id
    # make "EOS" frequent: use the token this tiny model emits most often as the end token
    probe = build_trees(policy, _items(tok, PROMPTS), TreeConfig(num_layers=1, k_root=4, max_new_tokens=8), torch.Generator().manual_seed(0))
    counts = np.bincount([x for t in probe for n in t.nodes for x in n.tokens[1:]], minlength=len(tok))
    policy.eos_id = int(counts.argmax())
    try:
        cfg = TreeConfig(num_layers=2, k_root=4, k=2, max_new_tokens=8, two_layer_rule=True, extra_children=3)
        trees = build_trees(policy, _items(tok, PROMPTS), cfg, torch.Generator().manual_seed(5))
    finally:
        policy.eos_id = orig
    splits = 0
    for tree in trees:
        for c in tree.nodes[0].children:
            node = tree.nodes[c]
            if node.terminal:
                assert len(node.tokens) == 1  # only a one-token answer cannot be split
                continue
            kids = [tree.nodes[k] for k in node.children]
            if len(kids) == 1 + 3:  # split: the lower half plus 3 extra children
                splits += 1
                lower = kids[0]
                assert lower.terminal and lower.depth == 2 and len(node.tokens) + len(lower.tokens) <= 8
            else:
                assert len(kids) in (0, 2)
    assert splits > 0


def test_mavis_policy_records_log_ratio(tmp_path):
    from test_decoding import make_value_model

    tok = make_tiny_tokenizer()
    vm = make_value_model(tok, ["v"], 4)
    pol = GenPolicy(make_tiny_lm(len(tok), seed=3), tok, [vm], weights={"v": 1.0})
    cfg = TreeConfig(num_layers=2, k_root=2, k=2, max_new_tokens=6, top_k=5, beta=4.0)
    trees = build_trees(pol, _items(tok, PROMPTS[:3]), cfg, torch.Generator().manual_seed(0))
    _, lprs, _ = label_trees(trees, get_rewards(["concise"]), tok)
    assert any(abs(l[leaf]) > 1e-3 for t, l in zip(trees, lprs) for leaf in t.leaves())


def test_step_kls_are_collected_stored_and_summed(tmp_path):
    """MAVIS trees carry each token's step KL (pi_ref trees: 0); the store keeps them (and files
    without them read back without them); expected_kl sums them as LPR sums log-ratios; a file
    that lost its KL dataset is one clear error."""
    from test_decoding import make_value_model

    from mavis_align.collect.tree import expected_kl

    tok = make_tiny_tokenizer()
    vm = make_value_model(tok, ["v"], 4)
    cfg = TreeConfig(num_layers=2, k_root=2, k=2, max_new_tokens=6, top_k=5, beta=4.0)
    trees = build_trees(GenPolicy(make_tiny_lm(len(tok), seed=3), tok, [vm], weights={"v": 1.0}), _items(tok, PROMPTS[:3]), cfg,
                        torch.Generator().manual_seed(0))
    assert all(len(n.kl) == len(n.tokens) for t in trees for n in t.nodes)
    assert all(k >= -1e-6 for t in trees for n in t.nodes for k in n.kl) and max(k for t in trees for n in t.nodes for k in n.kl) > 1e-3
    ref_trees = build_trees(GenPolicy(make_tiny_lm(len(tok), seed=3), tok), _items(tok, PROMPTS[:2]), TreeConfig(num_layers=2, k_root=2, k=2, max_new_tokens=6),
                            torch.Generator().manual_seed(0))
    assert all(abs(k) < 1e-5 for t in ref_trees for n in t.nodes for k in n.kl)
    values, lprs, texts = label_trees(trees, get_rewards(["concise"]), tok)
    path = tmp_path / "t.h5"
    write_trees(path, LabelledTrees(trees, values, lprs, [0, 1, 0], texts), ["concise"], {"seed": 0})
    back, _, _ = read_trees(path)
    for a, b in zip(trees, back.trees):
        assert [x for n in a.nodes for x in n.kl] == pytest.approx([x for n in b.nodes for x in n.kl], abs=1e-6)
        total, prefix = expected_kl(b)
        for leaf in b.leaves():
            assert total[leaf] == pytest.approx(sum(k for i in b.path(leaf) for k in b.nodes[i].kl), abs=1e-5)
            assert prefix[leaf] == pytest.approx(total[leaf])
    for t in trees:
        for n in t.nodes:
            n.kl = []
    old = tmp_path / "old.h5"
    write_trees(old, LabelledTrees(trees, values, lprs, [0, 1, 0], texts), ["concise"], {"seed": 0})
    import h5py

    with h5py.File(old, "r") as f:
        assert "kl" not in f["tokens"]
    assert all(n.kl == [] for t in read_trees(old)[0].trees for n in t.nodes)
    with pytest.raises(ValueError, match="no per-step KLs"):
        expected_kl(read_trees(old)[0].trees[0])
    lost = tmp_path / "lost.h5"
    lost.write_bytes(path.read_bytes())
    with h5py.File(lost, "a") as f:
        del f["tokens/kl"]
    with pytest.raises(TreeFileError, match="'tokens/kl' is missing"):
        read_trees(lost)


def test_expected_kl_on_a_hand_built_tree():
    """Leaves: the summed step KLs of their path; inner nodes: the mean over children (as LPR);
    prefix: the node's own path. node_examples(kl_estimator="expected") reads exactly these."""
    from mavis_align.collect.tree import Tree, expected_kl

    t = Tree.new(0, "p", [5, 6])
    a = t.add(0, [7, 8], [-1.0, -1.0], [-2.0, -2.0], False, [0.1, 0.2])
    a1 = t.add(a, [9], [-1.0], [-1.5], True, [0.3])
    a2 = t.add(a, [10], [-1.0], [-1.1], True, [0.5])
    b = t.add(0, [11], [-1.0], [-3.0], True, [1.0])
    total, prefix = expected_kl(t)
    assert total.tolist() == pytest.approx([0.85, 0.7, 0.6, 0.8, 1.0])
    assert prefix.tolist() == pytest.approx([0.0, 0.3, 0.6, 0.8, 1.0])
    values = [np.array([[0.5], [0.4], [0.2], [0.6], [0.6]])]
    lprs = [np.array([2.05, 2.3, 2.5, 2.1, 2.0])]  # sampled: a1 = 2 + 0.5, a2 = 2 + 0.1, b = 2, means above
    data = LabelledTrees([t], values, lprs, [0])
    sampled, _ = node_examples(data, None, keep_leaf_fraction=1.0)
    expected, _ = node_examples(data, None, keep_leaf_fraction=1.0, kl_estimator="expected")
    assert [e.node for e in expected] == [a, a1, a2, b]
    assert [e.lpr for e in expected] == pytest.approx([0.7, 0.6, 0.8, 1.0])
    assert [e.future_lpr for e in expected] == pytest.approx([0.4, 0.0, 0.0, 0.0])
    assert [e.future_lpr for e in sampled] == pytest.approx([0.3, 0.0, 0.0, 0.0])
    assert expected[0].target(0.5).tolist() == pytest.approx([0.4 - 0.5 * 0.4])
    t.nodes[a2].kl = []
    with pytest.raises(ValueError, match="collected before they were recorded"):
        node_examples(data, None, kl_estimator="expected")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        node_examples(data, None, kl_estimator="mean")


def test_store_roundtrip_and_errors(policy, tmp_path):
    tok = policy.tokenizer
    trees = build_trees(policy, _items(tok, PROMPTS[:4]), TreeConfig(num_layers=2, k_root=2, k=2, max_new_tokens=6), torch.Generator().manual_seed(0))
    values, lprs, texts = label_trees(trees, get_rewards(["concise"]), tok)
    path = tmp_path / "t.h5"
    write_trees(path, LabelledTrees(trees, values, lprs, [0, 1, 0, 0], texts), ["concise"], {"seed": 0, "config": {"a": 1}})
    data, objectives, attrs = read_trees(path)
    assert objectives == ["concise"] and attrs["config"] == {"a": 1} and data.splits == [0, 1, 0, 0]
    for a, b in zip(trees, data.trees):
        assert a.prompt_ids == b.prompt_ids and a.prompt == b.prompt
        assert [(n.parent, n.depth, n.tokens, n.terminal, n.children) for n in a.nodes] == [(n.parent, n.depth, n.tokens, n.terminal, n.children) for n in b.nodes]
        assert [x for n in a.nodes for x in n.logp_gen] == pytest.approx([x for n in b.nodes for x in n.logp_gen], abs=1e-6)
    for v0, v1 in zip(values, data.values):
        np.testing.assert_allclose(v0, v1, rtol=1e-6)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(path.read_bytes()[:500])
    with pytest.raises(TreeFileError, match="not a readable HDF5"):
        read_trees(bad)
    import h5py

    other = tmp_path / "other.h5"
    other.write_bytes(path.read_bytes())
    with h5py.File(other, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(TreeFileError, match="schema version 99"):
        read_trees(other)
    with pytest.raises(TreeFileError, match="does not exist"):
        read_trees(tmp_path / "missing.h5")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinymodel")
    save_tiny_model(d)
    return d


def _spec(model_dir, **kw):
    base = dict(model=str(model_dir), rewards=["concise"], chat=False, seed=7, group_size=2,
                tree=TreeConfig(num_layers=2, k_root=2, k=2, max_new_tokens=6), val_fraction=0.3)
    base.update(kw)
    return CollectSpec(**base)


def _same_trees(a: Path, b: Path) -> None:
    da, oa, _ = read_trees(a)
    db, ob, _ = read_trees(b)
    assert oa == ob and da.splits == db.splits and len(da) == len(db)
    for x, y in zip(da.trees, db.trees):
        assert x.prompt_index == y.prompt_index
        assert [n.tokens for n in x.nodes] == [n.tokens for n in y.nodes]
    for x, y in zip(da.values, db.values):
        np.testing.assert_allclose(x, y)


def test_resume_after_partial_run_and_after_kill_9(tiny_model_dir, tmp_path):
    full = collect(_spec(tiny_model_dir), tmp_path / "full.h5", PROMPTS, progress=False)
    data, _, attrs = read_trees(full)
    assert len(data) == len(PROMPTS) and attrs["seed"] == 7 and attrs["versions"]["torch"] and "git" in attrs
    assert not (tmp_path / "full.h5.parts").exists()
    # stopped after 2 groups, then resumed
    part = tmp_path / "part.h5"
    assert collect(_spec(tiny_model_dir), part, PROMPTS, progress=False, max_groups=2) is None
    assert len(list((tmp_path / "part.h5.parts").glob("part-*.h5"))) == 2
    with pytest.raises(FileExistsError, match="--resume"):
        collect(_spec(tiny_model_dir), part, PROMPTS, progress=False)
    with pytest.raises(ValueError, match="settings differ .* in seed;"):
        collect(_spec(tiny_model_dir, seed=8), part, PROMPTS, progress=False, resume=True)
    # a spec.json written before a tree setting existed (here max_step_kl) resumes: the setting takes its default
    saved = tmp_path / "part.h5.parts" / "spec.json"
    old = json.loads(saved.read_text())
    del old["tree"]["max_step_kl"]
    saved.write_text(json.dumps(old))
    collect(_spec(tiny_model_dir), part, PROMPTS, progress=False, resume=True)
    _same_trees(full, part)


def test_resume_from_another_working_directory(tiny_model_dir, tmp_path, monkeypatch):
    """The same model named by a relative path from one directory and an absolute one from another
    is the same setting (resuming a study from elsewhere was refused as 'settings differ')."""
    monkeypatch.chdir(tiny_model_dir.parent)
    part = tmp_path / "rel.h5"
    assert collect(_spec(tiny_model_dir.name), part, PROMPTS, progress=False, max_groups=1) is None
    monkeypatch.chdir(tmp_path)
    collect(_spec(tiny_model_dir.resolve()), part, PROMPTS, progress=False, resume=True)
    assert len(read_trees(part)[0]) == len(PROMPTS)
    # killed with SIGKILL in the middle of a CLI run, then resumed
    killed = tmp_path / "killed.h5"
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS * 6))
    args = ["collect", "--out", str(killed), "--model", str(tiny_model_dir), "--dataset", str(prompt_file), "--split", "train",
            "--reward", "concise", "--no-chat", "--seed", "7", "--group-size", "2", "--layers", "2", "--k-root", "2", "--k", "2",
            "--max-new-tokens", "6", "--val-fraction", "0.3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mavis_align.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.h5.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.h5"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(list(parts.glob("part-*.h5")))
    assert n_before >= 2 and not killed.exists()
    from mavis_align.cli import main

    assert main(args + ["--resume"]) == 0
    reference = tmp_path / "ref.h5"
    assert main([a if a != str(killed) else str(reference) for a in args]) == 0
    _same_trees(reference, killed)


def test_relabel_and_training_view(tiny_model_dir, tmp_path):
    path = collect(_spec(tiny_model_dir), tmp_path / "t.h5", PROMPTS, progress=False)
    relabel(path, ["humor"], tmp_path / "t2.h5")
    data, objectives, attrs = read_trees(tmp_path / "t2.h5")
    assert objectives == ["concise", "humor"] and attrs["relabelled"]["rewards"] == ["humor"]
    old, _, _ = read_trees(path)
    for t, v_new, v_old in zip(data.trees, data.values, old.values):
        np.testing.assert_allclose(v_new[:, 0], v_old[:, 0], rtol=1e-6)
        for i, node in enumerate(t.nodes):
            if node.children:
                assert v_new[i, 1] == pytest.approx(v_new[node.children, 1].mean(), rel=1e-5)
    train, objectives = node_examples(path, "train", keep_leaf_fraction=1.0)
    val, _ = node_examples(path, "val", keep_leaf_fraction=1.0)
    assert objectives == ["concise"] and train and val
    assert not {e.tree for e in train} & {e.tree for e in val}  # split by tree
    all_nodes = sum(len(t.nodes) - 1 for t in old.trees)
    assert len(train) + len(val) == all_nodes
    half, _ = node_examples(path, "train", keep_leaf_fraction=0.5, seed=1)
    no_leaves, _ = node_examples(path, "train", drop_leaves=True)
    n_leaf = sum(e.is_leaf for e in train)
    assert sum(e.is_leaf for e in half) < n_leaf and not any(e.is_leaf for e in no_leaves)
    assert len(no_leaves) == len(train) - n_leaf
    ex = train[0]
    t = old.trees[ex.tree]
    assert ex.input_ids == t.prompt_ids + t.response(ex.node)
    assert ex.target(0.5) == pytest.approx(ex.value - 0.5 * ex.lpr)


def test_ray_two_workers_equal_local(tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    local = collect(_spec(tiny_model_dir), tmp_path / "local.h5", PROMPTS, progress=False)
    ray_out = collect(_spec(tiny_model_dir), tmp_path / "ray.h5", PROMPTS, progress=False, backend="ray", workers=2)
    _same_trees(local, ray_out)
    _, _, attrs = read_trees(ray_out)
    assert attrs["backend"] == "ray"


def test_bit_flips_in_a_tree_file_are_harmless_or_one_clear_error(policy, tmp_path):
    """300 single-bit flips spread over a tree file: each one either reads back the identical data
    (the flip hit unused bytes) or raises TreeFileError with a one-line message; never silently
    changed data, never another exception."""
    tok = policy.tokenizer
    trees = build_trees(policy, _items(tok, PROMPTS[:3]), TreeConfig(num_layers=2, k_root=2, k=2, max_new_tokens=6), torch.Generator().manual_seed(0))
    values, lprs, texts = label_trees(trees, get_rewards(["concise"]), tok)
    path = tmp_path / "t.h5"
    write_trees(path, LabelledTrees(trees, values, lprs, [0, 1, 0], texts), ["concise"], {"seed": 0, "config": {"a": 1}})
    clean = path.read_bytes()

    def snapshot(p):
        d, objs, attrs = read_trees(p)
        return (objs, attrs, d.splits, [(t.prompt, t.prompt_index, t.prompt_ids, [(n.parent, n.depth, n.tokens, n.logp_gen, n.logp_ref, n.terminal, n.kl) for n in t.nodes])
                                        for t in d.trees], [v.tolist() for v in d.values], [v.tolist() for v in d.lprs], d.texts)

    want = snapshot(path)
    rng = np.random.default_rng(0)
    flipped = tmp_path / "flipped.h5"
    outcomes = {"same": 0, "error": 0}
    for pos in rng.choice(len(clean) * 8, size=300, replace=False):
        data = bytearray(clean)
        data[pos // 8] ^= 1 << (pos % 8)
        flipped.write_bytes(bytes(data))
        try:
            got = snapshot(flipped)
        except TreeFileError as err:
            assert "\n" not in str(err)
            outcomes["error"] += 1
            continue
        assert got == want, f"bit {pos} changed the data silently"
        outcomes["same"] += 1
    print("bit flips:", outcomes)
    assert outcomes["error"] > 0


def test_a_corrupt_part_is_collected_again_on_resume(tiny_model_dir, tmp_path, capsys):
    full = collect(_spec(tiny_model_dir), tmp_path / "full.h5", PROMPTS, progress=False)
    part = tmp_path / "part.h5"
    assert collect(_spec(tiny_model_dir), part, PROMPTS, progress=False, max_groups=2) is None
    victim = sorted((tmp_path / "part.h5.parts").glob("part-*.h5"))[0]
    victim.write_bytes(victim.read_bytes()[: 2000])  # truncated (a disk fault, a bad copy)
    collect(_spec(tiny_model_dir), part, PROMPTS, progress=False, resume=True)
    assert "is corrupt and will be collected again" in capsys.readouterr().out
    _same_trees(full, part)


def test_trees_reusing_the_prefix_cache_equal_full_prefill(policy, monkeypatch):
    """The next layer starting from each node's kept keys and values (only its last token runs) grows
    the same trees as prefilling every prefix again, pi_ref and MAVIS, two-layer rule included."""
    from test_decoding import make_value_model

    from mavis_align.decoding.steppers import CachedBase

    reused = []
    original = CachedBase._start_from_prefixes
    monkeypatch.setattr(CachedBase, "_start_from_prefixes", lambda self, *a: reused.append(original(self, *a)) or reused[-1])

    tok = policy.tokenizer
    vm = make_value_model(tok, ["v"], 4)
    model = make_tiny_lm(len(tok), seed=3)
    for values, cfg in (([], TreeConfig(num_layers=3, k_root=2, k=2, max_new_tokens=9)),
                        ([vm], TreeConfig(num_layers=3, k_root=2, k=2, max_new_tokens=9, top_k=5, beta=4.0, two_layer_rule=True))):
        grown = {}
        for reuse in (False, True):
            pol = GenPolicy(model, tok, values, weights={"v": 1.0} if values else None, reuse_prefix_kv=reuse)
            grown[reuse] = build_trees(pol, _items(tok, PROMPTS[:5]), cfg, torch.Generator().manual_seed(0))
        assert sum(len(t.nodes) for t in grown[True]) > 5 * 4
        assert sum(r is not None for r in reused) >= 2  # layers 1 and 2 started from kept keys/values
        reused.clear()
        for a, b in zip(grown[False], grown[True]):
            assert [(n.parent, n.tokens, n.terminal) for n in a.nodes] == [(n.parent, n.tokens, n.terminal) for n in b.nodes]
            assert [x for n in a.nodes for x in n.logp_gen] == pytest.approx([x for n in b.nodes for x in n.logp_gen], abs=1e-4)
            assert [x for n in a.nodes for x in n.logp_ref] == pytest.approx([x for n in b.nodes for x in n.logp_ref], abs=1e-4)


def test_prefix_kv_start_equals_prefill_and_refuses_other_tokens():
    """CachedBase.start from kept keys/values gives the logits of a full prefill (rows of different
    lengths, left-padded), then steps alike; keys/values of other tokens are not used."""
    from mavis_align.decoding.steppers import CachedBase
    from mavis_align.generation import left_pad

    tok = make_tiny_tokenizer()
    model = make_tiny_lm(len(tok), seed=3)
    seqs = [[5, 9, 11, 7, 8, 20], [6, 7, 21], [12, 13, 14, 15]]
    full = CachedBase(model)
    ids, mask = left_pad(seqs, 0, torch.device("cpu"))
    want = full.start(ids, mask)
    kept = []
    for s in seqs:  # each sequence's keys/values but its last token, as a finished row leaves them
        one = CachedBase(model)
        one.start(torch.tensor([s[:-1]]), torch.ones(1, len(s) - 1, dtype=torch.long))
        kept.append(replace(one.row_kv(0), ids=tuple(s[:-1])))
    reuse = CachedBase(model, kept)
    got = reuse.start(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert reuse.mask.shape[1] < mask.shape[1] + 1
    nxt = torch.tensor([3, 4, 5])
    torch.testing.assert_close(reuse.step(nxt), full.step(nxt), atol=1e-4, rtol=1e-4)
    wrong = [replace(kept[0], ids=(1,) * len(kept[0].ids))] + kept[1:]
    other = CachedBase(model, wrong)
    torch.testing.assert_close(other.start(ids, mask), want, atol=1e-5, rtol=1e-5)
    assert other.mask.shape == mask.shape  # fell back to the full prefill
    assert kept[0].truncated(3).ids == tuple(seqs[0][:3]) and kept[0].truncated(3).layers[0][0].shape[1] == 3
    with pytest.raises(ValueError, match="cannot keep"):
        kept[0].truncated(99)
