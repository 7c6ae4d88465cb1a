"""RL fine-tuned baselines: LoRA + a KL penalty to pi_ref, trained with TRL's GRPO trainer (TRL
removed PPO; GRPO is its maintained on-policy trainer and its ``beta`` is the KL coefficient).

One policy per objective, and MORLHF policies per weighting lambda (reward sum_m lambda_m R_m).
The result is a LoRA adapter folder (safetensors) plus ``mavis_policy.json``; load it with
:func:`load_policy_model`. Rewarded Soups interpolate several such adapters (:mod:`.soups`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class RLConfig:
    """GRPO + LoRA settings (defaults sized for a 2-core CPU and the 135M default model).

    Attributes:
        steps: optimizer steps.
        prompts_per_step: distinct prompts per step; each gets ``num_generations`` samples.
        num_generations: group size of GRPO's advantage baseline.
        max_completion_length: tokens per sampled response.
        learning_rate, lora_rank, lora_alpha, lora_dropout: LoRA training.
        kl_beta: weight of the KL(pi || pi_ref) penalty (TRL's ``beta``).
        temperature: sampling temperature during training.
    """

    steps: int = 40
    prompts_per_step: int = 2
    num_generations: int = 4
    max_completion_length: int = 40
    learning_rate: float = 5e-4
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    kl_beta: float = 0.05
    temperature: float = 1.0
    seed: int = 0


def weighted_reward_fn(rewards, weights: dict[str, float]):
    """TRL's reward-function signature around :func:`mavis_align.rewards.weighted_reward`, scored on
    the user prompt (dataset column ``raw_prompt``) and the stripped completion text."""
    from ..rewards import weighted_reward

    score = weighted_reward(rewards, weights)

    def fn(prompts, completions, raw_prompt=None, **kwargs):
        raw = list(raw_prompt) if raw_prompt is not None else list(prompts)
        texts = [(c if isinstance(c, str) else c[-1]["content"]).strip() for c in completions]
        return score(raw, texts)

    fn.__name__ = "weighted_" + "_".join(f"{k}{v:g}" for k, v in weights.items())
    return fn


def train_rl_policy(base: str, prompts: list[str], weights: dict[str, float], out: str | Path, config: RLConfig = RLConfig(),
                    *, chat: bool = True, progress: bool = True, report_to: str = "none") -> Path:
    """Fine-tune ``base`` with LoRA on the lambda-weighted reward; returns the adapter folder.

    ``report_to``: none, trackio, wandb or tensorboard, handed to TRL's ``report_to``.

    Skips the work when ``out/mavis_policy.json`` exists (a finished run).
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from ..models import format_prompts, load_causal_lm
    from ..provenance import run_record
    from ..rewards import get_rewards

    out = Path(out)
    if (out / "mavis_policy.json").exists():
        return out
    from ..placement import current

    place = current()
    model, tok = load_causal_lm(base)
    rewards = get_rewards(list(weights))
    on_gpu = place.device.type == "cuda"
    data = Dataset.from_dict({"prompt": format_prompts(tok, prompts, chat=chat), "raw_prompt": list(prompts)})
    per_step = config.prompts_per_step * config.num_generations
    args = GRPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=per_step, num_generations=config.num_generations,
        max_completion_length=config.max_completion_length, learning_rate=config.learning_rate, beta=config.kl_beta,
        max_steps=config.steps, logging_steps=1, save_strategy="no", report_to=[] if report_to == "none" else [report_to],
        # the Trainer's device and mixed precision follow the placement (--device/--dtype): on a GPU
        # the frozen base runs in bf16/fp16 autocast, the LoRA weights train in fp32
        use_cpu=place.device.type == "cpu", bf16=on_gpu and place.dtype == torch.bfloat16, fp16=on_gpu and place.dtype == torch.float16,
        temperature=config.temperature, top_k=0, top_p=1.0, seed=config.seed, disable_tqdm=not progress,
        gradient_accumulation_steps=1, dataloader_num_workers=0, remove_unused_columns=False, log_completions=False,
    )
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[weighted_reward_fn(rewards, weights)], args=args, train_dataset=data,
                          processing_class=tok, peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    history = [h for h in trainer.state.log_history if "reward" in h or "kl" in h]
    (out / "log_history.json").write_text(json.dumps(history, indent=2) + "\n")
    meta = {"base": base, "weights": weights, "config": asdict(config), "chat": chat, "train_seconds": round(seconds, 1),
            "placement": place.describe(),
            "prompts": len(prompts), "run": run_record({"base": base, "weights": weights, **asdict(config)}, config.seed)}
    (out / "mavis_policy.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out


def load_policy_model(folder: str | Path, *, base_model=None):
    """(model, tokenizer) of a trained policy: the base with its LoRA adapter merged in."""
    from peft import PeftModel

    from ..models import load_causal_lm

    folder = Path(folder)
    meta_path = folder / "mavis_policy.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a trained policy (mavis_policy.json is missing)")
    meta = json.loads(meta_path.read_text())
    model, tok = base_model if base_model is not None else load_causal_lm(meta["base"])
    merged = PeftModel.from_pretrained(model, str(folder / "adapter")).merge_and_unload()
    return merged.eval(), tok


@torch.no_grad()
def soup(folders: list[str | Path], weights: list[float]):
    """Rewarded Soups: the weights-space interpolation sum_m lambda_m theta_m of fine-tuned policies
    (lambda normalised to 1; every policy must share the base). Returns (model, tokenizer)."""
    from ..models import load_causal_lm

    if len(folders) != len(weights) or not folders:
        raise ValueError("one weight per policy, at least one policy")
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"soup weights must be >= 0 and not all 0, got {weights}")
    metas = [json.loads((Path(f) / "mavis_policy.json").read_text()) for f in folders]
    if len({m["base"] for m in metas}) != 1:
        raise ValueError(f"policies have different bases: {[m['base'] for m in metas]}")
    acc = None
    tok = None
    for f, w in zip(folders, weights):
        model, tok = load_policy_model(f, base_model=load_causal_lm(metas[0]["base"]))
        sd = model.state_dict()
        if acc is None:
            acc = {k: v.float() * (w / total) for k, v in sd.items()}
        else:
            for k, v in sd.items():
                acc[k] += v.float() * (w / total)
        del model
    base, tok = load_causal_lm(metas[0]["base"])
    base.load_state_dict(acc, strict=False)
    return base.eval(), tok
