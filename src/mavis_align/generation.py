"""Plain KV-cached batched sampling from a causal LM, with an explicit ``torch.Generator``.

This is the steer-free decoding loop (sampling from pi_ref). It records, for every generated
token, log pi_ref(a|s) over the full vocabulary at temperature 1 and log pi_gen(a|s) under the
distribution actually sampled from (after temperature / top-k), so KL estimates (paper eq. 7)
can be formed from its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import sample_from_logits, top_k_logits


@dataclass
class Generation:
    """One decoded response.

    Attributes:
        prompt: the user prompt (before chat formatting).
        text: decoded response, special tokens removed, cut before any stop string.
        token_ids: generated token ids (EOS included when it was produced).
        logprobs_ref: log pi_ref(a_t|s_t) per generated token, full vocabulary, temperature 1.
        logprobs_gen: log pi_gen(a_t|s_t) per generated token under the sampling distribution.
        finish_reason: ``"eos"``, ``"stop"`` (stop string) or ``"length"``.
    """

    prompt: str
    text: str
    token_ids: list[int]
    logprobs_ref: list[float]
    logprobs_gen: list[float]
    finish_reason: str
    extras: dict = field(default_factory=dict)

    @property
    def log_ratio(self) -> float:
        """sum_t log(pi_gen/pi_ref): this sequence's single-sample KL contribution (eq. 7)."""
        return float(sum(g - r for g, r in zip(self.logprobs_gen, self.logprobs_ref)))


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn from the base model.

    Attributes:
        max_new_tokens: response length budget T.
        temperature: softmax temperature (>0); ignored when ``greedy``.
        top_k: keep the k most likely tokens (0 = full vocabulary).
        greedy: take the argmax instead of sampling.
        stop_strings: decoding of a sequence stops once its text contains one of these.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    greedy: bool = False
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def sample_batch(
    model,
    tokenizer,
    prompts: list[str],
    formatted: list[str],
    config: SamplingConfig,
    generator: torch.Generator | None,
) -> list[Generation]:
    """Decode one left-padded batch with a KV cache.

    Args:
        prompts: user prompts (kept in the output records).
        formatted: the model input text for each prompt (e.g. chat-formatted), same length.
        generator: RNG for sampling; required unless ``config.greedy``.
    """
    from transformers import DynamicCache

    if not config.greedy and generator is None:
        raise ValueError("sampling needs an explicit torch.Generator (or greedy=True)")
    device = next(model.parameters()).device
    enc = tokenizer(formatted, return_tensors="pt", padding=True, add_special_tokens=False)
    input_ids = enc["input_ids"].to(device)
    attention = enc["attention_mask"].to(device)
    if tokenizer.padding_side != "left" and not bool(attention[:, -1].all()):
        raise ValueError("the tokenizer must pad on the left for batched generation")
    batch = input_ids.shape[0]
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    position = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(
        input_ids=input_ids, attention_mask=attention, position_ids=position, cache=cache, use_cache=True, logits_to_keep=1
    )
    next_pos = position[:, -1:] + 1
    logits = out.logits[:, -1, :].float()

    tokens: list[list[int]] = [[] for _ in range(batch)]
    lp_ref: list[list[float]] = [[] for _ in range(batch)]
    lp_gen: list[list[float]] = [[] for _ in range(batch)]
    reason = ["length"] * batch
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(config.max_new_tokens):
        logp_ref = torch.log_softmax(logits, dim=-1)
        gen_logits = logits if config.greedy else logits / config.temperature
        if config.top_k:
            gen_logits = top_k_logits(gen_logits, config.top_k)
        logp_gen = torch.log_softmax(gen_logits, dim=-1)
        chosen = sample_from_logits(gen_logits, generator=generator, greedy=config.greedy)  # [B]
        chosen = torch.where(done, torch.full_like(chosen, pad_id), chosen)
        for i in torch.nonzero(~done).flatten().tolist():
            tok = int(chosen[i])
            tokens[i].append(tok)
            lp_ref[i].append(float(logp_ref[i, tok]))
            lp_gen[i].append(float(logp_gen[i, tok]))
            if tok == eos_id:
                done[i] = True
                reason[i] = "eos"
            elif config.stop_strings:
                _, hit = _cut_at_stop(tokenizer.decode(tokens[i], skip_special_tokens=True), config.stop_strings)
                if hit:
                    done[i] = True
                    reason[i] = "stop"
        if bool(done.all()):
            break
        attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)  # finished rows: pads, discarded
        out = model(
            input_ids=chosen[:, None],
            attention_mask=attention,
            position_ids=next_pos,
            cache=cache,
            use_cache=True,
        )
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :].float()

    results = []
    for i in range(batch):
        text, _ = _cut_at_stop(tokenizer.decode(tokens[i], skip_special_tokens=True), config.stop_strings)
        results.append(Generation(prompts[i], text.strip(), tokens[i], lp_ref[i], lp_gen[i], reason[i]))
    return results


def generate(
    model,
    tokenizer,
    prompts: list[str],
    config: SamplingConfig = SamplingConfig(),
    *,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool | None = None,
    progress: bool = False,
) -> list[Generation]:
    """Sample one response per prompt from ``model`` in batches of ``batch_size``.

    A single ``torch.Generator`` seeded with ``seed`` drives all batches, so the same prompts,
    seed and batch size give the same responses.
    """
    from .models import format_prompts

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    formatted = format_prompts(tokenizer, prompts, chat=chat)
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    results: list[Generation] = []
    for s in starts:
        results.extend(
            sample_batch(model, tokenizer, prompts[s : s + batch_size], formatted[s : s + batch_size], config, generator)
        )
    return results
