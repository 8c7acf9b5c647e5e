"""`ttreg evaluate`: does the test-time register help this model on this data? Edit off vs on, side by side."""

from .evaluate import LAYER_MEASURES, TASKS, EvaluationResult, evaluate
from .statistics import Comparison, paired_bootstrap

__all__ = ["LAYER_MEASURES", "TASKS", "Comparison", "EvaluationResult", "evaluate", "paired_bootstrap"]
