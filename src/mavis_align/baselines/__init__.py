"""Baselines that change weights (RL fine-tuning, MORLHF, Rewarded Soups, MVA-style decorrelated
adapters); decoding-time ones (MOD, best-of-N) live in :mod:`mavis_align.evaluate.policies`."""

from .mva import adapter_deltas, dependence_penalty, lora_deltas, train_decorrelated_adapter
from .rl import (RLConfig, combine, load_policy_model, preference_instruction, soup, train_conditioned_policy, train_rl_policy,
                 weighted_reward_fn)

__all__ = ["RLConfig", "adapter_deltas", "combine", "dependence_penalty", "load_policy_model", "lora_deltas", "preference_instruction", "soup",
           "train_conditioned_policy", "train_decorrelated_adapter", "train_rl_policy", "weighted_reward_fn"]
