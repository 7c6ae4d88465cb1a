import pytest

from mavis_align import paths
from mavis_align.models import EMBEDDED_MODELS, ModelNotFoundError, format_prompts, load_causal_lm, load_tokenizer, resolve_model


def test_missing_path_lists_embedded_models(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        resolve_model(str(tmp_path / "nope"))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_unknown_hub_name_offline_is_clear():
    with pytest.raises(ModelNotFoundError) as info:
        load_causal_lm("no-such-org/no-such-model-xyz")
    msg = str(info.value)
    assert "smollm2-135m-instruct" in msg and "HF_HUB_OFFLINE=1" in msg


def test_local_folder_uses_from_pretrained(tmp_path, tiny_lm, tiny_tokenizer):
    tiny_lm.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, tok = load_causal_lm(str(tmp_path / "m"))
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_lm.parameters())
    assert not model.training


def test_format_prompts_plain_and_chat(tiny_tokenizer):
    assert format_prompts(tiny_tokenizer, ["hi"], chat=None) == ["hi"]  # no template -> raw text
    with pytest.raises(ValueError, match="chat template"):
        format_prompts(tiny_tokenizer, ["hi"], chat=True)


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MAVIS_ALIGN_CACHE", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_missing_wheel_names_install_command():
    with pytest.raises(paths.MissingWheelError, match="pip install"):
        paths.wheel_dir("surely_not_an_installed_package_xyz")


@pytest.mark.integration
def test_embedded_default_loads_offline_with_chat_template():
    name = "smollm2-135m-instruct"
    assert name in EMBEDDED_MODELS
    model, tok = load_causal_lm(name)
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(134.5, abs=0.5)
    text = format_prompts(tok, ["What is 2+2?"])[0]
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert (paths.cache_dir() / "models" / f"{name}-fp32" / "model.safetensors").is_file()
    assert load_tokenizer(name).get_vocab() == tok.get_vocab()
