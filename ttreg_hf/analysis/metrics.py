"""Outlier metrics: patch norms, the outlier threshold, CLS attention shares, and a per-layer summary."""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import TTRegValueError
from ..modeling.layout import TokenLayout
from ..registry import family_of
from .capture import ActivationCache
from .distributed import all_reduce

MAD_FACTOR = 6.0  # automatic threshold: median + MAD_FACTOR robust standard deviations ...
MIN_NORM_RATIO = 3.0  # ... and at least MIN_NORM_RATIO times the median: a tight, outlier-free spread flags nothing
MAD_TO_STD = 1.4826  # a normal distribution's std over its median absolute deviation


def patch_norms(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """L2 norm of every patch token, ``(batch, patches)``, in float32."""
    return layout.patches(tokens).float().norm(dim=-1)


def patch_mask(inputs: torch.Tensor | Mapping[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor | None:
    """Which patch positions of a batch are real images' patches, ``(batch, patches)`` bool; `None` when unpadded.

    ``inputs`` are ``model``'s: pixel values, or a dict of keyword inputs. Its family declares the input that marks a
    padded batch's real patches (`Family.padding_mask`: SigLIP2's NaFlex ``pixel_attention_mask``, 1 real, 0 padding),
    one entry per patch position, as `patch_norms` returns them.
    """
    family = family_of(model)
    name = family.padding_mask if family is not None else None
    mask = inputs.get(name) if name is not None and isinstance(inputs, Mapping) else None
    if mask is None:
        return None
    mask = mask.bool()
    return None if bool(mask.all()) else mask


def max_median_ratio(norms: torch.Tensor) -> torch.Tensor:
    """Per image, the largest patch norm over the median one, ``(batch,)``."""
    return norms.amax(dim=-1) / norms.median(dim=-1).values


def robust_threshold(median: float, mad: float) -> float:
    """The automatic outlier threshold from the median and median absolute deviation of the patch norms."""
    return max(median + MAD_FACTOR * MAD_TO_STD * mad, MIN_NORM_RATIO * median)


def automatic_threshold(norms: torch.Tensor) -> float:
    """`robust_threshold` of all the norms in ``norms`` (exact, for a tensor in memory)."""
    median = norms.flatten().median()
    return robust_threshold(float(median), float((norms - median).abs().median()))


def cls_attention(
    attentions: torch.Tensor, layout: TokenLayout, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The CLS token's attention over all tokens, averaged over heads, ``(batch, tokens)``. A model without a CLS
    token (SigLIP, ``layout.num_prefix_tokens == 0``) has no such row: there it is the attention each token gets,
    averaged over all tokens (`attention_source` names which) — over the real ones when ``token_mask`` (``(batch,
    tokens)``, true on real tokens, e.g. `ActivationCache.token_mask`) marks a padded batch's padding."""
    attentions = attentions.float().mean(dim=1)
    if layout.num_prefix_tokens:
        return attentions[:, 0]
    if token_mask is None:
        return attentions.mean(dim=1)
    real = token_mask.to(attentions.device, torch.float32).unsqueeze(-1)
    return (attentions * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)


def attention_source(layout: TokenLayout) -> str:
    """What `cls_attention` reads for this layout: ``"CLS"``, or ``"mean"`` (over all tokens) without a CLS token."""
    return "CLS" if layout.num_prefix_tokens else "mean"


class NormHistogram:
    """Streaming histogram of norms on log-spaced bins (1.1 % wide): fixed memory, summable across processes."""

    LOW, HIGH, BINS_PER_OCTAVE = 2.0**-12, 2.0**24, 64

    def __init__(self, device: torch.device | str = "cpu"):
        num_bins = int(math.log2(self.HIGH / self.LOW)) * self.BINS_PER_OCTAVE
        self.counts = torch.zeros(num_bins, dtype=torch.float64, device=device)
        self.maximum = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, norms: torch.Tensor, mask: torch.Tensor | None = None) -> "NormHistogram":
        """Count ``norms`` (any shape), or those where ``mask`` (same shape) is true; returns the histogram.

        No host synchronisation: the counts and the maximum stay on the device."""
        norms = norms.double()
        weights = torch.ones_like(norms) if mask is None else mask.to(norms.dtype)
        if mask is not None:
            norms = norms.masked_fill(~mask, 1.0)  # what padding holds is never binned, nor its maximum taken
        bins = (norms.clamp(self.LOW, self.HIGH).log2() - math.log2(self.LOW)) * self.BINS_PER_OCTAVE
        self.counts.index_add_(0, bins.long().clamp(max=len(self.counts) - 1).flatten(), weights.flatten())
        if mask is not None:
            norms = norms.masked_fill(~mask, 0.0)
        if norms.numel():
            self.maximum = torch.maximum(self.maximum, norms.max())
        return self

    def __iadd__(self, other: "NormHistogram") -> "NormHistogram":
        self.counts += other.counts.to(self.counts.device)
        self.maximum = torch.maximum(self.maximum, other.maximum.to(self.maximum.device))
        return self

    def all_reduce(self) -> "NormHistogram":
        """Merge the histograms of all processes (under ``torchrun``), in place; returns it."""
        all_reduce(self.counts)
        all_reduce(self.maximum, op="max")
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _centers(self) -> torch.Tensor:
        steps = torch.arange(len(self.counts), dtype=torch.float64, device=self.counts.device) + 0.5
        return self.LOW * torch.exp2(steps / self.BINS_PER_OCTAVE)

    @staticmethod
    def _weighted_median(values: torch.Tensor, counts: torch.Tensor) -> float:
        order = values.argsort()
        cumulative = counts[order].cumsum(0)
        return float(values[order][torch.searchsorted(cumulative, cumulative[-1] / 2)])

    def median(self) -> float:
        return self._weighted_median(self._centers(), self.counts)

    def mad(self) -> float:
        """The median absolute deviation from the median."""
        return self._weighted_median((self._centers() - self.median()).abs(), self.counts)

    def threshold(self) -> float:
        """The automatic outlier threshold of the counted norms: `robust_threshold` of their median and MAD."""
        return robust_threshold(self.median(), self.mad())


@dataclass(frozen=True)
class LayerSummary:
    """One layer's outlier picture, averaged over the images (attention shares are `None` where not captured)."""

    layer: int
    max_norm: float
    median_norm: float
    max_median_ratio: float
    outliers_per_image: float
    threshold: float
    register_norm: float | None = None
    cls_top_patch_share: float | None = None
    cls_outlier_share: float | None = None
    cls_register_share: float | None = None


def real_patches(cache: ActivationCache, tokens: torch.Tensor) -> torch.Tensor:
    """Which patches of ``tokens`` (a tensor of ``cache``'s forward) are real, ``(batch, patches)``: all of them
    unless ``cache.token_mask`` marks padding."""
    if cache.token_mask is None:
        return torch.ones(cache.layout.patches(tokens).shape[:2], dtype=torch.bool, device=tokens.device)
    return cache.layout.patches(cache.token_mask.unsqueeze(-1)).squeeze(-1).bool()


def summarize_layers(cache: ActivationCache, threshold: float | None = None) -> list[LayerSummary]:
    """A `LayerSummary` for every layer with block outputs in ``cache``; outliers are patches above ``threshold``.

    Without a threshold each layer gets `automatic_threshold` of its own patch norms. Only real patches count: the
    padding of a padded batch (``cache.token_mask``) is neither a patch nor an outlier, so each image gives what it
    gives alone; an image without a real patch is left out of the averages.
    """
    if threshold is not None and (not isinstance(threshold, (int, float)) or math.isnan(threshold)):
        raise TTRegValueError(f"threshold must be a number (a patch norm) or None (automatic), got {threshold!r}.")
    layout, summaries = cache.layout, []
    for layer, tokens in sorted(cache.block_outputs.items()):
        norms = patch_norms(tokens, layout)
        real = real_patches(cache, tokens).to(norms.device)
        images = real.any(dim=-1)  # with a real patch
        if not images.any():
            raise TTRegValueError(f"Layer {layer} has no real patch in this batch: every image is padding.")
        layer_threshold = automatic_threshold(norms[real]) if threshold is None else threshold
        outliers = ((norms > layer_threshold) & real)[images]
        maxima = norms.masked_fill(~real, float("-inf"))[images].amax(dim=-1)
        medians = norms.masked_fill(~real, float("nan"))[images].nanmedian(dim=-1).values
        fields = {
            "layer": layer,
            "max_norm": float(maxima.mean()),
            "median_norm": float(medians.mean()),
            "max_median_ratio": float((maxima / medians).mean()),
            "outliers_per_image": float(outliers.sum(dim=-1).float().mean()),
            "threshold": layer_threshold,
        }
        if layout.num_registers:
            fields["register_norm"] = float(layout.registers(tokens[images]).float().norm(dim=-1).amax(dim=-1).mean())
        if layer in cache.attentions:
            attention = cls_attention(cache.attentions[layer], layout, cache.token_mask)[images]
            fields.update(_cls_shares(attention, outliers, layout))
        summaries.append(LayerSummary(**fields))
    return summaries


def _cls_shares(attention: torch.Tensor, outliers: torch.Tensor, layout: TokenLayout) -> dict[str, float]:
    patches = layout.patches(attention.unsqueeze(-1)).squeeze(-1)
    shares = {
        "cls_top_patch_share": float(patches.amax(dim=-1).mean()),
        "cls_outlier_share": float((patches * outliers).sum(dim=-1).mean()),
    }
    if layout.num_registers:
        shares["cls_register_share"] = float(layout.registers(attention.unsqueeze(-1)).sum(dim=(1, 2)).mean())
    return shares
