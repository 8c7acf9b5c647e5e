"""Analysis tools that work on every model family, on the one register tower of any model that holds one: capture
internals, measure outliers, intervene."""

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
from .towers import ConsumerLayer, consumer_layer, register_tower

__all__ = [
    "ActivationCache",
    "ConsumerLayer",
    "LayerSummary",
    "ablate_neurons",
    "attention_source",
    "automatic_threshold",
    "capture",
    "cls_attention",
    "consumer_layer",
    "max_median_ratio",
    "observe",
    "patch_norms",
    "register_tower",
    "rewrite_activations",
    "run_with_cache",
    "shift_outliers",
    "summarize_layers",
    "with_register_neurons",
]
