"""The neighbouring systems (issue 17): MVA-style decorrelated adapters (dependence penalty, weight-space
combination and extrapolation) and the MAHALO-style multi-head policy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_tokenizer, save_tiny_model

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
