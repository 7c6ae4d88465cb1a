"""The one evaluator every method goes through.

For each method: ``samples`` responses per held-out prompt; per-objective rewards (mean, std,
standard error); KL to pi_ref by eq. 7, with log pi_ref of every generated token recomputed by
teacher forcing through pi_ref over its full vocabulary (the same code for every method), and,
where the policy samples from a tilt of pi_ref itself, the sum of the recorded step KLs (``kl_steps``:
same expectation, less variance; :func:`step_kl_sums`); fluency
as the perplexity of the responses under pi_ref; diversity (distinct-1/2); length; tokens/s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..generation import Generation
from .metrics import distinct_n, perplexity
from .summary import summarize


@torch.no_grad()
def teacher_forced_logprobs(model, tokenizer, formatted_prompts: Sequence[str], responses: Sequence[Sequence[int]], batch_size: int = 8) -> list[list[float]]:
    """log model(a_t | prompt, a_<t) of every response token, full vocabulary, temperature 1."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[float]] = []
    for s in range(0, len(responses), batch_size):
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in formatted_prompts[s : s + batch_size]]
        resp = [list(r) for r in responses[s : s + batch_size]]
        seqs = [p + r for p, r in zip(prompts, resp)]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1)
        for i, (p, r) in enumerate(zip(prompts, resp)):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(r), device=device)
            out.append(logp[i, pos, torch.tensor(r, dtype=torch.long, device=device)].tolist() if r else [])
    return out


def step_kl_sums(policy, ref_model, gens: Sequence[Generation]) -> list[float] | None:
    """Per response, the sum over its tokens of KL(pi_gen(.|s_t) || pi_ref(.|s_t)), or None when it is not that.

    The decoding engine records each step's KL to the decoder's *own* base model, so the sums estimate
    the KL to pi_ref only when the policy's ``step_kl_base`` is ``ref_model`` (pi_ref and MAVIS sampling: yes;
    a fine-tuned or souped model, MOD's mixture, a model read with a system instruction: no) and the
    response is the sampled sequence itself (not a selection: best-of-N, beam search, step-level selection).
    """
    if getattr(policy, "step_kl_base", None) is not ref_model:
        return None
    if not gens or any(len(g.step_kl) != len(g.token_ids) or "selection_kl" in g.extras for g in gens):
        return None
    return [float(sum(g.step_kl)) for g in gens]


def evaluate_policy(policy, prompts: Sequence[str], rewards, ref_model, ref_tokenizer, *, samples: int = 3, seed: int = 0,
                    chat: bool | None = None, keep_examples: int = 4) -> dict:
    """Score ``policy`` on ``prompts`` (``samples`` responses each) -> JSON-able dict."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    many = [p for p in prompts for _ in range(samples)]
    t0 = time.perf_counter()
    gens: list[Generation] = policy.generate(many, seed=seed)
    seconds = time.perf_counter() - t0
    return score_generations(policy, gens, rewards, ref_model, ref_tokenizer, seconds=seconds, prompts=len(prompts), samples=samples, seed=seed,
                             chat=chat, keep_examples=keep_examples)


def evaluate_weightings(decoder, config, weightings: Sequence[tuple[str, dict]], prompts: Sequence[str], rewards, ref_model, ref_tokenizer, *,
                        samples: int = 3, seed: int = 0, chat: bool | None = None, keep_examples: int = 4, batch_size: int = 64) -> dict[str, dict]:
    """MAVIS sampling of one ``decoder`` under several objective weightings, decoded together.

    Every (weighting, prompt, sample) is one row of the same decode batches (per-row λ), and row i of
    each weighting draws from ``row_generator(seed, i)`` exactly as :func:`evaluate_policy` of that
    weighting alone would: the same random draws (common random numbers across weightings, and the
    same responses up to the padding's float rounding), larger batches.

    Args:
        weightings: (label, {objective: λ}) per policy.
    Returns:
        {label: the :func:`evaluate_policy` dict}; ``seconds`` / ``tokens_per_s`` are those of the
        joint decode (shared by every weighting) and ``decoded_with`` names the weightings decoded together.
    """
    from .policies import DecoderPolicy

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    labels = [label for label, _ in weightings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"weighting labels must be unique, got {labels}")
    many = [p for p in prompts for _ in range(samples)]
    rows = [(j, i) for j in range(len(weightings)) for i in range(len(many))]
    t0 = time.perf_counter()
    gens = decoder.generate([many[i] for _, i in rows], weights=[dict(weightings[j][1]) for j, _ in rows], config=config, seed=seed,
                            batch_size=batch_size, chat=chat, row_ids=[i for _, i in rows])
    seconds = time.perf_counter() - t0
    joint_tokens_per_s = sum(len(g.token_ids) for g in gens) / max(seconds, 1e-9)
    out = {}
    for j, (label, weights) in enumerate(weightings):
        policy = DecoderPolicy(label, decoder, config, weights=weights, chat=chat)
        res = score_generations(policy, gens[j * len(many) : (j + 1) * len(many)], rewards, ref_model, ref_tokenizer, seconds=seconds,
                                prompts=len(prompts), samples=samples, seed=seed, chat=chat, keep_examples=keep_examples)
        res["tokens_per_s"] = joint_tokens_per_s
        res["decoded_with"] = labels
        out[label] = res
    return out


def score_generations(policy, gens: Sequence[Generation], rewards, ref_model, ref_tokenizer, *, seconds: float, prompts: int, samples: int,
                      seed: int, chat: bool | None = None, keep_examples: int = 4) -> dict:
    """The evaluation dict of ``policy``'s responses ``gens`` (``samples`` per prompt, in prompt order)."""
    from ..models import format_prompts

    ref_lp = teacher_forced_logprobs(ref_model, ref_tokenizer, format_prompts(ref_tokenizer, [g.prompt for g in gens], chat=chat), [g.token_ids for g in gens])
    texts = [g.text for g in gens]
    # a step-level selection adds its KL bound to the proposal tokens' log-ratios (decoding.steplevel)
    kls = [sum(a - b for a, b in zip(g.logprobs_gen, r)) + float(g.extras.get("selection_kl", 0.0)) for g, r in zip(gens, ref_lp)]
    n_tok = sum(len(g.token_ids) for g in gens)
    out = {
        "method": policy.name,
        # per response, in order, next to the summary: paired comparisons between methods on the same prompts
        "rewards": {r.name: (lambda v: {**summarize(v), "values": v})([float(x) for x in r([g.prompt for g in gens], texts)]) for r in rewards},
        # per response too (prompt order), for paired comparisons at matched KL (evaluate.matched)
        "kl": {**summarize(kls), "values": [float(k) for k in kls]},
        **({"kl_steps": {**summarize(steps), "values": [float(k) for k in steps]}}
           if (steps := step_kl_sums(policy, ref_model, gens)) is not None else {}),
        "fluency_ppl_ref": perplexity(ref_lp),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "length": summarize([float(len(g.token_ids)) for g in gens]),
        "tokens_per_s": n_tok / max(seconds, 1e-9),
        "seconds": seconds,
        "prompts": prompts,
        "samples": samples,
        "seed": seed,
        "examples": [{"prompt": g.prompt, "response": g.text, "kl": kl} for g, kl in zip(gens[:keep_examples], kls)],
        # every response, in order: pairwise judging against another method on the same prompts
        "responses": [{"prompt": g.prompt, "response": g.text} for g in gens],
    }
    if any("selection_kl" in g.extras for g in gens):
        out["kl_note"] = ("step-level guidance: KL = the proposal tokens' log-ratios to pi_ref + the selections' KL bound "
                          "(best: log N - (N-1)/N per step; tilt: log N - H(p)); an upper bound, not an estimate")
    if hasattr(policy, "kl_bound"):
        out["kl_best_of_n_bound"] = policy.kl_bound
        out["kl_note"] = "best-of-N: the sampled log-ratio is that of the underlying policy; see kl_best_of_n_bound"
    return out
