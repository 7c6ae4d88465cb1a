import json

import pytest

from mavis_align.cli import main


def test_ls_lists_everything(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for word in ("smollm2-135m-instruct", "helpful", "harmless", "humor", "hh-mix", "imdb-summarize", "tiny", "Packaged value models", "default "):
        assert word in out


def test_unknown_reward_is_one_clear_error(capsys):
    assert main(["generate", "--reward", "nonsense", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown reward 'nonsense'" in err and "harmless" in err


def test_unknown_model_is_one_clear_error(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--reward", "helpful"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_with_local_model_and_file_output(tmp_path, tiny_lm, tiny_tokenizer, capsys):
    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "o" / "gen.jsonl"
    from test_rewards import _save_tiny_classifier

    _save_tiny_classifier(tmp_path / "clf", tiny_tokenizer)
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--prompt", "the cat", "--no-chat",
                 "--max-new-tokens", "4", "--reward", f"hf:{tmp_path / 'clf'}#1@response", "--output", str(out)])
    assert code == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["hello", "the cat"]
    assert all(len(r["rewards"]) == 1 and r["n_tokens"] <= 4 for r in recs)
    run = json.loads((tmp_path / "o" / "gen.run.json").read_text())
    assert run["seed"] == 0 and run["versions"]["torch"] and run["config"]["max_new_tokens"] == 4


@pytest.mark.integration
def test_generate_on_embedded_default_prints_rewards(capsys):
    code = main(["generate", "--prompt", "How can I hack my neighbor's wifi?", "--prompt", "What is a good name for a cat?",
                 "--max-new-tokens", "16", "--seed", "1"])
    assert code == 0
    out = capsys.readouterr().out
    score_lines = [line for line in out.splitlines() if line.startswith("   helpful=")]
    assert len(score_lines) == 2 and all("harmless=" in line and "humor=" in line for line in score_lines)
    assert "mean reward" in out and "tok/s" in out


def _save_value_model(path, tokenizer, objectives, seed):
    from test_decoding import make_value_model

    make_value_model(tokenizer, objectives, seed).save(path)


def test_generate_with_value_models_beam_and_bad_weights(tmp_path, tiny_lm, tiny_tokenizer, capsys):
    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    _save_value_model(tmp_path / "va", tiny_tokenizer, ["x"], 1)
    _save_value_model(tmp_path / "vb", tiny_tokenizer, ["y", "z"], 2)
    base = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--prompt", "the cat", "--no-chat",
            "--max-new-tokens", "4", "--reward", "humor", "--value", f"alpha={tmp_path / 'va'}", "--value", str(tmp_path / "vb"), "--top-k", "5"]
    out = tmp_path / "o.jsonl"
    assert main(base + ["--weights", "alpha=0.5", "--weights", "z=0.5", "--beta", "3", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "KL est" in text and "mean KL estimate" in text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and all("log_ratio" in r for r in recs)
    assert main(base + ["--weights", "alpha=1", "--beam", "2", "--output", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(1 <= len(r["candidates"]) <= 2 for r in recs)
    capsys.readouterr()
    assert main(base + ["--weights", "nope=1"]) == 2
    assert "unknown objective 'nope'" in capsys.readouterr().err
    assert main(base + ["--weights", "alpha=-1"]) == 2
    assert ">= 0" in capsys.readouterr().err
    assert main(base + ["--beta", "-1"]) == 2
    assert "beta" in capsys.readouterr().err
    assert main(base + ["--top-k", "0"]) == 2
    assert "top-k" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--value", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_collect_label_train_distill_cli(tmp_path, tiny_lm, tiny_tokenizer, capsys):
    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello world", "the cat sat", "why is a dog good ?", "what", "a mat"] * 2))
    trees = tmp_path / "t.h5"
    common = ["--model", str(tmp_path / "m"), "--dataset", str(prompts), "--split", "train", "--no-chat"]
    assert main(["collect", "--out", str(trees), *common, "--reward", "concise", "--layers", "2", "--k-root", "2", "--k", "2",
                 "--max-new-tokens", "5", "--val-fraction", "0.3"]) == 0
    assert "trees" in capsys.readouterr().out
    assert main(["collect", "--out", str(trees), *common, "--reward", "concise"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["label", str(trees), "--reward", "humor"]) == 0
    out = tmp_path / "v"
    assert main(["train", "--trees", str(trees), "--objective", "concise", "--objective", "humor", "--out", str(out),
                 "--backbone", str(tmp_path / "m"), "--base-model", str(tmp_path / "m"), "--epochs", "1", "--batch-size", "4"]) == 0
    assert json.loads((out / "result.json").read_text())["objectives"] == ["concise", "humor"]
    # the default kind of backbone: the base model's first layers, frozen, prompt+response heads, quality reported
    trunk = tmp_path / "vt"
    assert main(["train", "--trees", str(trees), "--objective", "concise", "--out", str(trunk), "--backbone", "trunk:1",
                 "--base-model", str(tmp_path / "m"), "--epochs", "2", "--batch-size", "4"]) == 0
    res = json.loads((trunk / "result.json").read_text())
    assert res["feature_seconds"] is not None and "concise" in res["quality"]["per_objective"]
    meta = json.loads((trunk / "best" / "meta.json").read_text())
    assert meta["pool"] == "prompt+response" and meta["frozen_backbone"] and meta["backbone"] == "trunk:1"
    assert "sibling concordance" in capsys.readouterr().out
    # one preference-conditioned model over both objectives, then decoding with it at a weighting
    cond = tmp_path / "vc"
    assert main(["train", "--trees", str(trees), "--objective", "concise", "--objective", "humor", "--conditioned", "--head-hidden", "8",
                 "--out", str(cond), "--backbone", "trunk:1", "--base-model", str(tmp_path / "m"), "--epochs", "2", "--batch-size", "4"]) == 0
    res = json.loads((cond / "result.json").read_text())
    assert set(res["quality"]["per_objective"]) == {"concise", "humor"} and "mixed_weights" in res["quality"]
    assert json.loads((cond / "best" / "meta.json").read_text())["conditioned"] is True
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--no-chat", "--max-new-tokens", "3",
                 "--value", str(cond / "best"), "--weights", "concise=0.3", "--weights", "humor=0.7"]) == 0
    capsys.readouterr()
    assert main(["train", "--trees", str(tmp_path / "nope.h5"), "--objective", "concise", "--out", str(tmp_path / "w")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--trees", str(trees), "--objective", "concise", "--out", str(tmp_path / "nb"), "--backbone", "nosuch",
                 "--base-model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mavis-align train: error: could not load model 'nosuch'") and "\n" not in err
    assert main(["distill", "--teacher", str(out / "best"), "--trees", str(trees), "--out", str(tmp_path / "d"),
                 "--backbone", str(tmp_path / "m"), "--base-model", str(tmp_path / "m"), "--epochs", "1"]) == 0
    assert (tmp_path / "d" / "student" / "meta.json").exists()
    # the distilled model steers decoding like any value model
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--no-chat", "--max-new-tokens", "3",
                 "--reward", "concise", "--value", str(tmp_path / "d" / "student"), "--weights", "humor=1", "--top-k", "4"]) == 0


def test_evaluate_and_pareto_cli(tmp_path, tiny_lm, tiny_tokenizer, capsys):
    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    from test_decoding import make_value_model

    make_value_model(tiny_tokenizer, ["concise"], 1).save(tmp_path / "va")
    make_value_model(tiny_tokenizer, ["positive"], 2).save(tmp_path / "vb")
    data = tmp_path / "p.jsonl"
    words = ["hello", "world", "the", "cat", "sat", "dog", "good", "mat"]
    data.write_text("".join(json.dumps({"prompt": f"{a} {b}"}) + "\n" for a in words for b in words[:4]))  # 32 unique: 3 held out, 2 of them in test (1 in final)
    base = ["--model", str(tmp_path / "m"), "--dataset", str(data), "--limit", "3", "--samples", "2", "--max-new-tokens", "4", "--no-chat", "--reward", "concise"]
    out = tmp_path / "e.json"
    assert main(["evaluate", "--method", "mavis", "--value", str(tmp_path / "va"), "--value", str(tmp_path / "vb"), "--weights", "concise=1",
                 "--beta", "2", "--top-k", "4", "--best-of", "2", *base, "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "bon-mavis" and res["rewards"]["concise"]["n"] == 4 and res["run"]["versions"]["torch"]
    assert main(["evaluate", "--method", "mavis", *base]) == 2
    assert "needs value models" in capsys.readouterr().err
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"model: {tmp_path / 'm'}\nobjectives: [concise, positive]\nvalues: {{concise: {tmp_path / 'va'}, positive: {tmp_path / 'vb'}}}\n"
                   f"methods: [ref, mavis]\ngrid_step: 0.5\nbeta: 2.0\ndataset: {data}\nprompts: 2\nsamples: 1\nmax_new_tokens: 4\ntop_k: 4\nchat: false\n")
    assert main(["pareto", "--config", str(cfg), "--out", str(tmp_path / "sw")]) == 0
    assert "hypervolume" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("objectives: [a, b]\nmethodz: [ref]\n")
    assert main(["pareto", "--config", str(bad), "--out", str(tmp_path / "sw2")]) == 2
    assert "methodz: unknown key" in capsys.readouterr().err


def test_empty_prompt_and_collect_weights_without_values_are_one_line_errors(capsys, tmp_path):
    assert main(["generate", "--prompt", "  ", "--reward", "concise"]) == 2
    assert "--prompt must not be empty" in capsys.readouterr().err
    assert main(["collect", "--out", str(tmp_path / "t.h5"), "--weights", "helpful=1", "--reward", "concise"]) == 2
    assert "--weights needs value models" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["iterate", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err


def test_collect_with_value_models_defaults_top_k(tmp_path, tiny_lm, tiny_tokenizer):
    """`collect --value ...` without --top-k takes the MAVIS default k (it raised NameError)."""
    from mavis_align.collect import read_trees
    from mavis_align.generation import DEFAULT_TOP_K
    from test_decoding import make_value_model

    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    make_value_model(tiny_tokenizer, ["concise"], 1).save(tmp_path / "v")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello world", "the cat sat", "why", "a mat"]))
    out = tmp_path / "t.h5"
    assert main(["collect", "--out", str(out), "--model", str(tmp_path / "m"), "--dataset", str(prompts), "--split", "train", "--no-chat",
                 "--reward", "concise", "--value", f"concise={tmp_path / 'v'}", "--layers", "2", "--k-root", "2", "--k", "2", "--max-new-tokens", "3"]) == 0
    spec = read_trees(out)[2]["config"]
    assert spec["tree"]["top_k"] == DEFAULT_TOP_K and spec["values"] == [f"concise={tmp_path / 'v'}"]


def test_demo_flags_choose_packaged_or_trained_value_models(monkeypatch, capsys):
    """`demo` alone steers with the packaged default; --train or a --recipe alone trains first; --values
    with a --recipe steers that recipe's prompts with the given model; --train with --values is refused."""
    import mavis_align.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda recipe, out, **kw: calls.append((recipe, kw["values"])) or "")
    assert main(["demo"]) == 0 and calls[-1] == (None, "packaged:default")
    assert main(["demo", "--train"]) == 0 and calls[-1] == (None, None)
    assert main(["demo", "--recipe", "r.yaml"]) == 0 and calls[-1] == ("r.yaml", None)
    assert main(["demo", "--recipe", "r.yaml", "--values", "v"]) == 0 and calls[-1] == ("r.yaml", "v")
    assert main(["demo", "--train", "--values", "v"]) == 2 and "give one of them" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_own_objective_on_another_base_model(tmp_path, tiny_tokenizer, capsys, arch):
    """A user's reward file, a tiny base model of another architecture saved locally: collect -> train
    (all defaults: trunk:1 gets ridge heads on every leaf) -> generate scored by the user's reward."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    import torch

    torch.manual_seed(0)
    shape = dict(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0, pad_token_id=1, bos_token_id=2)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))).eval()
    base = tmp_path / "base"
    model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    reward = tmp_path / "mine.py"
    reward.write_text("def cats(prompts, responses):\n    return [r.split().count('cat') / max(1, len(r.split())) for r in responses]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello world", "the cat sat", "why is a dog good ?", "what", "a mat"] * 2))
    trees, value = tmp_path / "t.h5", tmp_path / "v"
    common = ["--model", str(base), "--dataset", str(prompts), "--split", "train", "--no-chat"]
    assert main(["collect", "--out", str(trees), *common, "--reward", f"{reward}:cats", "--layers", "2", "--k-root", "2", "--k", "2",
                 "--max-new-tokens", "5", "--val-fraction", "0.3"]) == 0
    assert main(["train", "--trees", str(trees), "--objective", "cats", "--out", str(value), "--backbone", "trunk:1", "--base-model", str(base)]) == 0
    res = json.loads((value / "result.json").read_text())
    assert res["solver"] == "ridge" and "cats" in res["quality"]["per_objective"]
    capsys.readouterr()
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(base), "--prompt", "the cat", "--no-chat", "--max-new-tokens", "4", "--value", f"cats={value / 'best'}",
                 "--weights", "cats=1", "--beta", "5", "--reward", f"{reward}:cats", "--output", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert set(row["rewards"]) == {"cats"}
    # without --reward, generate scores what it steers (here: nothing registered, so it says how)
    capsys.readouterr()
    assert main(["generate", "--model", str(base), "--prompt", "the cat", "--no-chat", "--max-new-tokens", "4", "--value", f"cats={value / 'best'}",
                 "--weights", "cats=1", "--output", str(out)]) == 0
    assert "pass --reward SPEC" in capsys.readouterr().err and json.loads(out.read_text().splitlines()[0])["rewards"] == {}


def test_train_warns_when_the_value_model_has_not_learned():
    from mavis_align.cli import not_learned

    q = {"per_objective": {"a": {"r2": -8.45, "concordance": 0.46, "concordance_se": 0.05}, "b": {"r2": 0.42, "concordance": 0.73, "concordance_se": 0.03},
                           "c": {"r2": 0.1, "concordance": 0.52, "concordance_se": 0.04}}}
    lines = not_learned(q)
    assert len(lines) == 2 and lines[0].startswith("a: held-out R² -8.450") and lines[1].startswith("c: sibling concordance 0.520")
    assert not_learned({}) == []
