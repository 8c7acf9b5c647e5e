"""Planted register neurons: a synthetic test bench for register-neuron discovery on any ViT, and the images that
make the neurons fire.

No downloadable checkpoint shows high-norm outliers offline, so `plant_register_neurons` builds the mechanism of the
paper (Proposition 1) into a randomly initialised ViT, deterministically from a seed:

* the patch embedding puts high-pass filter responses into the residual stream (zero on uniform patches);
* block 0's MLP turns them into a "texture energy" feature, ``GELU(h) + GELU(-h) ≈ |h|``;
* the planted neurons fire where the energy is low (uniform regions, never on a prefix token) and write a large
  vector along an "outlier direction": high-norm outlier tokens;
* every later block's queries match keys along the outlier direction: the attention sinks onto them.

Every other weight keeps its random value, so the planted neurons must be found among many others. A model names the
weights planting writes in `PlantingSites`; `planting_sites` knows the package's families. `build_planted_model` is
the demo's DINOv2-shaped model with `PLANTED_NEURONS` at `PLANTED_LAYER`, registered as the checkpoint ``"planted"``
(`load_tt_model("planted")`, the CLI's MODEL ``planted``) with the planted neurons as its shipped index.
"""

from collections.abc import Sequence

import torch
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .configs.dinov2 import Dinov2TTRegConfig
from .errors import TTRegTypeError, TTRegValueError
from .family import Checkpoint
from .images import Preprocessor, normalize, statistics_preprocessor
from .modeling.dinov2 import Dinov2TTRegModel
from .modeling.sites import BlockSites, PlantingSites, Projection
from .registry import family_of, register_checkpoint

PLANTED_LAYER = 3
PLANTED_NEURONS = (37, 101, 222, 300)
IMAGE_SIZE = 224

_WIDTH, _LAYERS, _HEADS = 96, 6, 4
# the planted model's architecture, which its planted neurons and the demo's numbers are made for
_ARCHITECTURE = dict(
    hidden_size=_WIDTH,
    num_hidden_layers=_LAYERS,
    num_attention_heads=_HEADS,
    mlp_ratio=4,
    patch_size=14,
    image_size=IMAGE_SIZE,
    layerscale_value=1.0,
)

# The residual-stream channels planting uses (a model needs a width of at least `OUTLIER.stop`); every other channel
# keeps its random weights.
ANCHOR = slice(0, 8)  # a constant pattern every token carries: keeps LayerNorm's scale steady, feeds the queries
HIGH_PASS = slice(8, 16)  # high-pass filter responses of the patch (zero on uniform patches)
ENERGY = 16  # texture energy, written by block 0's MLP (its neurons 0-15)
PREFIX_MARK = 17  # set on the prefix tokens (CLS, trained registers) only; keeps the planted neurons off them
OUTLIER = slice(24, 48)  # the outlier direction


def alternating(size: int) -> torch.Tensor:
    """A unit vector of alternating signs: its mean is zero, so LayerNorm keeps it."""
    return torch.tensor([(-1.0) ** i for i in range(size)]) / size**0.5


def planted_config(**settings) -> Dinov2TTRegConfig:
    """The planted model's configuration (ViT with patch 14 at 224 px, width 96, 6 layers, MLP width 384)."""
    fixed = sorted(_ARCHITECTURE.keys() & settings.keys())
    if fixed:
        raise TTRegValueError(
            f"The planted model's architecture is fixed (its neurons are planted in it): drop {', '.join(fixed)}."
        )
    settings = {"register_neurons": {}, "num_test_time_registers": 1, **settings}
    return Dinov2TTRegConfig(**_ARCHITECTURE, **settings)


def planted_index() -> dict[int, tuple[int, ...]]:
    """The ground truth: the neurons planted to write the outliers."""
    return {PLANTED_LAYER: PLANTED_NEURONS}


@torch.no_grad()
def build_planted_model(seed: int = 0, **settings) -> Dinov2TTRegModel:
    """The planted model in eval mode; ``settings`` go to the config (e.g. ``register_neurons=planted_index()``), whose
    ``dtype`` the model is in (planted in float32, then converted: the same model in that dtype)."""
    if type(seed) is not int:  # a float or a bool would seed another model, or fail inside torch
        raise TTRegTypeError(f"seed must be an int, got {seed!r}.")
    config = planted_config(**settings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Dinov2TTRegModel(config).eval()
    plant_register_neurons(planting_sites(model), PLANTED_LAYER, PLANTED_NEURONS, seed=seed, quiet_channels=False)
    return model if config.dtype is None else model.to(config.dtype)


@torch.no_grad()
def plant_register_neurons(
    sites: PlantingSites,
    layer: int,
    neurons: Sequence[int],
    *,
    seed: int = 0,
    attention_sink: bool = True,
    quiet_channels: bool = True,
) -> None:
    """Give a (randomly initialised) ViT register neurons: ``neurons`` of block ``layer`` write high-norm outliers.

    The patch projection puts high-pass responses of each patch into the residual stream (zero on uniform patches,
    drawn with ``seed``); block 0's MLP turns them into a texture energy ``≈ |h|`` (its neurons 0-15); the planted
    neurons fire where that energy is low (uniform patches, never on a prefix token) and write a large vector along
    `OUTLIER`; with ``attention_sink``, every later block's queries match the outliers' keys. Only the channels and
    rows named here are written: every other weight keeps its value, so the planted neurons hide among the others.
    The MLP activation must be ≈ 0 for negative inputs and ≈ its input for large positive ones (GELU, QuickGELU, SiLU,
    ReLU; for gated MLPs, that of the gate).

    ``quiet_channels`` first zeroes what the patch projection, the position table and every block's attention and
    MLP outputs write into the planted channels (`ANCHOR` to `OUTLIER`), and what the MLPs read from them, so that
    only the planted mechanism uses them: needed where the random init is large (CLIP's, OpenCLIP's, SigLIP's), whose
    attention would blur the signal and whose neurons after ``layer`` would respond to the outliers as strongly as
    the planted ones. `build_planted_model` predates it and keeps its published weights without it.
    """
    check_sites(sites, layer, neurons)
    if quiet_channels:
        planted_channels = slice(ANCHOR.start, OUTLIER.stop)
        outputs = (p for block in sites.blocks for p in (block.attention_out, block.mlp_out) if p is not None)
        for projection in (sites.patch_projection, *outputs):
            projection.weight[planted_channels] = 0.0
            if projection.bias is not None:
                projection.bias[planted_channels] = 0.0
        if sites.position_embedding is not None:
            sites.position_embedding[..., planted_channels] = 0.0
        for projection in (p for b in sites.blocks for p in (b.mlp_in, b.mlp_up) if p is not None):
            projection.weight[:, planted_channels] = 0.0  # no MLP neuron but the planted ones reads them
    plant_texture_energy(sites, torch.Generator().manual_seed(seed))
    blocks = sites.blocks
    outlier_direction = alternating(OUTLIER.stop - OUTLIER.start)
    reads = {ENERGY: -12.0, **({PREFIX_MARK: -4.0} if sites.prefix_tokens else {})}
    for neuron in neurons:
        _set_mlp_neuron(blocks[layer], neuron, reads, 3.0, OUTLIER, 40.0 * outlier_direction)
    if attention_sink:
        anchor_direction = alternating(ANCHOR.stop - ANCHOR.start)
        for block in blocks[layer + 1 :]:
            if block.query is None or block.key is None:
                continue
            head_dim = block.query.weight.shape[0] // sites.num_heads
            for head in range(sites.num_heads):
                _set_row(block.query, head * head_dim, ANCHOR, anchor_direction)
                _set_row(block.key, head * head_dim, OUTLIER, outlier_direction)


def plant_texture_energy(sites: PlantingSites, generator: torch.Generator) -> None:
    """The anchor and the high-pass responses in the patch embedding; block 0's neurons 0-15 write their energy."""
    projection = sites.patch_projection
    anchor = 12.0 * alternating(ANCHOR.stop - ANCHOR.start)
    if projection.bias is not None:
        projection.bias[ANCHOR] = anchor
    else:
        sites.position_embedding[..., ANCHOR] = anchor  # every token's, the prefix tokens' included
    if isinstance(projection, nn.Conv2d):
        channels, patch_h, patch_w = projection.weight.shape[1:]
        area = patch_h * patch_w
    else:
        area, channels = projection.in_features // 3, 3
    for channel in range(HIGH_PASS.start, HIGH_PASS.stop):
        signs = torch.ones(area)
        signs[torch.randperm(area, generator=generator)[: area // 2]] = -1.0  # balanced: sums to zero
        if isinstance(projection, nn.Conv2d):
            projection.weight[channel] = 0.08 * signs.view(1, patch_h, patch_w).expand(channels, patch_h, patch_w)
        else:
            projection.weight[channel] = 0.08 * signs.repeat_interleave(channels)  # channel-last patches
        if projection.bias is not None:
            projection.bias[channel] = 0.0
    for token in sites.prefix_tokens:
        rows = token.view(-1, token.shape[-1])
        rows.zero_()
        if projection.bias is not None:
            rows[:, ANCHOR] = anchor
        rows[:, PREFIX_MARK] = 6.0
    for k, channel in enumerate(range(HIGH_PASS.start, HIGH_PASS.stop)):
        for neuron, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
            _set_mlp_neuron(sites.blocks[0], neuron, {channel: 2.0 * sign}, 0.0, slice(ENERGY, ENERGY + 1), 0.5)


def check_sites(sites: PlantingSites, layer: int, neurons: Sequence[int]) -> None:
    """Refuse what planting cannot do, in one line naming the fix."""
    width = sites.blocks[0].mlp_out.weight.shape[0]
    mlp_width = sites.blocks[0].mlp_out.weight.shape[1]
    if width < OUTLIER.stop:
        raise TTRegValueError(f"Planting needs a model width of at least {OUTLIER.stop}, got {width}.")
    if not 0 < layer < len(sites.blocks):
        raise TTRegValueError(
            f"The planted layer must be one of 1-{len(sites.blocks) - 1} (block 0 computes the texture energy the "
            f"planted neurons read), got {layer}."
        )
    if not neurons or any(not 0 <= n < mlp_width for n in neurons) or len(set(neurons)) != len(neurons):
        raise TTRegValueError(f"Planted neurons must be distinct ids in 0-{mlp_width - 1}, got {list(neurons)}.")
    if sites.blocks[layer].mlp_in.bias is None:
        raise TTRegValueError(f"Block {layer}'s MLP input projection has no bias: the planted neurons need one.")
    if sites.patch_projection.bias is None and sites.position_embedding is None:
        raise TTRegValueError(
            "The patch projection has no bias: give PlantingSites a position_embedding for the anchor."
        )
    for index in (0, layer):
        block = sites.blocks[index]
        if block.mlp_up is not None and block.mlp_up.bias is None:
            raise TTRegValueError(
                f"Block {index}'s gated MLP has an up projection without bias: planting sets a neuron's up row to the "
                "constant 1 and needs one."
            )


def _set_mlp_neuron(
    block: BlockSites, neuron: int, weights: dict[int, float], bias: float, outputs: slice, output_values
) -> None:
    """Neuron ``neuron`` reads only ``weights`` (channel: weight) plus ``bias`` and writes only ``outputs``."""
    row = block.mlp_in.weight[neuron]
    row.zero_()
    for channel, weight in weights.items():
        row[channel] = weight
    if block.mlp_in.bias is not None:
        block.mlp_in.bias[neuron] = bias
    if block.mlp_up is not None:
        block.mlp_up.weight[neuron].zero_()
        block.mlp_up.bias[neuron] = 1.0
    block.mlp_out.weight[:, neuron].zero_()
    block.mlp_out.weight[outputs, neuron] = output_values


def _set_row(linear: Projection, row: int, columns: slice, values: torch.Tensor) -> None:
    linear.weight[row].zero_()
    linear.weight[row, columns] = values
    if linear.bias is not None:
        linear.bias[row] = 0.0


def textured_images(
    num_images: int, seed: int = 0, size: int = IMAGE_SIZE, uniform_regions: bool = True
) -> torch.Tensor:
    """Random textures with a few uniform rectangles, ``(num_images, 3, size, size)`` in ``[0, 1]``.

    The rectangles are the low-information regions where the planted neurons fire; deterministic for a seed.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(num_images, 3, size, size, generator=generator)
    images = 0.5 * noise + 0.5 * nn.functional.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)
    if uniform_regions:
        for image in images:
            for _ in range(int(torch.randint(1, 3, (), generator=generator))):
                height, width = (int(v) for v in torch.randint(size // 8, size // 4, (2,), generator=generator))
                top, left = (int(v) for v in torch.randint(0, size - max(height, width), (2,), generator=generator))
                image[:, top : top + height, left : left + width] = torch.rand(3, 1, 1, generator=generator)
    return images


def planting_sites(model: nn.Module) -> PlantingSites:
    """The `PlantingSites` of a model of one of the families (or of its parent class), from its declaration."""
    family = family_of(model)
    if family is None or family.planting_sites is None:
        raise TTRegTypeError(
            f"No planting sites known for {type(model).__name__}; build a `PlantingSites` of its modules (see "
            "`ttreg_hf.planted.PlantingSites`), or declare its family's `planting_sites` (`ttreg_hf.family`)."
        )
    return family.planting_sites(model)


def planted_preprocessor(image_size: int = IMAGE_SIZE) -> Preprocessor:
    """The planted model's preprocessing: hand-written, ImageNet's statistics (it is DINOv2-shaped)."""
    return statistics_preprocessor(
        image_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "the planted model's (ImageNet statistics)"
    )


def planted_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]`` (e.g. `textured_images`) as the planted model's pixel values."""
    return normalize(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def _load_planted(*, pretrained: bool, weights, register_neurons, **settings) -> Dinov2TTRegModel:
    """The planted checkpoint's loader: `build_planted_model` (planted weights, with ``pretrained`` or not) with
    ``register_neurons``, else the planted ones (`planted_index`), as a named checkpoint gets its shipped index."""
    if weights is not None:
        raise TTRegValueError("The planted model is built here, not loaded: it takes no weights; drop them.")
    model = build_planted_model(**settings)
    model.set_register_neurons(planted_index() if register_neurons is None else register_neurons)
    return model


PLANTED = register_checkpoint(
    Checkpoint(
        "planted",
        "The planted test bench: a random DINOv2-shaped ViT (6 layers, width 96) with register neurons planted.",
        _load_planted,
        preprocessing=lambda image_size: planted_preprocessor(image_size or IMAGE_SIZE),
    )
)
