"""MAHALO-style multi-head policy: one LoRA trunk shared by M LM heads, head m trained with DPO on
objective m's preferences ("vectorized" alignment), the heads mixed by the request's lambda at decoding.

Head m's logits are the base model's head plus a low-rank delta of its own,

    logits_m(h) = W h + B_m A_m h,   W the (frozen) base LM head, A_m [r, d], B_m [V, r] (B_m = 0 at start),

on the hidden state h of the base model with the trunk's LoRA. Mixing the heads' logits with
weights lambda (summing to 1) is itself one head, W + sum_m lambda_m B_m A_m, so the policy at a
weighting is an ordinary causal LM (:func:`load_multihead_policy`): decoded, evaluated and KL-measured
like every other policy; lambda = e_m is head m exactly.

Training data (:func:`preference_pairs`): responses sampled from pi_ref, several per prompt, scored by
every objective's reward; for objective m, the best and the worst response of a prompt form a pair
when their rewards differ by at least ``min_margin``. Loss (DPO, Rafailov et al. 2023), summed over the
objectives with each pair scored through its objective's head:

    -log sigmoid(beta * ((log pi_m(y_w) - log pi_ref(y_w)) - (log pi_m(y_l) - log pi_ref(y_l))))

The step-level value guidance of MAHALO (its PRM-guided decoding) is
:mod:`mavis_align.decoding.steplevel` with this policy as the proposal (sweep method ``mahalo-step``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MultiHeadConfig:
    """Settings of :func:`train_multihead_policy` (sized for a 2-core CPU and the 135M default).

    Attributes:
        samples_per_prompt: responses sampled from pi_ref per training prompt.
        max_new_tokens: their length budget.
        min_margin: smallest reward difference that makes a (best, worst) pair.
        lora_rank, lora_alpha: the shared trunk's LoRA (attention projections).
        head_rank: r of every head's delta B_m A_m.
        dpo_beta: DPO's beta.
        learning_rate, epochs, batch_size: AdamW over the trunk's LoRA and the heads.
    """

    samples_per_prompt: int = 4
    max_new_tokens: int = 40
    min_margin: float = 0.05
    lora_rank: int = 16
    lora_alpha: float = 32.0
    head_rank: int = 16
    dpo_beta: float = 0.1
    learning_rate: float = 5e-4
    epochs: int = 3
    batch_size: int = 4
    seed: int = 0


class HeadDeltas(nn.Module):
    """Per-objective low-rank deltas of the LM head: delta_m(h) = B_m A_m h -> [..., V]."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, rank: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(num_heads, rank, hidden_size, generator=g) / hidden_size**0.5)
        self.B = nn.Parameter(torch.zeros(num_heads, vocab_size, rank))

    def forward(self, h: torch.Tensor, head: int) -> torch.Tensor:
        return (h @ self.A[head].T) @ self.B[head].T

    def mixed(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_m lambda_m B_m A_m -> [V, d] (``weights`` [M])."""
        return torch.einsum("m,mvr,mrd->vd", weights.to(self.B.dtype), self.B, self.A)


def preference_pairs(prompts: list[str], responses: list[list[str]], scores: dict[str, list[list[float]]], min_margin: float) -> list[dict]:
    """Per objective and prompt, (best, worst) of the prompt's responses when they differ by >= ``min_margin``.

    Args:
        prompts: P prompts; responses: P lists of K responses; scores: objective -> P lists of K rewards.
    Returns:
        ``{"objective", "prompt", "chosen", "rejected", "margin"}`` records.
    """
    out = []
    for obj, per_prompt in scores.items():
        for p, resp, sc in zip(prompts, responses, per_prompt):
            best = max(range(len(sc)), key=lambda i: sc[i])
            worst = min(range(len(sc)), key=lambda i: sc[i])
            if sc[best] - sc[worst] >= min_margin:
                out.append({"objective": obj, "prompt": p, "chosen": resp[best], "rejected": resp[worst], "margin": sc[best] - sc[worst]})
    return out


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Mean DPO loss over a batch of sequence log-probabilities (each [B])."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))).mean()


def _encode(tok, prompt_texts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids, attention mask, and a mask of the response tokens."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs, resp_masks = [], []
    for p, r in zip(prompt_texts, responses):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ri = tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        seqs.append(pi + ri)
        resp_masks.append([0] * len(pi) + [1] * len(ri))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    rm = torch.zeros_like(ids)
    for i, (s, m) in enumerate(zip(seqs, resp_masks)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        rm[i, : len(m)] = torch.tensor(m)
    return ids, att, rm


def sequence_logprob(logits: torch.Tensor, ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """sum over response tokens of log softmax(logits)[next token] -> [B] (logits [B, T, V] predict ids[:, 1:])."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * response_mask[:, 1:]).sum(-1)


def head_logits(peft_model, heads: HeadDeltas, ids: torch.Tensor, att: torch.Tensor, head: int | None) -> torch.Tensor:
    """Logits of the trunk (LoRA on) through head ``head`` (None: the base head alone) -> [B, T, V]."""
    out = peft_model(input_ids=ids, attention_mask=att, output_hidden_states=True)
    if head is None:
        return out.logits
    return out.logits + heads(out.hidden_states[-1], head)


def train_multihead_policy(base: str, prompts: list[str], objectives: list[str], out: str | Path, config: MultiHeadConfig = MultiHeadConfig(),
                           *, chat: bool = True, progress: bool = True) -> Path:
    """Sample responses from pi_ref, build per-objective pairs, train the trunk + heads with DPO.

    Resumable: the sampled, scored responses are kept in ``out/responses.json``; a finished run
    (``out/mavis_policy.json``) is skipped.
    """
    from peft import LoraConfig, get_peft_model

    from ..decoding.decoder import MavisDecoder
    from ..generation import SamplingConfig
    from ..models import format_prompts, load_causal_lm
    from ..provenance import run_record, write_json
    from ..rewards import get_rewards

    out = Path(out)
    if (out / "mavis_policy.json").exists():
        return out
    if len(objectives) < 1 or len(set(objectives)) != len(objectives):
        raise ValueError(f"a multi-head policy needs distinct objectives, got {objectives}")
    if config.samples_per_prompt < 2:
        raise ValueError(f"pairs need >= 2 samples per prompt, got {config.samples_per_prompt}")
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_causal_lm(base)
    cache = out / "responses.json"
    settings = {"base": base, "prompts": list(prompts), "samples_per_prompt": config.samples_per_prompt, "max_new_tokens": config.max_new_tokens,
                "seed": config.seed, "chat": chat, "objectives": sorted(objectives)}
    data = json.loads(cache.read_text()) if cache.exists() else None
    if data is not None and data.get("settings", settings) != settings:
        if progress:
            print(f"{cache} was sampled with other settings: sampling again", flush=True)
        data = None
    if data is not None and sorted(data["scores"]) != sorted(objectives):
        raise ValueError(f"{cache} scores {sorted(data['scores'])}, not the objectives {objectives}: delete it to resample")
    if data is None:
        rewards = get_rewards(list(objectives))
        many = [p for p in prompts for _ in range(config.samples_per_prompt)]
        gens = MavisDecoder(model, tok).generate(many, config=SamplingConfig(max_new_tokens=config.max_new_tokens), seed=config.seed,
                                                 chat=chat, progress=progress)
        texts = [g.text for g in gens]
        k = config.samples_per_prompt
        data = {"settings": settings, "prompts": list(prompts), "responses": [texts[i * k : (i + 1) * k] for i in range(len(prompts))],
                "scores": {r.name: [[float(x) for x in r(many[i * k : (i + 1) * k], texts[i * k : (i + 1) * k])] for i in range(len(prompts))]
                           for r in rewards}}
        write_json(cache, data)
    pairs = preference_pairs(data["prompts"], data["responses"], data["scores"], config.min_margin)
    if not pairs:
        raise ValueError(f"no preference pairs: every prompt's responses are within {config.min_margin} on every objective")
    formatted = dict(zip(data["prompts"], format_prompts(tok, data["prompts"], chat=chat)))
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    heads = HeadDeltas(model.config.hidden_size, model.config.vocab_size, len(objectives), config.head_rank, seed=config.seed)
    index = {o: i for i, o in enumerate(objectives)}
    # reference log-probabilities once: trunk without LoRA, base head
    ref = {}
    with torch.no_grad(), peft_model.disable_adapter():
        for s in range(0, len(pairs), config.batch_size):
            chunk = pairs[s : s + config.batch_size]
            for side in ("chosen", "rejected"):
                ids, att, rm = _encode(tok, [formatted[x["prompt"]] for x in chunk], [x[side] for x in chunk])
                lp = sequence_logprob(peft_model(input_ids=ids, attention_mask=att).logits, ids, rm)
                for j, v in enumerate(lp.tolist()):
                    ref[(s + j, side)] = v
    params = [p for p in peft_model.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=config.learning_rate)
    rng = random.Random(config.seed)
    order = list(range(len(pairs)))
    history = []
    t0 = time.perf_counter()
    total = config.epochs * ((len(pairs) + config.batch_size - 1) // config.batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="multi-head DPO", unit="step")
    peft_model.train()
    for epoch in range(config.epochs):
        rng.shuffle(order)
        for s in range(0, len(order), config.batch_size):
            batch = order[s : s + config.batch_size]
            opt.zero_grad()
            losses = []
            for obj in objectives:  # each pair through its own objective's head
                mine = [i for i in batch if pairs[i]["objective"] == obj]
                if not mine:
                    continue
                lp = {}
                for side in ("chosen", "rejected"):
                    ids, att, rm = _encode(tok, [formatted[pairs[i]["prompt"]] for i in mine], [pairs[i][side] for i in mine])
                    lp[side] = sequence_logprob(head_logits(peft_model, heads, ids, att, index[obj]), ids, rm)
                r_c = torch.tensor([ref[(i, "chosen")] for i in mine])
                r_r = torch.tensor([ref[(i, "rejected")] for i in mine])
                losses.append(dpo_loss(lp["chosen"], lp["rejected"], r_c, r_r, config.dpo_beta) * len(mine))
            loss = sum(losses) / len(batch)
            loss.backward()
            opt.step()
            history.append({"epoch": epoch, "loss": float(loss.detach())})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    peft_model.eval()
    peft_model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    from safetensors.torch import save_file

    save_file({"A": heads.A.detach().contiguous(), "B": heads.B.detach().contiguous()}, str(out / "heads.safetensors"))
    (out / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
    counts = {o: sum(1 for x in pairs if x["objective"] == o) for o in objectives}
    meta = {"base": base, "chat": chat, "prompts": len(prompts), "multihead": {"objectives": list(objectives), "pairs": counts},
            "config": asdict(config), "train_seconds": round(seconds, 1), "run": run_record(asdict(config), config.seed)}
    write_json(out / "mavis_policy.json", meta)
    return out


def load_multihead_policy(folder: str | Path, weights: dict[str, float], *, base_model=None):
    """(model, tokenizer) of the multi-head policy at ``weights``: trunk LoRA merged, the LM head
    replaced by W + sum_m lambda_m B_m A_m (lambda normalised to 1; untied from the embeddings)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from ..models import load_causal_lm

    folder = Path(folder)
    meta_path = folder / "mavis_policy.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "multihead" not in meta:
        raise FileNotFoundError(f"{folder} is not a multi-head policy (train it with `mavis-align finetune --multihead ...`)")
    objectives = meta["multihead"]["objectives"]
    unknown = sorted(set(weights) - set(objectives))
    total = sum(float(w) for w in weights.values())
    if unknown or total <= 0 or any(float(w) < 0 for w in weights.values()):
        raise ValueError(f"weights must be >= 0, not all 0, over the heads {objectives}; got {weights}")
    lam = torch.tensor([float(weights.get(o, 0.0)) / total for o in objectives])
    model, tok = base_model if base_model is not None else load_causal_lm(meta["base"])
    merged = PeftModel.from_pretrained(model, str(folder / "adapter")).merge_and_unload().eval()
    tensors = load_file(str(folder / "heads.safetensors"))
    heads = HeadDeltas(tensors["A"].shape[2], tensors["B"].shape[1], tensors["A"].shape[0], tensors["A"].shape[1])
    heads.load_state_dict(tensors)
    old = merged.get_output_embeddings()
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight.float() + heads.mixed(lam).to(old.weight.device))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    merged.set_output_embeddings(new)
    merged.config.tie_word_embeddings = False
    return merged, tok
