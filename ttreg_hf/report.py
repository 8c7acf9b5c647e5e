"""The inspect report: patch norms and CLS attention at the layer the model reads from its tower (the last block of a
tower alone, a VLM's ``vision_feature_layer``), without and with the test-time register."""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .analysis.capture import ActivationCache, resolve_layer, run_with_cache
from .analysis.interventions import with_register_neurons
from .analysis.metrics import (
    LayerSummary,
    attention_source,
    automatic_threshold,
    cls_attention,
    patch_norms,
    summarize_layers,
)
from .analysis.towers import ConsumerLayer, consumer_layer, register_tower
from .errors import MissingDependencyError, TTRegValueError
from .images import GRID_SHAPES, patch_grids
from .modeling.registers import IndexSpec


@dataclass(frozen=True)
class Inspection:
    """One image through one setting of the model: the maps of one layer (``layer``) on the patch grid and their
    numbers.

    ``attention_source`` is ``"CLS"``, or ``"mean"`` for models without a CLS token (SigLIP): the attention each
    token gets averaged over all tokens (`ttreg_hf.analysis.cls_attention`)."""

    label: str
    layer: ConsumerLayer
    norm_map: torch.Tensor
    attention_map: torch.Tensor
    summary: LayerSummary
    attention_source: str = "CLS"

    def describe(self) -> str:
        s = self.summary
        text = (
            f"{self.label}: layer {self.layer.layer} ({self.layer.rule}), max/median patch norm "
            f"{s.max_median_ratio:.2f} (max {s.max_norm:.4g}, median {s.median_norm:.4g}), "
            f"{s.outliers_per_image:.0f} outlier tokens; {self.attention_source} attention: top patch "
            f"{100 * s.cls_top_patch_share:.1f} %, outliers {100 * s.cls_outlier_share:.1f} %"
        )
        if s.cls_register_share is not None:
            text += f", register {100 * s.cls_register_share:.1f} % (register norm {s.register_norm:.4g})"
        return text


def _grid(values: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    rows, columns = shape or (math.isqrt(values.numel()),) * 2
    if rows * columns != values.numel():
        raise TTRegValueError(f"{values.numel()} patches do not form a square grid; inspect square images.")
    return values.view(rows, columns).cpu()


def inspect_image(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    register_neurons: IndexSpec | None = None,
    layer: int | None = None,
) -> list[Inspection]:
    """One layer of ``model``'s tower (`register_tower`: any model that holds one) on one image's inputs (a batch of
    one: ``pixel_values``, and SigLIP2's NaFlex ``pixel_attention_mask`` and ``spatial_shapes``), with the edit off and
    with ``register_neurons`` (default: the model's own index). ``layer`` (a block, negative from the end) defaults to
    the one ``model`` reads from its tower (`consumer_layer`: the last block of a tower alone, a VLM's
    ``vision_feature_layer``). A padded NaFlex image is shown on its own patch grid, padding left out.

    Outliers are counted with one threshold for both: the automatic one of the run without the edit.
    """
    tower = register_tower(model)
    if layer is None:
        chosen = consumer_layer(model)
    else:
        chosen = ConsumerLayer(resolve_layer(layer, len(tower.transformer_blocks)), "given")
    inputs = dict(inputs)
    pixel_values = inputs.pop("pixel_values")
    shape = patch_grids(inputs)[0] if GRID_SHAPES in inputs else None
    runs, threshold = [], None
    for label, neurons in (("original", {}), ("with test-time register", register_neurons)):
        with with_register_neurons(tower, neurons):
            _, cache = run_with_cache(tower, pixel_values, blocks=[chosen.layer], attentions=[chosen.layer], **inputs)
        layer = chosen.layer
        if shape is not None:  # the image's own patches: the first rows x columns of the padded sequence
            cache = _without_padding(cache, layer, shape[0] * shape[1])
        norms = patch_norms(cache.block_outputs[layer], cache.layout)[0]
        threshold = automatic_threshold(norms) if threshold is None else threshold
        attention = cache.layout.patches(cls_attention(cache.attentions[layer], cache.layout).unsqueeze(-1))[0, :, 0]
        summary = summarize_layers(cache, threshold)[0]
        runs.append(
            Inspection(
                label, chosen, _grid(norms, shape), _grid(attention, shape), summary, attention_source(cache.layout)
            )
        )
    return runs


def _without_padding(cache: ActivationCache, layer: int, num_patches: int) -> ActivationCache:
    """``cache``'s layer ``layer`` with only the prefix, the first ``num_patches`` patches and the registers."""
    layout = cache.layout
    keep = torch.cat(
        [
            torch.arange(layout.num_prefix_tokens + num_patches),
            torch.arange(-layout.num_registers, 0) + cache.block_outputs[layer].shape[1],
        ]
    ).to(cache.block_outputs[layer].device)
    attentions = cache.attentions[layer].index_select(-2, keep).index_select(-1, keep)
    return ActivationCache(
        layout, block_outputs={layer: cache.block_outputs[layer][:, keep]}, attentions={layer: attentions}
    )


def save_report(image: torch.Tensor, inspections: list[Inspection], path: str | Path, title: str = "") -> Path:
    """A figure with one row per inspection: the input, the patch-norm map and the CLS attention map, with numbers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise MissingDependencyError("The report needs matplotlib: pip install 'ttreg_hf[plot]'.") from error
    figure, axes = plt.subplots(len(inspections), 3, figsize=(11, 3.6 * len(inspections)), squeeze=False)
    norm_max = max(float(i.norm_map.max()) for i in inspections)  # shared scales: the rows compare at a glance
    attention_max = max(float(i.attention_map.max()) for i in inspections)
    for row, inspection in zip(axes, inspections):
        s = inspection.summary
        row[0].imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        row[0].set_title(f"input: {inspection.label}", fontsize=10)
        shown = row[1].imshow(inspection.norm_map.numpy(), cmap="viridis", vmin=0, vmax=norm_max)
        row[1].set_title(
            f"patch norm, layer {inspection.layer.layer}\nmax/median {s.max_median_ratio:.1f}, {s.outliers_per_image:.0f} outliers",
            fontsize=10,
        )
        figure.colorbar(shown, ax=row[1], fraction=0.046, pad=0.04)
        shown = row[2].imshow(inspection.attention_map.numpy(), cmap="inferno", vmin=0, vmax=attention_max)
        register = "" if s.cls_register_share is None else f", register {100 * s.cls_register_share:.0f} %"
        row[2].set_title(
            f"{inspection.attention_source} attention, layer {inspection.layer.layer}\ntop patch {100 * s.cls_top_patch_share:.0f} %{register}",
            fontsize=10,
        )
        figure.colorbar(shown, ax=row[2], fraction=0.046, pad=0.04)
        for axis in row:
            axis.set_xticks([])
            axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=12)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path
