"""RL fine-tuned baselines: LoRA + a KL penalty to pi_ref, trained with TRL's GRPO trainer (TRL
removed PPO; GRPO is its maintained on-policy trainer and its ``beta`` is the KL coefficient).

One policy per objective, MORLHF policies per weighting lambda (reward sum_m lambda_m R_m), and
one preference-conditioned policy (MOODPO-like, paper v3): told its weights in a system
instruction (:func:`preference_instruction`), trained over weights drawn from a grid with the
reward sum_m lambda_m R_m of each sample's own lambda. (The authors train theirs with online DPO;
this one uses the same GRPO trainer as the other baselines, so only the conditioning differs.)
The result is a LoRA adapter folder (safetensors) plus ``mavis_policy.json``; load it with
:func:`load_policy_model`. Rewarded Soups interpolate several such adapters (:func:`soup`).
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
        save_every: a resumable checkpoint (LoRA weights, optimizer, RNG states) every this many
            steps; a rerun of an interrupted training continues from the last one (0: none).
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
    save_every: int = 10


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


def preference_instruction(weights: dict[str, float]) -> str:
    """The instruction a preference-conditioned policy reads: "Your answers are 60% helpful and 40%
    harmless." (weights normalised to percentages; objectives in the given order)."""
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"preference weights must be >= 0 and not all 0, got {weights}")
    parts = [f"{round(100 * w / total)}% {name}" for name, w in weights.items()]
    return "Your answers are " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def preference_grid(objectives: list[str], step: float) -> list[dict[str, float]]:
    """Every weighting of ``objectives`` on a grid of ``step`` (the simplex points)."""
    from ..evaluate.pareto import weight_grid

    return [dict(zip(objectives, lam)) for lam in weight_grid(len(objectives), step)] if len(objectives) > 1 else [{objectives[0]: 1.0}]


def per_row_weighted_reward_fn(rewards, objectives: list[str]):
    """TRL reward function for a preference-conditioned policy: each sample is scored by
    sum_m lambda_m R_m with its own lambda (dataset column ``weights``, a JSON {name: lambda})."""
    from ..rewards import score_all

    by_name = {r.name: r for r in rewards}
    missing = [o for o in objectives if o not in by_name]
    if missing:
        raise ValueError(f"no reward named {missing}")

    def fn(prompts, completions, raw_prompt=None, weights=None, **kwargs):
        if weights is None:
            raise ValueError("a preference-conditioned policy's data set needs a `weights` column")
        raw = list(raw_prompt) if raw_prompt is not None else list(prompts)
        texts = [(c if isinstance(c, str) else c[-1]["content"]).strip() for c in completions]
        scores = score_all([by_name[o] for o in objectives], raw, texts)
        out = []
        for i, w in enumerate(weights):
            lam = json.loads(w)
            total = sum(lam.values())
            out.append(sum(lam[o] / total * scores[o][i] for o in objectives if lam.get(o)))
        return out

    fn.__name__ = "conditioned_" + "_".join(objectives)
    return fn


def train_rl_policy(base: str, prompts: list[str], weights: dict[str, float], out: str | Path, config: RLConfig = RLConfig(),
                    *, chat: bool = True, progress: bool = True, report_to: str = "none", penalty=None, meta: dict | None = None) -> Path:
    """Fine-tune ``base`` with LoRA on the lambda-weighted reward; returns the adapter folder.

    ``report_to``: none, trackio, wandb or tensorboard, handed to TRL's ``report_to``.
    ``penalty``: ``fn(peft_model) -> scalar tensor`` added to the loss (see :func:`_grpo`); ``meta``:
    extra fields recorded in ``mavis_policy.json``.

    Skips the work when ``out/mavis_policy.json`` exists (a finished run).
    """
    from ..models import format_prompts, load_causal_lm
    from ..rewards import get_rewards

    out = Path(out)
    if (out / "mavis_policy.json").exists():
        return out
    model, tok = load_causal_lm(base)
    rewards = get_rewards(list(weights))
    data = {"prompt": format_prompts(tok, prompts, chat=chat), "raw_prompt": list(prompts)}
    record = {"base": base, "weights": weights, "chat": chat, "prompts": len(prompts), **(meta or {})}
    return _grpo(model, tok, data, weighted_reward_fn(rewards, weights), out, config, record, progress, report_to, penalty=penalty)


def train_conditioned_policy(base: str, prompts: list[str], objectives: list[str], out: str | Path, config: RLConfig = RLConfig(),
                             *, grid_step: float = 0.2, chat: bool = True, progress: bool = True, report_to: str = "none") -> Path:
    """One LoRA policy for every weighting (MOODPO-like): each training prompt is paired with a
    weighting drawn (seeded) from the grid of ``grid_step``, the policy reads it as a system
    instruction (:func:`preference_instruction`), and GRPO rewards each sample with
    sum_m lambda_m R_m of its own lambda. Decode it with :class:`~mavis_align.evaluate.policies.ModelPolicy` and ``system=preference_instruction(weights)``.

    Skips the work when ``out/mavis_policy.json`` exists (a finished run).
    """
    import random

    from ..models import format_prompts, load_causal_lm
    from ..rewards import get_rewards

    out = Path(out)
    if (out / "mavis_policy.json").exists():
        return out
    if len(objectives) < 2:
        raise ValueError(f"a preference-conditioned policy needs at least 2 objectives, got {objectives}")
    model, tok = load_causal_lm(base)
    rewards = get_rewards(list(objectives))
    grid = preference_grid(list(objectives), grid_step)
    rng = random.Random(config.seed)
    # every prompt appears once per step's group; its weighting is drawn per dataset row
    rows = [(p, rng.choice(grid)) for p in prompts]
    data = {"prompt": [format_prompts(tok, [p], chat=chat, system=preference_instruction(w))[0] for p, w in rows],
            "raw_prompt": [p for p, _ in rows], "weights": [json.dumps(w) for _, w in rows]}
    meta = {"base": base, "conditioned": {"objectives": list(objectives), "grid_step": grid_step,
                                          "instruction_example": preference_instruction(grid[len(grid) // 2])},
            "chat": chat, "prompts": len(prompts)}
    return _grpo(model, tok, data, per_row_weighted_reward_fn(rewards, list(objectives)), out, config, meta, progress, report_to)


def _grpo(model, tok, columns: dict, reward_fn, out: Path, config: RLConfig, meta: dict, progress: bool, report_to: str,
          penalty=None) -> Path:
    """LoRA + GRPO on ``columns`` (a data set with ``prompt`` and the reward function's columns).
    ``penalty``: ``fn(peft_model) -> scalar tensor`` added to every step's loss (logged as ``penalty``)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from ..placement import current
    from ..provenance import run_record

    place = current()
    on_gpu = place.device.type == "cuda"
    data = Dataset.from_dict(columns)
    per_step = config.prompts_per_step * config.num_generations
    args = GRPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=per_step, num_generations=config.num_generations,
        max_completion_length=config.max_completion_length, learning_rate=config.learning_rate, beta=config.kl_beta,
        max_steps=config.steps, logging_steps=1, report_to=[] if report_to == "none" else [report_to],
        save_strategy="steps" if config.save_every > 0 else "no", save_steps=max(1, config.save_every), save_total_limit=1,
        # the Trainer's device and mixed precision follow the placement (--device/--dtype): on a GPU
        # the frozen base runs in bf16/fp16 autocast, the LoRA weights train in fp32
        use_cpu=place.device.type == "cpu", bf16=on_gpu and place.dtype == torch.bfloat16, fp16=on_gpu and place.dtype == torch.float16,
        temperature=config.temperature, top_k=0, top_p=1.0, seed=config.seed, disable_tqdm=not progress,
        gradient_accumulation_steps=1, dataloader_num_workers=0, remove_unused_columns=False, log_completions=False,
    )
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    trainer_cls = GRPOTrainer
    if penalty is not None:
        class PenalisedGRPO(GRPOTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                extra = penalty(model)
                self._metrics["train"]["penalty"].append(float(extra.detach()))
                return loss + extra

        trainer_cls = PenalisedGRPO
    trainer = trainer_cls(model=model, reward_funcs=[reward_fn], args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    # an interrupted run continues from its last checkpoint; the wall time of earlier calls is kept beside it
    trainer_dir = out / "trainer"
    last = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    clock = trainer_dir / "elapsed.json"
    before = json.loads(clock.read_text())["seconds"] if last is not None and clock.exists() else 0.0
    t0 = time.perf_counter()

    class KeepTime(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            clock.write_text(json.dumps({"seconds": before + time.perf_counter() - t0, "step": state.global_step}))

    trainer.add_callback(KeepTime())
    trainer.train(resume_from_checkpoint=last)
    seconds = before + time.perf_counter() - t0
    trainer.model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    history = [h for h in trainer.state.log_history if "reward" in h or "kl" in h or "penalty" in h]
    (out / "log_history.json").write_text(json.dumps(history, indent=2) + "\n")
    meta = {**meta, "config": asdict(config), "train_seconds": round(seconds, 1), "placement": place.describe(),
            "run": run_record({**{k: v for k, v in meta.items() if k != "chat"}, **asdict(config)}, config.seed)}
    (out / "mavis_policy.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    import shutil

    shutil.rmtree(trainer_dir, ignore_errors=True)  # finished: the adapter is saved, the checkpoints are not needed
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
def combine(folders: list[str | Path], weights: list[float]):
    """theta_ref + sum_m lambda_m (theta_m - theta_ref) of fine-tuned policies sharing one base, for
    any real lambda (outside the simplex: extrapolation, as MVA does). Returns (model, tokenizer)."""
    from ..models import load_causal_lm

    if len(folders) != len(weights) or not folders:
        raise ValueError("one weight per policy, at least one policy")
    if not all(torch.isfinite(torch.tensor(float(w))) for w in weights):
        raise ValueError(f"weights must be finite, got {weights}")
    metas = [json.loads((Path(f) / "mavis_policy.json").read_text()) for f in folders]
    if len({m["base"] for m in metas}) != 1:
        raise ValueError(f"policies have different bases: {[m['base'] for m in metas]}")
    base, tok = load_causal_lm(metas[0]["base"])
    ref = {k: v.float().clone() for k, v in base.state_dict().items()}
    acc = {k: v.clone() for k, v in ref.items()}
    for f, w in zip(folders, weights):
        if float(w) == 0.0:
            continue
        model, _ = load_policy_model(f, base_model=load_causal_lm(metas[0]["base"]))
        for k, v in model.state_dict().items():
            acc[k] += float(w) * (v.float() - ref[k])
        del model
    base.load_state_dict({k: v.to(ref[k].dtype) for k, v in acc.items()}, strict=False)
    return base.eval(), tok


def soup(folders: list[str | Path], weights: list[float]):
    """Rewarded Soups: the weight-space interpolation sum_m lambda_m theta_m of fine-tuned policies
    (lambda >= 0, normalised to 1: :func:`combine` on the simplex). Returns (model, tokenizer)."""
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"soup weights must be >= 0 and not all 0, got {weights}")
    return combine(folders, [w / total for w in weights])
