"""The inspect report: patch norms and CLS attention of the last layer, without and with the test-time register."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .analysis.capture import run_with_cache
from .analysis.interventions import with_register_neurons
from .analysis.metrics import LayerSummary, automatic_threshold, cls_attention, patch_norms, summarize_layers
from .modeling.registers import IndexSpec, TestTimeRegisterMixin


@dataclass(frozen=True)
class Inspection:
    """One image through one setting of the model: last-layer maps on the patch grid and their numbers."""

    label: str
    norm_map: torch.Tensor
    attention_map: torch.Tensor
    summary: LayerSummary

    def describe(self) -> str:
        s = self.summary
        text = (
            f"{self.label}: max/median patch norm {s.max_median_ratio:.2f} (max {s.max_norm:.4g}, median {s.median_norm:.4g}), "
            f"{s.outliers_per_image:.0f} outlier tokens; CLS attention: top patch {100 * s.cls_top_patch_share:.1f} %, "
            f"outliers {100 * s.cls_outlier_share:.1f} %"
        )
        if s.cls_register_share is not None:
            text += f", register {100 * s.cls_register_share:.1f} % (register norm {s.register_norm:.4g})"
        return text


def _grid(values: torch.Tensor) -> torch.Tensor:
    side = math.isqrt(values.numel())
    if side * side != values.numel():
        raise ValueError(f"{values.numel()} patches do not form a square grid; inspect square images.")
    return values.view(side, side).cpu()


def inspect_image(
    model: TestTimeRegisterMixin, pixel_values: torch.Tensor, register_neurons: IndexSpec, **settings
) -> list[Inspection]:
    """The last layer of ``model`` on one image ``(1, 3, H, W)``, with the edit off and with ``register_neurons``.

    Outliers are counted with one threshold for both: the automatic one of the run without the edit.
    """
    runs, threshold = [], None
    for label, neurons in (("original", {}), ("with test-time register", register_neurons)):
        with with_register_neurons(model, neurons, **settings):
            _, cache = run_with_cache(model, pixel_values, blocks=[-1], attentions=[-1])
        layer = max(cache.block_outputs)
        norms = patch_norms(cache.block_outputs[layer], cache.layout)[0]
        threshold = automatic_threshold(norms) if threshold is None else threshold
        attention = cache.layout.patches(cls_attention(cache.attentions[layer]).unsqueeze(-1))[0, :, 0]
        runs.append(Inspection(label, _grid(norms), _grid(attention), summarize_layers(cache, threshold)[0]))
    return runs


def save_report(image: torch.Tensor, inspections: list[Inspection], path: str | Path, title: str = "") -> Path:
    """A figure with one row per inspection: the input, the patch-norm map and the CLS attention map, with numbers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise ImportError("The report needs matplotlib: pip install 'ttreg_hf[plot]'.") from error
    figure, axes = plt.subplots(len(inspections), 3, figsize=(11, 3.6 * len(inspections)), squeeze=False)
    norm_max = max(float(i.norm_map.max()) for i in inspections)  # shared scales: the rows compare at a glance
    attention_max = max(float(i.attention_map.max()) for i in inspections)
    for row, inspection in zip(axes, inspections):
        s = inspection.summary
        row[0].imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        row[0].set_title(f"input: {inspection.label}", fontsize=10)
        shown = row[1].imshow(inspection.norm_map.numpy(), cmap="viridis", vmin=0, vmax=norm_max)
        row[1].set_title(
            f"patch norm, last layer\nmax/median {s.max_median_ratio:.1f}, {s.outliers_per_image:.0f} outliers",
            fontsize=10,
        )
        figure.colorbar(shown, ax=row[1], fraction=0.046, pad=0.04)
        shown = row[2].imshow(inspection.attention_map.numpy(), cmap="inferno", vmin=0, vmax=attention_max)
        register = "" if s.cls_register_share is None else f", register {100 * s.cls_register_share:.0f} %"
        row[2].set_title(
            f"CLS attention, last layer\ntop patch {100 * s.cls_top_patch_share:.0f} %{register}", fontsize=10
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
