"""Baselines that change weights (RL fine-tuning, MORLHF, Rewarded Soups, MVA-style decorrelated
adapters, the MAHALO-style multi-head policy); decoding-time ones (MOD, best-of-N) live in :mod:`mavis_align.evaluate.policies`."""

from .multihead import MultiHeadConfig, load_multihead_policy, train_multihead_policy
from .mva import adapter_deltas, dependence_penalty, lora_deltas, train_decorrelated_adapter
from .rl import (RLConfig, combine, load_policy_model, preference_instruction, soup, train_conditioned_policy, train_rl_policy,
                 weighted_reward_fn)

__all__ = ["MultiHeadConfig", "RLConfig", "load_multihead_policy", "train_multihead_policy", "adapter_deltas", "combine", "dependence_penalty", "load_policy_model", "lora_deltas", "preference_instruction", "soup",
           "train_conditioned_policy", "train_decorrelated_adapter", "train_rl_policy", "weighted_reward_fn"]
