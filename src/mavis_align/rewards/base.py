"""The reward contract: a named, documented, batched callable over (prompts, responses)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass(frozen=True)
class Reward:
    """A reward function with its documentation.

    Attributes:
        name: registry name (also the objective name used by value models and decoding).
        description: one line saying what it measures.
        value_range: (low, high) of the scores; ``float('-inf')``/``inf`` when unbounded.
        higher_is_better: direction of preference.
        fn: batched scorer; gets equally long lists and returns one float per pair.
        batch_size: calls to ``fn`` see at most this many pairs.
    """

    name: str
    description: str
    value_range: tuple[float, float]
    higher_is_better: bool
    fn: RewardFn
    batch_size: int = 64

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Score each (prompt, response) pair -> list of floats, same order."""
        if isinstance(prompts, str) or isinstance(responses, str):
            raise TypeError("pass lists of prompts and responses, not single strings")
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"reward {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        out: list[float] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = [float(x) for x in self.fn(prompts[s : s + self.batch_size], responses[s : s + self.batch_size])]
            if len(chunk) != len(prompts[s : s + self.batch_size]):
                raise RuntimeError(f"reward {self.name!r} returned {len(chunk)} scores for {len(prompts[s:s+self.batch_size])} pairs")
            out.extend(chunk)
        return out
