"""MAVIS decoding: the tilt (pure math), the one decode engine, and the front doors built on it.

    from mavis_align.decoding import MavisDecoder, MavisLogitsProcessor
    dec = MavisDecoder.load("smollm2-135m-instruct", ["helpful=path/to/value"])
    dec.generate(["How do I bake bread?"], weights={"helpful": 1.0}, beta=2.0, seed=0)

* :mod:`.tilt`: top-k-free math: combine values, NORMALIZE, the tilted log-probabilities, weights.
* :mod:`.engine`: per-row parameters, the per-step chain (:func:`step_distribution`), the one
  sampler and stop rule, and :class:`DecodeState` (a batch rows join and leave between steps).
* :mod:`.steppers`: KV-cached base model and value scorers the engine steps.
* :mod:`.decoder` (sampling, greedy, beam search), :mod:`.beam`, :mod:`.processor` (HF
  ``LogitsProcessor``); the server (:mod:`mavis_align.serve`) and tree collection use the engine too.
"""

from ..generation import DEFAULT_TOP_K, Generation, SamplingConfig
from .beam import BeamCandidate, BeamResult, value_beam_search
from .decoder import MavisDecoder, parse_value_spec, parse_weights
from .engine import (
    FINISH_REASONS,
    DecodedRow,
    DecodeState,
    RowSpec,
    RowTensors,
    StepDistribution,
    decode_ids,
    finish_reason,
    row_generator,
    row_seed,
    sample_positions,
    step_distribution,
)
from .processor import MavisLogitsProcessor
from .steppers import CachedBase, CachedValueScorer, NaiveBase, SequenceValueScorer, bind_objectives
from .tilt import combine_values, normalize_values, resolve_weights, tilted_logprobs

__all__ = [
    "DEFAULT_TOP_K", "FINISH_REASONS", "BeamCandidate", "BeamResult", "CachedBase", "CachedValueScorer", "DecodeState", "DecodedRow",
    "Generation", "MavisDecoder", "MavisLogitsProcessor", "NaiveBase", "RowSpec", "RowTensors", "SamplingConfig", "SequenceValueScorer",
    "StepDistribution", "bind_objectives", "combine_values", "decode_ids", "finish_reason", "normalize_values", "parse_value_spec",
    "parse_weights", "resolve_weights", "row_generator", "row_seed", "sample_positions", "step_distribution", "tilted_logprobs",
    "value_beam_search",
]
