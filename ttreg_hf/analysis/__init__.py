"""Analysis tools that work on every model family: capture internals, measure outliers, intervene."""

from .capture import ActivationCache, capture, observe, run_with_cache
from .interventions import ablate_neurons, rewrite_activations, shift_outliers, with_register_neurons
from .metrics import (
    LayerSummary,
    attention_source,
    automatic_threshold,
    cls_attention,
    max_median_ratio,
    patch_norms,
    summarize_layers,
)

__all__ = [
    "ActivationCache",
    "LayerSummary",
    "ablate_neurons",
    "attention_source",
    "automatic_threshold",
    "capture",
    "cls_attention",
    "max_median_ratio",
    "observe",
    "patch_norms",
    "rewrite_activations",
    "run_with_cache",
    "shift_outliers",
    "summarize_layers",
    "with_register_neurons",
]
