"""Shared fixtures: a tiny word-level tokenizer and tiny random models, all built in code.

No test touches the network or a model hub: hub access is switched off for the whole session.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# trackio reads its folder once at import: tests log to a throwaway one, never to ~/.cache
os.environ["TRACKIO_DIR"] = __import__("tempfile").mkdtemp(prefix="mavis-test-trackio-")

import contextlib

import pytest
import torch

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "is", "good", "bad", "why", "what", "how", "yes", "no", "?", "."]


def make_tiny_tokenizer():
    """Word-level fast tokenizer: <eos>=0, <pad>=1, <bos>=2, <unk>=3, then WORDS; pads on the left."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def make_tiny_lm(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0, pad_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(folder, seed: int = 3):
    """Save a tiny random LM and its tokenizer to ``folder`` (a model path usable by every CLI/API) -> folder."""
    tok = make_tiny_tokenizer()
    make_tiny_lm(len(tok), seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """Run an ASGI ``app`` with uvicorn on a free 127.0.0.1 port in a thread -> its base URL."""
    import threading
    import time

    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    return make_tiny_lm(len(tiny_tokenizer))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch, request):
    """Unit tests get an empty cache dir; integration tests keep the real one (converted model)."""
    if "integration" not in request.keywords:
        monkeypatch.setenv("MAVIS_ALIGN_CACHE", str(tmp_path / "cache"))
