import json
import shutil

import pytest
import torch

from mavis_align.values import (
    TokenizerMismatchError,
    ValueModel,
    ValueModelError,
    check_tokenizer,
    pca_embeddings,
    tiny_llama_backbone,
    tokenizer_fingerprint,
    truncated_backbone,
)


@pytest.fixture
def vm(tiny_tokenizer):
    net = tiny_llama_backbone(len(tiny_tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=0)
    return ValueModel(net, ["helpful", "harmless"], tokenizer_fingerprint(tiny_tokenizer), {"note": "test"}, tiny_tokenizer).eval()


def test_score_reads_last_real_token_for_any_padding(vm, tiny_tokenizer):
    texts = ["hello world the cat sat", "why ?", "the dog"]
    single = torch.cat([vm.score(*tiny_tokenizer(t, return_tensors="pt").values()) for t in texts])
    for side in ("left", "right"):
        tiny_tokenizer.padding_side = side
        enc = tiny_tokenizer(texts, return_tensors="pt", padding=True)
        batched = vm.score(enc["input_ids"], enc["attention_mask"])
        assert batched.shape == (3, 2)
        assert torch.allclose(batched, single, atol=1e-5), side
    tiny_tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="at least one real token"):
        vm.score(torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2))


def test_forward_gives_every_prefix_value(vm, tiny_tokenizer):
    ids = tiny_tokenizer("hello world the cat", return_tensors="pt")["input_ids"]
    all_pos = vm(ids).values
    assert all_pos.shape == (1, ids.shape[1], 2)
    for t in range(1, ids.shape[1] + 1):
        prefix = vm.score(ids[:, :t], torch.ones(1, t))
        assert torch.allclose(prefix, all_pos[:, t - 1], atol=1e-5)
    assert vm.objective_index("harmless") == 1
    with pytest.raises(ValueError, match="has no objective 'humor'"):
        vm.objective_index("humor")


def test_save_load_roundtrip(vm, tiny_tokenizer, tmp_path):
    enc = tiny_tokenizer(["hello world", "the cat sat on"], return_tensors="pt", padding=True)
    vm.save(tmp_path / "v")
    back = ValueModel.load(tmp_path / "v")
    assert back.objectives == ["helpful", "harmless"] and back.meta["note"] == "test"
    assert torch.allclose(back.score(enc["input_ids"], enc["attention_mask"]), vm.score(enc["input_ids"], enc["attention_mask"]), atol=1e-6)
    check_tokenizer(back, tiny_tokenizer)
    assert back.tokenizer is not None and back.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert not list(tmp_path.glob(".v-*")), "no temp folder left behind"
    assert not list((tmp_path / "v").rglob("*.bin")) and not list((tmp_path / "v").rglob("*.pt")), "no pickle files"


def test_corrupt_or_mismatched_folders_explain_themselves(vm, tmp_path):
    vm.save(tmp_path / "v")
    with pytest.raises(ValueModelError, match="does not exist"):
        ValueModel.load(tmp_path / "missing")

    def broken(name, mutate):
        d = tmp_path / name
        shutil.copytree(tmp_path / "v", d)
        mutate(d)
        return d

    with pytest.raises(ValueModelError, match="meta.json is missing"):
        ValueModel.load(broken("a", lambda d: (d / "meta.json").unlink()))
    with pytest.raises(ValueModelError, match="not valid JSON"):
        ValueModel.load(broken("b", lambda d: (d / "meta.json").write_text("{oops")))

    def bump(d):
        m = json.loads((d / "meta.json").read_text())
        m["format_version"] = 99
        (d / "meta.json").write_text(json.dumps(m))

    with pytest.raises(ValueModelError, match="format_version 99"):
        ValueModel.load(broken("c", bump))

    def more_objectives(d):
        m = json.loads((d / "meta.json").read_text())
        m["objectives"] = ["a", "b", "c"]
        (d / "meta.json").write_text(json.dumps(m))

    with pytest.raises(ValueModelError, match=r"expected \{'weight': \[3, 32\]"):
        ValueModel.load(broken("d", more_objectives))
    with pytest.raises(ValueModelError, match="heads.safetensors could not be read"):
        ValueModel.load(broken("e", lambda d: (d / "heads.safetensors").write_bytes(b"garbage")))
    with pytest.raises(ValueModelError, match="backbone/config.json is missing"):
        ValueModel.load(broken("f", lambda d: (d / "backbone" / "config.json").unlink()))


def test_other_tokenizer_is_refused(vm, tiny_tokenizer):
    from conftest import make_tiny_tokenizer

    tok2 = make_tiny_tokenizer()
    tok2.add_tokens(["zebra"])
    with pytest.raises(TokenizerMismatchError, match="different tokenizer"):
        check_tokenizer(vm, tok2)
    tok3 = make_tiny_tokenizer()
    tok3.padding_side = "right"  # padding choices do not change the fingerprint
    check_tokenizer(vm, tok3)


def test_lora_trains_adapters_only_and_saves_merged(vm, tiny_tokenizer, tmp_path):
    enc = tiny_tokenizer(["hello world", "the cat sat"], return_tensors="pt", padding=True)
    vm.add_lora(rank=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in vm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    with torch.no_grad():  # move the adapters away from their zero init
        for n, p in vm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    want = vm.score(enc["input_ids"], enc["attention_mask"])
    vm.save(tmp_path / "lora")
    back = ValueModel.load(tmp_path / "lora")
    assert back.meta["lora"]["rank"] == 4 and not back.is_lora
    assert torch.allclose(back.score(enc["input_ids"], enc["attention_mask"]), want, atol=1e-5)


def test_pca_embeddings_and_truncation(tiny_lm):
    emb = pca_embeddings(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), 4)
    assert emb.shape == (50, 4) and emb.std().item() == pytest.approx(0.02, rel=1e-3)
    cut = truncated_backbone(tiny_lm, 1)
    assert len(cut.layers) == 1 and cut.config.num_hidden_layers == 1 and len(tiny_lm.model.layers) == 2
    with pytest.raises(ValueError, match="num_layers"):
        truncated_backbone(tiny_lm, 3)


@pytest.mark.integration
def test_default_value_model_on_real_base(tmp_path):
    from mavis_align.models import load_tokenizer
    from mavis_align.values import build_value_model

    vm = build_value_model(["helpful", "harmless", "humor"], backbone="tiny")
    n = sum(p.numel() for p in vm.parameters())
    assert 6.5e6 < n < 7.5e6
    tok = load_tokenizer("smollm2-135m-instruct")
    check_tokenizer(vm, tok)
    enc = tok(["Hello there", "How do I bake bread?"], return_tensors="pt", padding=True)
    assert vm.score(enc["input_ids"], enc["attention_mask"]).shape == (2, 3)
    vm.save(tmp_path / "v")
    check_tokenizer(ValueModel.load(tmp_path / "v"), tok)


def test_trunk_model_saved_without_its_backbone_rebuilds_it_from_the_base(tmp_path):
    """A frozen trunk:N model can be saved as heads + meta only; loading rebuilds the trunk from the
    base model named in meta.json (the same values) and refuses a base whose first N layers changed."""
    from conftest import make_tiny_tokenizer, save_tiny_model

    from mavis_align.models import load_causal_lm

    base = save_tiny_model(tmp_path / "base", seed=3)
    lm, tok = load_causal_lm(str(base), dtype=torch.float32)
    vm = ValueModel(truncated_backbone(lm, 1), ["a", "b"], tokenizer_fingerprint(make_tiny_tokenizer()), {"backbone": "trunk:1", "base_model": str(base)},
                    tok, pool="prompt+response")
    vm.freeze_backbone()
    vm.set_pool_centre(torch.randn(vm.hidden_size), torch.randn(vm.hidden_size))
    with torch.no_grad():
        vm.head.weight.normal_()
    vm.save(tmp_path / "v", with_backbone=False)
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["heads.safetensors", "meta.json"]
    back = ValueModel.load(tmp_path / "v")
    ids, plen = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([2])
    with torch.no_grad():
        assert torch.allclose(back(ids, prompt_lengths=plen).values, vm(ids, prompt_lengths=plen).values, atol=1e-6)
    assert back.trunk_key == vm.trunk_key and back.tokenizer is not None
    check_tokenizer(back, tok)
    back.save(tmp_path / "v2")  # saved again in full: the ordinary folder
    assert (tmp_path / "v2" / "backbone").is_dir() and "backbone_saved" not in json.loads((tmp_path / "v2" / "meta.json").read_text())
    save_tiny_model(tmp_path / "base", seed=4)  # another base under the same name
    with pytest.raises(ValueModelError, match="not the weights these heads were trained on"):
        ValueModel.load(tmp_path / "v")
    with pytest.raises(ValueModelError, match="only a frozen trunk:N"):
        ValueModel(tiny_llama_backbone(len(tok), hidden_size=32, num_layers=1, num_heads=4), ["a"], tokenizer_fingerprint(tok)).save(tmp_path / "x", with_backbone=False)


def test_packaged_value_model_source():
    from mavis_align.hub import packaged_value_models, resolve_value_source

    assert "default" in packaged_value_models()
    folder = resolve_value_source("packaged:default")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["backbone_saved"] is False and meta["objectives"] == ["helpful", "harmless", "humor"] and not (folder / "backbone").exists()
    assert set(meta["provenance"]["held_out_quality"]) == {"helpful", "harmless", "humor"}  # recorded; recomputed in the next test
    with pytest.raises(ValueModelError, match="no packaged value model 'nope'; shipped: default"):
        resolve_value_source("packaged:nope")


@pytest.mark.integration
def test_packaged_default_has_learned_on_held_out_trees_it_never_saw():
    """Recomputed, not read from meta.json: packaged:default on the trees of 24 hh-mix val (dev) prompts, shipped
    for this test (tests/data/heldout-val24.h5, from `mavis-align collect --out F --split val --limit 24 --seed 777
    --layers 3 --k-root 4 --k 2 --max-new-tokens 40 --val-fraction 0.999`; the model was trained on train prompts).
    Thresholds fixed before the file was first read: R² >= 0.2 for every head; sibling concordance >= 0.55 for
    helpful and humor (406 pairs each) and > 0.5 for harmless (46 pairs). The same model with a random head fails."""
    from pathlib import Path

    from mavis_align.train.regression import held_out_quality

    trees = Path(__file__).parent / "data" / "heldout-val24.h5"
    vm = ValueModel.load("packaged:default")
    q = held_out_quality(vm, [trees])["per_objective"]
    assert set(q) == {"helpful", "harmless", "humor"}
    assert all(q[m]["r2"] >= 0.2 for m in q), q
    assert q["helpful"]["concordance"] >= 0.55 and q["humor"]["concordance"] >= 0.55 and q["harmless"]["concordance"] > 0.5, q
    assert q["helpful"]["pairs"] >= 300 and q["harmless"]["pairs"] >= 30
    with torch.no_grad():
        w = vm.head.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * float(w.std()))
    broken = held_out_quality(vm, [trees])["per_objective"]
    assert all(broken[m]["r2"] < 0.2 for m in broken), broken


def test_packaged_default_loads_on_the_real_base():
    """Integration: the shipped heads' trunk is rebuilt from the embedded default and matches its fingerprint."""
    from mavis_align.models import load_tokenizer

    vm = ValueModel.load("packaged:default")
    assert vm.objectives == ["helpful", "harmless", "humor"] and vm.trunk_source == ("smollm2-135m-instruct", 4)
    tok = load_tokenizer("smollm2-135m-instruct")
    check_tokenizer(vm, tok)
    enc = tok(["How do I bake bread?"], return_tensors="pt")
    assert vm.score(enc["input_ids"], enc["attention_mask"], prompt_lengths=torch.tensor([3])).shape == (1, 3)
