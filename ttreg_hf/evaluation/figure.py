"""The figure of `ttreg evaluate`: a few images' last-layer maps without and with the register, and the per-layer
outlier curve (needs matplotlib, the ``plot`` extra)."""

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MissingDependencyError

if TYPE_CHECKING:
    from .evaluate import EvaluationResult

COLUMNS = (("norms/off", "patch norm, off"), ("norms/on", "patch norm, on"))
COLUMNS += (("attention/off", "CLS attention, off"), ("attention/on", "CLS attention, on"))


def save_figure(result: "EvaluationResult", path: str | Path) -> Path:
    """One row per example image (the input; the last layer's patch norms, edit off and on on one scale, and its
    CLS attention, each map on its own scale), and below, every layer's outlier ratio and outlier attention share with their intervals."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise MissingDependencyError(
            "The figure needs matplotlib: pip install 'ttreg_hf[plot]' (or pass --no-figure)."
        ) from error
    examples = result.examples.get("images", [])
    columns = [(key, title) for key, title in COLUMNS if examples and key in examples[0]]
    figure = plt.figure(figsize=(2.4 * (1 + len(columns)), 2.4 * len(examples) + 3.2))
    grid = figure.add_gridspec(len(examples) + 1, 1 + len(columns), height_ratios=[1] * len(examples) + [1.3])
    for row, maps in enumerate(examples):
        axis = figure.add_subplot(grid[row, 0])
        axis.imshow(maps["image"].permute(1, 2, 0).clamp(0, 1).numpy())
        axis.set_title("input" if row == 0 else "", fontsize=9)
        for column, (key, title) in enumerate(columns, start=1):
            kind = key.split("/")[0]  # norms on one scale per image; each attention map on its own
            top = max(float(maps[f"{kind}/{name}"].max()) for name in ("off", "on")) if kind == "norms" else None
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(maps[key].numpy(), cmap="viridis" if kind == "norms" else "inferno", vmin=0, vmax=top)
            axis.set_title(f"{title if row == 0 else ''}\nmax {float(maps[key].max()):.3g}", fontsize=8)
        for axis in figure.axes[-1 - len(columns) :]:
            axis.set_xticks([])
            axis.set_yticks([])
    if result.layers:
        layers = range(len(result.layers))
        for column, measure in enumerate(("outlier_ratio", "outlier_attention_share")):
            axis = figure.add_subplot(
                grid[-1, column * (1 + len(columns)) // 2 : (column + 1) * (1 + len(columns)) // 2]
            )
            for name, color in (("off", "tab:red"), ("on", "tab:blue")):
                comparisons = [layer[measure] for layer in result.layers]
                values = [getattr(c, name) for c in comparisons]
                low, high = zip(*(getattr(c, f"{name}_interval") for c in comparisons))
                axis.plot(layers, values, marker="o", color=color, label=f"edit {name}")
                axis.fill_between(layers, low, high, color=color, alpha=0.2)
            axis.set_xlabel("layer")
            axis.set_title(measure.replace("_", " "), fontsize=9)
            axis.legend(fontsize=8)
    figure.suptitle(f"{result.info['model']}: test-time register off vs on", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
