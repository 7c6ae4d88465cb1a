"""Reward and KL of a decoding policy on held-out prompts (the measurement every stage shares).

KL follows paper eq. 7: the mean over sampled responses of sum_t log(pi(a_t|s_t) / pi_ref(a_t|s_t)),
with pi_ref over the full vocabulary; each :class:`~mavis_align.generation.Generation` carries
that sum as ``log_ratio``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence

from ..generation import Generation, SamplingConfig


def summarize(values: Sequence[float]) -> dict:
    """mean, std, standard error and count."""
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "se": float("nan"), "n": 0}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"mean": mean, "std": std, "se": std / math.sqrt(n), "n": n}


def evaluate_generations(gens: Sequence[Generation], rewards) -> dict:
    """Per-objective reward summaries, KL (eq. 7) and length of already decoded responses."""
    prompts, texts = [g.prompt for g in gens], [g.text for g in gens]
    out = {"rewards": {}}
    for r in rewards:
        values = [float(v) for v in r(prompts, texts)]
        out["rewards"][r.name] = {**summarize(values), "values": values}  # per response, in order (paired comparisons)
    out["kl"] = summarize([g.log_ratio for g in gens])
    out["length"] = summarize([float(len(g.token_ids)) for g in gens])
    return out


def evaluate_decoder(
    decoder,
    prompts: Sequence[str],
    rewards,
    *,
    weights: Mapping[str, float] | None = None,
    beta: float | None = None,
    config: SamplingConfig = SamplingConfig(max_new_tokens=64, top_k=15),
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool | None = None,
) -> dict:
    """Decode ``samples`` responses per prompt with a :class:`MavisDecoder` and score them."""
    many = [p for p in prompts for _ in range(samples)]
    t0 = time.perf_counter()
    gens = decoder.generate(many, weights=weights, beta=beta, config=config, seed=seed, batch_size=batch_size, chat=chat)
    seconds = time.perf_counter() - t0
    res = evaluate_generations(gens, rewards)
    n_tok = sum(len(g.token_ids) for g in gens)
    res.update({"tokens_per_s": n_tok / max(seconds, 1e-9), "responses": len(gens), "weights": dict(weights or {}), "beta": beta})
    res["examples"] = [{"prompt": g.prompt, "response": g.text, "kl": g.log_ratio} for g in gens[: min(len(gens), 4)]]
    return res
