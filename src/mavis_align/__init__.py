"""mavis-align: multi-objective alignment via value-guided inference-time search (MAVIS).

The front door::

    from mavis_align import MavisDecoder, SamplingConfig, ValueModel, MavisLogitsProcessor, get_reward

Submodules load lazily, so ``import mavis_align`` stays cheap (torch and transformers load on first use).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MavisDecoder": "mavis_align.decoding.decoder",
    "MavisLogitsProcessor": "mavis_align.decoding.processor",
    "SamplingConfig": "mavis_align.generation",
    "ValueModel": "mavis_align.values",
    "TreeConfig": "mavis_align.collect.builder",
    "TrainConfig": "mavis_align.train.regression",
    "train_value_model": "mavis_align.train.regression",
    "get_reward": "mavis_align.rewards",
    "get_rewards": "mavis_align.rewards",
    "load_causal_lm": "mavis_align.models",
    "evaluate_policy": "mavis_align.evaluate.evaluator",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mavis_align' has no attribute {name!r}")
