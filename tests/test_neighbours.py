"""The neighbouring systems (issue 17): MVA-style decorrelated adapters (dependence penalty, weight-space
combination and extrapolation) and the MAHALO-style multi-head policy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import save_tiny_model

PROMPTS = ["hello world", "why is the cat good", "what dog ran ?"]


# ---------------------------------------------------------------------------------- the dependence estimator


def test_gaussian_mi_is_zero_for_uncorrelated_updates_and_exact_for_known_correlation():
    from mavis_align.baselines.mva import gaussian_mi

    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 6, generator=g)
    b = torch.randn(8, 6, generator=g)
    xa, xb = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    b_orth = (xb - (xa @ xb) / (xa @ xa) * xa).reshape(8, 6)  # centred and orthogonal to a's centred entries
    assert float(gaussian_mi(a, b_orth)) == pytest.approx(0.0, abs=1e-6)
    assert float(gaussian_mi(a, torch.zeros_like(a))) == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA (B = 0) depends on nothing
    for rho in (0.3, 0.8, -0.6):
        y = rho * xa / xa.norm() + math.sqrt(1 - rho**2) * b_orth.reshape(-1) / b_orth.reshape(-1).norm()
        assert float(gaussian_mi(a, y.reshape(8, 6) + 5.0)) == pytest.approx(-0.5 * math.log(1 - rho**2), rel=1e-4)  # shift-invariant
    assert math.isfinite(float(gaussian_mi(a, 3 * a)))  # clamped, large
    assert float(gaussian_mi(a, 3 * a)) > 5
    with pytest.raises(ValueError, match="one shape"):
        gaussian_mi(a, b.T)


def test_dependence_penalty_averages_shared_matrices_and_its_gradient_decorrelates():
    from mavis_align.baselines.mva import dependence_penalty, gaussian_mi

    g = torch.Generator().manual_seed(1)
    frozen = {"q": torch.randn(6, 6, generator=g), "v": torch.randn(6, 4, generator=g), "only_frozen": torch.randn(2, 2, generator=g)}
    B = (0.5 * frozen["q"] + 0.1 * torch.randn(6, 6, generator=g)).requires_grad_(True)
    mine = {"q": B, "v": frozen["v"] * 0.7 + 0.2 * torch.randn(6, 4, generator=g), "only_mine": torch.randn(3, 3, generator=g)}
    pen = dependence_penalty(mine, frozen).detach()
    assert float(pen) == pytest.approx(float((gaussian_mi(mine["q"], frozen["q"]) + gaussian_mi(mine["v"], frozen["v"])) / 2), rel=1e-6)
    opt = torch.optim.SGD([B], lr=0.05)
    first = float(gaussian_mi(B, frozen["q"]))
    for _ in range(50):
        opt.zero_grad()
        dependence_penalty(mine, frozen).backward()
        opt.step()
    assert float(gaussian_mi(B, frozen["q"])) < 0.5 * first  # only q's update trains: its dependence falls
    with pytest.raises(ValueError, match="in common"):
        dependence_penalty({"a": B}, {"b": B.detach()})


def _tiny_policy_folder(tmp_path, name, seed):
    """A policy folder (LoRA adapter + mavis_policy.json) around the tiny model, with random nonzero factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "m"
    if not base.exists():
        save_tiny_model(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = tmp_path / name
    model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    (out / "mavis_policy.json").write_text(json.dumps({"base": str(base)}))
    return out, model


def test_lora_deltas_of_a_live_model_equal_the_saved_adapter_and_the_merged_update(tmp_path):
    from transformers import AutoModelForCausalLM

    from mavis_align.baselines import adapter_deltas, lora_deltas

    folder, model = _tiny_policy_folder(tmp_path, "pa", 0)
    live, saved = lora_deltas(model), adapter_deltas(folder)
    assert sorted(live) == sorted(saved) and len(live) == 4  # 2 layers x (q, v)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    merged = model.merge_and_unload().state_dict()
    for key, delta in saved.items():
        torch.testing.assert_close(live[key].detach(), delta)
        torch.testing.assert_close(merged[key + ".weight"] - base[key + ".weight"], delta, atol=1e-6, rtol=1e-5)


def test_combine_interpolates_extrapolates_and_matches_soup(tmp_path):
    from mavis_align.baselines import combine, load_policy_model, soup

    pa, _ = _tiny_policy_folder(tmp_path, "pa", 0)
    pb, _ = _tiny_policy_folder(tmp_path, "pb", 1)
    ma = load_policy_model(pa)[0].state_dict()
    mb = load_policy_model(pb)[0].state_dict()
    one = combine([pa, pb], [1.0, 0.0])[0].state_dict()
    out = combine([pa, pb], [1.25, -0.25])[0].state_dict()
    mixed = soup([pa, pb], [3.0, 1.0])[0].state_dict()
    for k in ma:
        torch.testing.assert_close(one[k], ma[k], atol=1e-6, rtol=1e-6)  # lambda = (1, 0): adapter 1
        torch.testing.assert_close(out[k], ma[k] + 0.25 * (ma[k] - mb[k]), atol=1e-5, rtol=1e-5)  # beyond the simplex
        torch.testing.assert_close(mixed[k], 0.75 * ma[k] + 0.25 * mb[k], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=">= 0"):
        soup([pa, pb], [1.2, -0.2])


def test_decorrelated_adapter_trains_with_the_penalty_logged(tmp_path):
    from mavis_align.baselines import RLConfig, train_decorrelated_adapter, train_rl_policy

    d = tmp_path / "m"
    save_tiny_model(d)
    rl = RLConfig(steps=2, prompts_per_step=2, num_generations=2, max_completion_length=5)
    pa = train_rl_policy(str(d), PROMPTS * 2, {"concise": 1.0}, tmp_path / "a", rl, chat=False, progress=False)
    pb = train_decorrelated_adapter(str(d), PROMPTS * 2, {"positive": 1.0}, tmp_path / "b", rl, against=[pa], mi_weight=2.0,
                                    chat=False, progress=False)
    meta = json.loads((pb / "mavis_policy.json").read_text())
    assert meta["decorrelated"]["mi_weight"] == 2.0 and meta["decorrelated"]["against"] == [str(pa)]
    log = json.loads((pb / "log_history.json").read_text())
    assert any("penalty" in h and h["penalty"] >= 0 for h in log)
    with pytest.raises(ValueError, match="earlier adapter"):
        train_decorrelated_adapter(str(d), PROMPTS, {"positive": 1.0}, tmp_path / "c", rl, against=[], chat=False)


# ---------------------------------------------------------------------------------- the multi-head policy


def test_preference_pairs_and_dpo_loss():
    from mavis_align.baselines.multihead import dpo_loss, preference_pairs

    pairs = preference_pairs(["p", "q"], [["a", "b", "c"], ["x", "y", "z"]],
                             {"o1": [[0.1, 0.9, 0.5], [0.3, 0.31, 0.3]], "o2": [[0.5, 0.2, 0.1], [0.0, 1.0, 0.5]]}, min_margin=0.05)
    assert [(x["objective"], x["prompt"], x["chosen"], x["rejected"]) for x in pairs] == [
        ("o1", "p", "b", "a"), ("o2", "p", "a", "c"), ("o2", "q", "y", "x")]  # q's o1 rewards are within the margin
    pc, pr, rc, rr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -1.5]), torch.tensor([-3.5, -1.0]), torch.tensor([-3.5, -1.2])
    want = -torch.nn.functional.logsigmoid(0.1 * torch.tensor([0.5 - (-0.5), 0.0 - (-0.3)])).mean()
    assert float(dpo_loss(pc, pr, rc, rr, 0.1)) == pytest.approx(float(want))


def test_multihead_policy_trains_each_head_on_its_objective_and_one_hot_lambda_is_that_head(tmp_path, monkeypatch):
    """Heads start as the base head; DPO on objective a's pairs moves head a only (head b's delta stays 0)
    and raises a's implicit reward margin; the policy loaded at lambda = e_a has exactly head a's logits,
    at (0.5, 0.5) the mean of the two heads' logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from mavis_align.baselines import MultiHeadConfig, load_multihead_policy, train_multihead_policy
    from mavis_align.baselines.multihead import HeadDeltas, _encode, head_logits, sequence_logprob
    from mavis_align.models import load_causal_lm

    d = tmp_path / "m"
    save_tiny_model(d)
    out = tmp_path / "mh"
    out.mkdir()
    prompts = ["hello world", "why is the cat good", "what dog ran ?", "the mat"]
    # responses and rewards given (the sampling step is resumable from this file): only objective a has pairs
    (out / "responses.json").write_text(json.dumps({
        "prompts": prompts, "responses": [["good dog", "bad cat sat"]] * 4,
        "scores": {"a": [[1.0, 0.0]] * 4, "b": [[0.5, 0.5]] * 4}}))
    cfg = MultiHeadConfig(head_rank=4, lora_rank=4, epochs=4, batch_size=2, learning_rate=5e-3, dpo_beta=0.5)
    train_multihead_policy(str(d), prompts, ["a", "b"], out, cfg, chat=False, progress=False)
    meta = json.loads((out / "mavis_policy.json").read_text())
    assert meta["multihead"] == {"objectives": ["a", "b"], "pairs": {"a": 4, "b": 0}}
    heads = load_file(str(out / "heads.safetensors"))
    assert float(heads["B"][1].abs().max()) == 0.0 and float(heads["B"][0].abs().max()) > 0
    log = json.loads((out / "log_history.json").read_text())
    assert log[-1]["loss"] < log[0]["loss"]

    base, tok = load_causal_lm(str(d))
    trunk = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    hd = HeadDeltas(heads["A"].shape[2], heads["B"].shape[1], 2, 4)
    hd.load_state_dict(heads)
    ids, att, rm = _encode(tok, ["hello world"], ["good dog"])
    with torch.no_grad():
        la, lb = head_logits(trunk, hd, ids, att, 0), head_logits(trunk, hd, ids, att, 1)
        for lam, want in (({"a": 1.0}, la), ({"a": 1.0, "b": 0.0}, la), ({"b": 2.0}, lb), ({"a": 0.5, "b": 0.5}, (la + lb) / 2)):
            model, _ = load_multihead_policy(out, lam)
            torch.testing.assert_close(model(input_ids=ids, attention_mask=att).logits, want, atol=1e-4, rtol=1e-4)
        # the trained head prefers the chosen response more than pi_ref does
        with trunk.disable_adapter():
            ref = trunk(input_ids=ids, attention_mask=att).logits
        ids_r, att_r, rm_r = _encode(tok, ["hello world"], ["bad cat sat"])
        with trunk.disable_adapter():
            ref_r = trunk(input_ids=ids_r, attention_mask=att_r).logits
        margin = (sequence_logprob(la, ids, rm) - sequence_logprob(ref, ids, rm)) - (
            sequence_logprob(head_logits(trunk, hd, ids_r, att_r, 0), ids_r, rm_r) - sequence_logprob(ref_r, ids_r, rm_r))
        assert float(margin) > 0
    with pytest.raises(ValueError, match="heads"):
        load_multihead_policy(out, {"c": 1.0})
    with pytest.raises(FileNotFoundError, match="multi-head"):
        load_multihead_policy(tmp_path, {"a": 1.0})


# ---------------------------------------------------------------------------------- GRPO resume (all RL baselines)


def test_grpo_training_resumes_from_its_last_checkpoint_after_an_interruption(tmp_path, monkeypatch):
    """Interrupted after step 2 of 3, a rerun continues from checkpoint 2 and ends where an uninterrupted run ends."""
    from safetensors.torch import load_file
    from trl import GRPOTrainer

    from mavis_align.baselines import RLConfig, train_rl_policy

    d = tmp_path / "m"
    save_tiny_model(d)
    rl = RLConfig(steps=3, prompts_per_step=2, num_generations=2, max_completion_length=5, save_every=1)
    whole = train_rl_policy(str(d), PROMPTS * 2, {"concise": 1.0}, tmp_path / "whole", rl, chat=False, progress=False)
    assert not (whole / "trainer").exists()  # checkpoints are removed once the adapter is saved

    real_step = GRPOTrainer.training_step

    def interrupted(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_rl_policy(str(d), PROMPTS * 2, {"concise": 1.0}, tmp_path / "cut", rl, chat=False, progress=False)
    assert (tmp_path / "cut" / "trainer" / "checkpoint-2").is_dir() and not (tmp_path / "cut" / "mavis_policy.json").exists()
    monkeypatch.setattr(GRPOTrainer, "training_step", real_step)
    cut = train_rl_policy(str(d), PROMPTS * 2, {"concise": 1.0}, tmp_path / "cut", rl, chat=False, progress=False)
    log = json.loads((cut / "log_history.json").read_text())
    assert [h["step"] for h in log if "reward" in h] == [1, 2, 3]
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_multihead_sampled_responses_are_reused_only_with_the_same_settings(tmp_path):
    from mavis_align.baselines import MultiHeadConfig, train_multihead_policy

    d = tmp_path / "m"
    save_tiny_model(d)
    out = tmp_path / "mh"
    out.mkdir()
    stale = {"settings": {"samples_per_prompt": 99}, "prompts": ["hello world"], "responses": [["good", "bad"]], "scores": {"a": [[1.0, 0.0]]}}
    (out / "responses.json").write_text(json.dumps(stale))
    # other settings: the cache is ignored and sampling starts again (here it stops at the unknown reward "a")
    with pytest.raises(ValueError, match="unknown reward 'a'"):
        train_multihead_policy(str(d), ["hello world"], ["a"], out, MultiHeadConfig(max_new_tokens=4), chat=False, progress=False)
