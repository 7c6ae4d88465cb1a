"""Exact soft-optimal values on a small enumerable token MDP (for verifying the decoder and,
later, value training).

The MDP: a fixed prompt, responses of exactly ``horizon`` tokens over a vocabulary of ``V``
tokens (no EOS), pi_ref given by a causal LM, and a reward on whole responses. With
regularisation eta:

    V*(s)   = eta · log E_{y ~ pi_ref(.|s)} [exp(R(y) / eta)]          (soft value of prefix s)
    pi*(y) ∝ pi_ref(y) · exp(R(y) / eta)                               (optimal KL-regularised policy)

and the token-level policy pi(a|s) ∝ pi_ref(a|s) exp(V*(s ⊕ a) / eta) reproduces pi* exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch

Seq = tuple[int, ...]


class TokenMDP:
    """All responses of length ``horizon`` over ``vocab_size`` tokens after ``prompt`` under ``model``.

    Args:
        model: a transformers causal LM (pi_ref), vocabulary of ``vocab_size``.
        prompt: prompt token ids.
        horizon: response length H (V^H responses are enumerated: keep it small).
    """

    def __init__(self, model, prompt: Sequence[int], vocab_size: int, horizon: int):
        if vocab_size ** horizon > 200_000:
            raise ValueError(f"{vocab_size}^{horizon} sequences is too many to enumerate")
        self.prompt = list(prompt)
        self.vocab_size = vocab_size
        self.horizon = horizon
        self.sequences: list[Seq] = list(itertools.product(range(vocab_size), repeat=horizon))
        self._cond: dict[Seq, torch.Tensor] = {}  # prefix -> log pi_ref(. | prompt ⊕ prefix) [V]
        with torch.no_grad():
            for t in range(horizon):
                prefixes = list(itertools.product(range(vocab_size), repeat=t))
                ids = torch.tensor([self.prompt + list(p) for p in prefixes])
                full = torch.log_softmax(model(input_ids=ids).logits[:, -1, :].float(), dim=-1)
                for p, row in zip(prefixes, full):
                    self._cond[p] = row[:vocab_size].double()

    def ref_logprob(self, y: Seq) -> float:
        """log pi_ref(y | prompt)."""
        return float(sum(self._cond[y[:t]][y[t]] for t in range(len(y))))

    def soft_value(self, prefix: Seq, reward: Mapping[Seq, float], eta: float) -> float:
        """V*(prompt ⊕ prefix) = eta · log sum_{y ⊇ prefix} pi_ref(y | prefix) exp(R(y)/eta)."""
        if len(prefix) == self.horizon:
            return float(reward[prefix])
        logp = self._cond[prefix]
        terms = [float(logp[a]) + self.soft_value(prefix + (a,), reward, eta) / eta for a in range(self.vocab_size)]
        return eta * _logsumexp(terms)

    def optimal_logprobs(self, reward: Mapping[Seq, float], eta: float) -> dict[Seq, float]:
        """log pi*(y) for every response y."""
        scores = {y: self.ref_logprob(y) + reward[y] / eta for y in self.sequences}
        z = _logsumexp(list(scores.values()))
        return {y: s - z for y, s in scores.items()}

    def value_fn(self, rewards: Sequence[Mapping[Seq, float]], eta: float) -> Callable[[list[list[int]]], torch.Tensor]:
        """A sequence value function (prompt ⊕ partial response -> [N, M] exact soft values)."""
        memo: dict[tuple[int, Seq], float] = {}

        def fn(seqs: list[list[int]]) -> torch.Tensor:
            out = torch.zeros(len(seqs), len(rewards), dtype=torch.float64)
            for i, s in enumerate(seqs):
                if s[: len(self.prompt)] != self.prompt:
                    raise ValueError("sequence does not start with the MDP's prompt")
                prefix = tuple(s[len(self.prompt):])
                for m, r in enumerate(rewards):
                    if (m, prefix) not in memo:
                        memo[(m, prefix)] = self.soft_value(prefix, r, eta)
                    out[i, m] = memo[(m, prefix)]
            return out

        return fn

    def objective(self, logprobs: Mapping[Seq, float], reward: Mapping[Seq, float], eta: float) -> dict[str, float]:
        """E_pi[R] - eta · KL(pi || pi_ref) for a policy given by its sequence log-probabilities."""
        er, kl = 0.0, 0.0
        for y in self.sequences:
            lp = logprobs[y]
            if lp == float("-inf"):
                continue
            p = math.exp(lp)
            er += p * reward[y]
            kl += p * (lp - self.ref_logprob(y))
        return {"reward": er, "kl": kl, "objective": er - eta * kl}


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    if m == float("-inf"):
        return m
    return m + math.log(sum(math.exp(x - m) for x in xs))


def kl_divergence(p: Mapping[Seq, float], q: Mapping[Seq, float]) -> float:
    """KL(p || q) between two distributions given as log-probabilities over the same sequences."""
    return sum(math.exp(lp) * (lp - q[y]) for y, lp in p.items() if lp > float("-inf"))
