"""Baselines that change weights (RL fine-tuning, MORLHF, Rewarded Soups); decoding-time ones
(MOD, best-of-N) live in :mod:`mavis_align.evaluate.policies`."""

from .rl import (RLConfig, load_policy_model, preference_instruction, soup, train_conditioned_policy, train_rl_policy,
                 weighted_reward_fn)

__all__ = ["RLConfig", "load_policy_model", "preference_instruction", "soup", "train_conditioned_policy", "train_rl_policy",
           "weighted_reward_fn"]
