"""Pure sampling helpers over logits. Inputs are never modified in place."""

from __future__ import annotations

import torch


def top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the ``k`` largest logits of each row to -inf.

    Args:
        logits: [..., V] float tensor.
        k: number of entries kept per row (clipped to V).
    Returns:
        A new [..., V] tensor.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_from_logits(logits: torch.Tensor, *, generator: torch.Generator | None, greedy: bool = False) -> torch.Tensor:
    """Draw one index per row of ``logits`` ([B, V]) -> [B] long.

    Greedy takes the argmax (first index on ties); otherwise it samples from softmax(logits)
    with the given generator.
    """
    if greedy:
        return torch.argmax(logits, dim=-1)
    if generator is None:
        raise ValueError("sampling needs an explicit torch.Generator")
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
