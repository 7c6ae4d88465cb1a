"""Evaluation: metrics, the shared evaluator of every method, Pareto sweeps."""

from .evaluator import evaluate_policy, evaluate_weightings, score_generations, teacher_forced_logprobs
from .metrics import distinct_n, hypervolume, pareto_front, perplexity
from .pareto import SweepSpec, load_sweep, run_sweep, weight_grid, write_fronts
from .policies import BestOfN, CombinedBase, DecoderPolicy, ModelPolicy, MODPolicy
from .summary import summarize

__all__ = ["SweepSpec", "load_sweep", "run_sweep", "weight_grid", "write_fronts", "evaluate_policy", "evaluate_weightings", "score_generations", "teacher_forced_logprobs", "BestOfN", "CombinedBase", "DecoderPolicy", "ModelPolicy", "MODPolicy", "distinct_n", "hypervolume", "pareto_front", "perplexity", "summarize"]
