"""A small DINOv2-shaped model with planted register neurons, and the images that make them fire.

No downloadable checkpoint shows high-norm outliers offline, so this one is built by hand, deterministically from a
seed, to have the mechanism of the paper (Proposition 1):

* the patch embedding puts high-pass filter responses into the residual stream (zero on uniform patches);
* layer 0's MLP turns them into a "texture energy" feature, ``GELU(h) + GELU(-h) ≈ |h|``;
* the planted neurons of `PLANTED_LAYER` fire where the energy is low (uniform regions, never on CLS) and write a
  large vector along an "outlier direction": high-norm outlier tokens;
* every later layer's queries match keys along the outlier direction: the CLS token's attention sinks onto them.

Every other weight is small and random, so the planted neurons must be found among many others.
"""

import torch
from torch import nn

from .configs.dinov2 import Dinov2TTRegConfig
from .modeling.dinov2 import Dinov2TTRegModel

PLANTED_LAYER = 3
PLANTED_NEURONS = (37, 101, 222, 300)
IMAGE_SIZE = 224

_WIDTH, _LAYERS, _HEADS = 96, 6, 4
_ANCHOR = slice(0, 8)  # a constant pattern every token carries: keeps LayerNorm's scale steady, feeds the queries
_HIGH_PASS = slice(8, 16)  # high-pass filter responses of the patch
_ENERGY = 16  # texture energy, written by layer 0's MLP
_CLS_MARK = 17  # set on CLS only; keeps the planted neurons off it
_OUTLIER = slice(24, 48)  # the outlier direction


def _alternating(size: int) -> torch.Tensor:
    """A unit vector of alternating signs: its mean is zero, so LayerNorm keeps it."""
    return torch.tensor([(-1.0) ** i for i in range(size)]) / size**0.5


def planted_config(**settings) -> Dinov2TTRegConfig:
    """The planted model's configuration (ViT with patch 14 at 224 px, width 96, 6 layers, MLP width 384)."""
    settings = {"register_neurons": {}, "num_test_time_registers": 1, **settings}
    return Dinov2TTRegConfig(
        hidden_size=_WIDTH,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        mlp_ratio=4,
        patch_size=14,
        image_size=IMAGE_SIZE,
        layerscale_value=1.0,
        **settings,
    )


def planted_index() -> dict[int, tuple[int, ...]]:
    """The ground truth: the neurons planted to write the outliers."""
    return {PLANTED_LAYER: PLANTED_NEURONS}


@torch.no_grad()
def build_planted_model(seed: int = 0, **settings) -> Dinov2TTRegModel:
    """The planted model in eval mode; ``settings`` go to the config (e.g. ``register_neurons=planted_index()``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Dinov2TTRegModel(planted_config(**settings)).eval()
        _plant_texture_energy(model, torch.Generator().manual_seed(seed))
    _plant_register_neurons(model)
    _plant_attention_sink(model)
    return model


def _plant_texture_energy(model: Dinov2TTRegModel, generator: torch.Generator) -> None:
    embeddings = model.embeddings
    anchor = 12.0 * _alternating(_ANCHOR.stop - _ANCHOR.start)
    projection = embeddings.patch_embeddings.projection
    projection.bias[_ANCHOR] = anchor
    for channel in range(_HIGH_PASS.start, _HIGH_PASS.stop):
        signs = torch.ones(14 * 14)
        signs[torch.randperm(14 * 14, generator=generator)[: 14 * 14 // 2]] = -1.0  # balanced: sums to zero
        projection.weight[channel] = 0.08 * signs.view(1, 14, 14).expand(3, 14, 14)
        projection.bias[channel] = 0.0
    embeddings.cls_token[0, 0].zero_()
    embeddings.cls_token[0, 0, _ANCHOR] = anchor
    embeddings.cls_token[0, 0, _CLS_MARK] = 6.0
    mlp = model.encoder.layer[0].mlp
    for k, channel in enumerate(range(_HIGH_PASS.start, _HIGH_PASS.stop)):
        for neuron, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
            mlp.fc1.weight[neuron].zero_()
            mlp.fc1.weight[neuron, channel] = 2.0 * sign
            mlp.fc1.bias[neuron] = 0.0
            mlp.fc2.weight[:, neuron].zero_()
            mlp.fc2.weight[_ENERGY, neuron] = 0.5


def _plant_register_neurons(model: Dinov2TTRegModel) -> None:
    mlp = model.encoder.layer[PLANTED_LAYER].mlp
    outlier_direction = _alternating(_OUTLIER.stop - _OUTLIER.start)
    for neuron in PLANTED_NEURONS:
        mlp.fc1.weight[neuron].zero_()
        mlp.fc1.weight[neuron, _ENERGY] = -12.0
        mlp.fc1.weight[neuron, _CLS_MARK] = -4.0
        mlp.fc1.bias[neuron] = 3.0
        mlp.fc2.weight[:, neuron].zero_()
        mlp.fc2.weight[_OUTLIER, neuron] = 40.0 * outlier_direction


def _plant_attention_sink(model: Dinov2TTRegModel) -> None:
    head_dim = _WIDTH // _HEADS
    anchor_direction = _alternating(_ANCHOR.stop - _ANCHOR.start)
    outlier_direction = _alternating(_OUTLIER.stop - _OUTLIER.start)
    for block in model.encoder.layer[PLANTED_LAYER + 1 :]:
        attention = block.attention
        for head in range(_HEADS):
            row = head * head_dim
            _set_row(attention.q_proj, row, _ANCHOR, 1.0 * anchor_direction)
            _set_row(attention.k_proj, row, _OUTLIER, 1.0 * outlier_direction)


def _set_row(linear: nn.Linear, row: int, columns: slice, values: torch.Tensor) -> None:
    linear.weight[row].zero_()
    linear.weight[row, columns] = values
    linear.bias[row] = 0.0


def textured_images(num_images: int, seed: int = 0, size: int = IMAGE_SIZE, uniform_regions: bool = True) -> torch.Tensor:
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

