"""--device / --dtype: resolution, that every model follows them (base, value, reward, reference for
KL), and that bf16 on the CPU agrees with the fp32 reference within stated tolerances (decode,
train, serve). Tolerances, measured on the tiny random models here:

* decode: teacher-forced along the same 4 x 16 tokens, the total-variation distance between the
  bf16 and fp32 MAVIS step distributions averages < 0.02 (measured 0.004; max 0.10: NORMALIZE
  stretches small value differences) and each row's eq. 7 log-ratio sum differs by < 0.1 nats
  (measured <= 0.02 of ~20);
* train: the held-out MSE of a value model trained in bf16 is within 25 % of the fp32 one
  (measured 0.01372 vs 0.01383, from 0.0485 untrained);
* serve: seeded requests to a bf16 server return the same text as to the fp32 one for >= 80 % of
  12 requests (measured 12 of 12), and the KL the server reports differs by < 0.25 nats on the
  ones that agree (measured <= 0.011).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny_lm, save_tiny_model
from mavis_align import placement
from mavis_align.decoding import SamplingConfig, bind_objectives
from mavis_align.decoding.decoder import MavisDecoder
from mavis_align.decoding.engine import decode_ids
from mavis_align.decoding.steppers import CachedBase, CachedValueScorer
from mavis_align.placement import Placement, placement_of, resolve, resolve_device, resolve_dtype, using
from test_decoding import make_value_model


# ------------------------------------------------------------------------------------ resolution


def test_auto_is_cpu_fp32_here_and_names_resolve():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve() == Placement(torch.device("cpu"), torch.float32)
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16 and resolve_dtype("FP32") is torch.float32
    with pytest.raises(ValueError, match="--dtype 'float8'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device torch knows"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="--device-map 'everywhere'"):
        resolve("cpu", "auto", "everywhere")


def test_using_nests_and_none_keeps_the_enclosing_part():
    with using(dtype="bfloat16") as outer:
        assert outer.dtype is torch.bfloat16 and placement.current() == outer
        with using(device="cpu") as inner:  # only the device named: the dtype stays bf16
            assert inner.dtype is torch.bfloat16
        with using(dtype="auto") as inner:
            assert inner.dtype is torch.float32  # auto on the CPU
        assert placement_of(dtype="float32").dtype is torch.float32 and placement_of() == outer
    assert placement.current().dtype is torch.float32


# ------------------------------------------------------------------------------------ every model follows


def test_dtype_reaches_base_value_reward_models_and_the_kl_reference(tmp_path, tiny_tokenizer):
    from mavis_align.rewards import get_reward
    from mavis_align.values import ValueModel
    from test_rewards import _save_tiny_classifier

    base = save_tiny_model(tmp_path / "m")
    make_value_model(tiny_tokenizer, ["a"], 1).save(tmp_path / "v")
    _save_tiny_classifier(tmp_path / "clf", tiny_tokenizer)
    with using(dtype="bfloat16"):
        dec = MavisDecoder.load(str(base), [f"a={tmp_path / 'v'}"])
        reward = get_reward(f"hf:{tmp_path / 'clf'}")
        loaded = ValueModel.load(tmp_path / "v")
    assert next(dec.model.parameters()).dtype is torch.bfloat16  # pi_ref, also the reference of the KL (eq. 7)
    vm = dec.value_models[0]
    assert next(vm.backbone.parameters()).dtype is torch.bfloat16 and next(loaded.backbone.parameters()).dtype is torch.bfloat16
    assert all(p.dtype is torch.float32 for p in vm.head.parameters())  # heads stay fp32
    assert len(reward(["hello"], ["the cat"])) == 1
    # the same spec on another placement is another model
    assert get_reward(f"hf:{tmp_path / 'clf'}", dtype="float32") is not get_reward(f"hf:{tmp_path / 'clf'}", dtype="bfloat16")
    # explicit arguments beat the current placement
    fp32 = MavisDecoder.load(str(base), [f"a={tmp_path / 'v'}"], dtype="float32")
    assert next(fp32.model.parameters()).dtype is torch.float32


def test_shipped_encoder_follows_the_reward_placement():
    from mavis_align.rewards import get_reward
    from mavis_align.rewards.encoder import default_encoder

    with using(dtype="bfloat16"):
        helpful = get_reward("helpful")
    helpful(["How do I bake bread?"], ["Mix flour and water."])  # scored later, in any thread: still bf16
    with using(dtype="bfloat16"):
        assert next(default_encoder().model.parameters()).dtype is torch.bfloat16
    assert next(default_encoder().model.parameters()).dtype is torch.float32


def test_cli_flags_reach_the_models_and_the_run_record(tmp_path, capsys, monkeypatch):
    from mavis_align.cli import main

    base = save_tiny_model(tmp_path / "m")
    seen = []
    real = MavisDecoder.load.__func__

    def spy(cls, *a, **k):
        dec = real(cls, *a, **k)
        seen.append(next(dec.model.parameters()).dtype)
        return dec

    monkeypatch.setattr(MavisDecoder, "load", classmethod(spy))
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--model", str(base), "--prompt", "hello", "--max-new-tokens", "3", "--no-chat", "--reward", "concise",
                 "--dtype", "bfloat16", "--output", str(out)]) == 0
    assert seen == [torch.bfloat16]
    assert json.loads((tmp_path / "g.run.json").read_text())["placement"] == "cpu bfloat16"
    capsys.readouterr()
    assert main(["generate", "--model", str(base), "--prompt", "hello", "--device", "cuda:7", "--reward", "concise"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:7" in err and "\n" not in err.strip()


# ------------------------------------------------------------------------------------ bf16 agrees with fp32


def _teacher_forced(lm, vms, ids, mask, forced, cfg, weights):
    dists = []
    rows = decode_ids(CachedBase(lm), ids, mask, cfg, eos_id=None, scorer=CachedValueScorer(vms, bind_objectives(vms)), weights=weights,
                      forced=forced, on_step=lambda t, d: dists.append(d))
    return rows, dists


def test_bf16_decode_agrees_with_fp32_within_tolerance(tiny_tokenizer):
    tok = tiny_tokenizer
    lm = make_tiny_lm(len(tok), seed=3)
    vms = [make_value_model(tok, ["a"], 1), make_value_model(tok, ["b"], 2)]
    enc = tok(["hello world the cat sat on the mat", "why", "what is a good dog ?", "a mat"], return_tensors="pt", padding=True)
    cfg = SamplingConfig(max_new_tokens=16, top_k=8, beta=3.0)
    w = torch.full((4, 2), 0.5)
    sampled = decode_ids(CachedBase(lm), enc["input_ids"], enc["attention_mask"], cfg, eos_id=None, generator=torch.Generator().manual_seed(0),
                         scorer=CachedValueScorer(vms, bind_objectives(vms)), weights=w)
    forced = [r.token_ids for r in sampled]
    r32, d32 = _teacher_forced(lm, vms, enc["input_ids"], enc["attention_mask"], forced, cfg, w)
    lm16 = copy.deepcopy(lm).to(torch.bfloat16)
    vms16 = [copy.deepcopy(v).place(dtype="bfloat16") for v in vms]
    r16, d16 = _teacher_forced(lm16, vms16, enc["input_ids"], enc["attention_mask"], forced, cfg, w)
    assert all(d.logp.dtype is torch.float32 and d.values.dtype is torch.float32 for d in d16)  # the tilt runs in fp32
    tv = torch.stack([0.5 * (a.full(len(tok)).exp() - b.full(len(tok)).exp()).abs().sum(-1) for a, b in zip(d32, d16)])
    assert tv.mean() < 0.02, tv
    kl32 = [sum(r.logprobs_gen) - sum(r.logprobs_ref) for r in r32]
    kl16 = [sum(r.logprobs_gen) - sum(r.logprobs_ref) for r in r16]
    assert max(abs(a - b) for a, b in zip(kl32, kl16)) < 0.1, (kl32, kl16)


def test_bf16_training_agrees_with_fp32_within_tolerance(tmp_path):
    from mavis_align.train import TrainConfig, train_value_model
    from mavis_align.train.regression import evaluate_mse
    from test_train import build_cat_trees, new_value_model

    trees = build_cat_trees()
    cfg = TrainConfig(lr=3e-3, epochs=4, batch_size=16, eval_every=0, warmup_steps=3)
    untrained = new_value_model()
    results = {}
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        vm = copy.deepcopy(untrained).place(dtype=dtype)
        results[name] = train_value_model(vm, [trees], tmp_path / name, cfg, progress=False)["final_val"]["val_mse"]
        if dtype == "bfloat16":
            assert next(vm.backbone.parameters()).dtype is torch.bfloat16 and vm.head.weight.dtype is torch.float32
    from mavis_align.train.regression import _load_examples

    val = _load_examples([trees], "val", cfg, ["cat"], False, 1.0)
    before = evaluate_mse(untrained, val, 1, 0.0)["val_mse"]
    assert results["fp32"] < 0.7 * before and results["bf16"] < 0.7 * before, (before, results)
    assert abs(results["bf16"] - results["fp32"]) < 0.25 * results["fp32"], results


def test_bf16_server_agrees_with_fp32_within_tolerance(tiny_tokenizer):
    from fastapi.testclient import TestClient

    from mavis_align.serve import create_app

    lm = make_tiny_lm(len(tiny_tokenizer), seed=3)
    vms = [make_value_model(tiny_tokenizer, ["concise"], 1), make_value_model(tiny_tokenizer, ["positive"], 2)]
    answers = {}
    for dtype in (torch.float32, torch.bfloat16):
        dec = MavisDecoder(copy.deepcopy(lm).to(dtype), tiny_tokenizer, [copy.deepcopy(v).place(dtype=dtype) for v in vms])
        app = create_app(dec, model_name="tiny")
        with TestClient(app) as client:
            answers[dtype] = [client.post("/v1/completions", json={"prompt": p, "max_tokens": 10, "seed": i, "objective_weights": {"concise": 0.5, "positive": 0.5},
                                                                   "beta": 2.0, "top_k": 6}).json()
                              for i, p in enumerate(["hello", "the cat", "why", "a dog ran"] * 3)]
        app.state.scheduler.shutdown()
    same = [(a, b) for a, b in zip(answers[torch.float32], answers[torch.bfloat16]) if a["choices"][0]["text"] == b["choices"][0]["text"]]
    assert len(same) >= 0.8 * 12, [(a["choices"][0]["text"], b["choices"][0]["text"]) for a, b in zip(answers[torch.float32], answers[torch.bfloat16])]
    assert max(abs(a["mavis"]["kl"] - b["mavis"]["kl"]) for a, b in same) < 0.25
