"""Value-model training: regression on rollout trees (eq. 6), policy iteration (Algorithm 1),
distillation into a multi-head model (App. E)."""

from .distill import DistillConfig, distill, distill_auto, distill_stacked, stack_teachers
from .iterate import Recipe, load_recipe, run_iterations
from .regression import TrainConfig, evaluate_mse, train_value_model

__all__ = ["DistillConfig", "distill", "distill_auto", "distill_stacked", "stack_teachers", "Recipe", "load_recipe", "run_iterations", "TrainConfig", "evaluate_mse", "train_value_model"]
