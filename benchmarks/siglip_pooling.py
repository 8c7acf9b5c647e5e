"""Should SigLIP's attention-pooling (MAP) head see the test-time registers? Measured on a planted SigLIP.

The planted model is `ttreg_hf.planted`'s mechanism on a SigLIP tower: register neurons at `PLANTED_LAYER` fire on
uniform patches and write high-norm outliers; every later block, and the MAP head's probe, attends to them (as the
trained heads of real SigLIPs attend to their high-norm tokens). The table compares `pooler_output` with the edit on,
the head pooling the registers or not, against two references: the ORIGINAL model (the same weights, no edit: what
the text tower or the LLM was trained on) and a CLEAN one (the planted neurons silenced: no outlier ever written).

    python benchmarks/siglip_pooling.py [--images 16]
"""

import argparse

import torch
from torch import nn

from ttreg_hf import SiglipVisionTTRegConfig, SiglipVisionTTRegModel
from ttreg_hf.planted import (  # the DINOv2 planted model's residual-stream layout, reused as is
    _ANCHOR,
    _ENERGY,
    _HIGH_PASS,
    _OUTLIER,
    IMAGE_SIZE,
    PLANTED_LAYER,
    PLANTED_NEURONS,
    _alternating,
    textured_images,
)

WIDTH, LAYERS, HEADS, PATCH = 96, 6, 4, 14


@torch.no_grad()
def build_planted_siglip(seed: int = 0, **settings) -> SiglipVisionTTRegModel:
    """A SigLIP-shaped planted model (no CLS, MAP head); ``settings`` go to the config."""
    config = SiglipVisionTTRegConfig(
        hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMAGE_SIZE, patch_size=PATCH, **{"register_neurons": {}, **settings},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipVisionTTRegModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    embeddings, layers = model.embeddings, model.encoder.layers
    plant_texture_energy(embeddings.patch_embedding, layers[0].mlp.fc1, layers[0].mlp.fc2, generator)
    embeddings.position_embedding.weight[:, : _OUTLIER.stop] = 0.0  # keep the planted channels clean
    plant_register_neurons(layers[PLANTED_LAYER].mlp.fc1, layers[PLANTED_LAYER].mlp.fc2)
    for layer in layers[PLANTED_LAYER + 1 :]:
        plant_attention_sink(layer.self_attn.q_proj, layer.self_attn.k_proj)
    plant_pooling_sink(model.head)
    return model


def plant_texture_energy(
    patch_embedding: nn.Conv2d, fc1: nn.Linear, fc2: nn.Linear, generator: torch.Generator
) -> None:
    """High-pass responses into the stream, and a first MLP that turns them into their energy ``≈ |h|``."""
    anchor = 12.0 * _alternating(_ANCHOR.stop - _ANCHOR.start)
    patch_embedding.bias[_ANCHOR] = anchor
    area = PATCH * PATCH
    for k, channel in enumerate(range(_HIGH_PASS.start, _HIGH_PASS.stop)):
        signs = torch.ones(area)
        signs[torch.randperm(area, generator=generator)[: area // 2]] = -1.0  # balanced: zero on uniform patches
        patch_embedding.weight[channel] = 0.08 * signs.view(1, PATCH, PATCH).expand(3, PATCH, PATCH)
        patch_embedding.bias[channel] = 0.0
        for neuron, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
            _set_row(fc1, neuron, slice(channel, channel + 1), torch.tensor([2.0 * sign]))
            fc2.weight[:, neuron] = 0.0
            fc2.weight[_ENERGY, neuron] = 0.5


def plant_register_neurons(fc1: nn.Linear, fc2: nn.Linear) -> None:
    """`PLANTED_NEURONS` fire where the texture energy is low and write along the outlier direction."""
    outlier_direction = _alternating(_OUTLIER.stop - _OUTLIER.start)
    for neuron in PLANTED_NEURONS:
        _set_row(fc1, neuron, slice(_ENERGY, _ENERGY + 1), torch.tensor([-12.0]))
        fc1.bias[neuron] = 3.0
        fc2.weight[:, neuron] = 0.0
        fc2.weight[_OUTLIER, neuron] = 40.0 * outlier_direction


def plant_attention_sink(q_proj: nn.Linear, k_proj: nn.Linear) -> None:
    """Every token's query (the anchor) matches the outliers' keys, in every head."""
    for head in range(HEADS):
        row = head * (WIDTH // HEADS)
        _set_row(q_proj, row, _ANCHOR, _alternating(_ANCHOR.stop - _ANCHOR.start))
        _set_row(k_proj, row, _OUTLIER, _alternating(_OUTLIER.stop - _OUTLIER.start))


def plant_pooling_sink(head: nn.Module) -> None:
    """The MAP head's probe matches the outliers' keys, in every head (``in_proj`` stacks q, k, v)."""
    head.probe.zero_()
    head.probe[0, 0, _ANCHOR] = 12.0 * _alternating(_ANCHOR.stop - _ANCHOR.start)
    attention = head.attention
    for h in range(HEADS):
        row = h * (WIDTH // HEADS)
        for offset, columns in ((0, _ANCHOR), (WIDTH, _OUTLIER)):  # the query rows, then the key rows
            attention.in_proj_weight[offset + row] = 0.0
            attention.in_proj_weight[offset + row, columns] = _alternating(columns.stop - columns.start)
            attention.in_proj_bias[offset + row] = 0.0


def _set_row(linear: nn.Linear, row: int, columns: slice, values: torch.Tensor) -> None:
    linear.weight[row] = 0.0
    linear.weight[row, columns] = values
    linear.bias[row] = 0.0


def compare(pooled: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity and mean relative L2 error over the images."""
    cosine = nn.functional.cosine_similarity(pooled, reference, dim=-1).mean()
    relative = ((pooled - reference).norm(dim=-1) / reference.norm(dim=-1)).mean()
    return float(cosine), float(relative)


def outlier_ratio(patches: torch.Tensor) -> float:
    """Largest over median patch-token norm, averaged over the images: about 1 without outliers."""
    norms = patches.norm(dim=-1)
    return float((norms.amax(dim=1) / norms.median(dim=1).values).mean())


@torch.no_grad()
def measure(num_images: int = 16, seed: int = 0) -> dict[str, tuple[torch.Tensor, float]]:
    """Per variant, ``pooler_output`` and the `outlier_ratio` of the last block's patch tokens (before the final
    LayerNorm), on the same textured images with uniform regions."""
    images = textured_images(num_images, seed=seed)
    model = build_planted_siglip(seed)

    def run() -> tuple[torch.Tensor, float]:
        outputs = model(images, output_hidden_states=True)
        return outputs.pooler_output, outlier_ratio(outputs.hidden_states[-1])

    results = {"original (no edit)": run()}
    model.set_register_neurons({PLANTED_LAYER: PLANTED_NEURONS})
    for pool_registers in (True, False):
        model.config.pool_registers = pool_registers
        results[f"edit, pool_registers={pool_registers}"] = run()
    model.set_register_neurons({})
    model.encoder.layers[PLANTED_LAYER].mlp.fc2.weight[:, list(PLANTED_NEURONS)] = 0.0
    results["clean (planted neurons silenced)"] = run()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = measure(args.images, args.seed)
    original, clean = results["original (no edit)"][0], results["clean (planted neurons silenced)"][0]
    print(f"pooler_output of a planted SigLIP ({args.images} images), means over the images")
    header = ("cos(original)", "relerr(original)", "cos(clean)", "relerr(clean)", "outlier ratio")
    print(f"{'variant':34}" + "".join(f"{column:>18}" for column in header))
    for name, (pooled, ratio) in results.items():
        row = (*compare(pooled, original), *compare(pooled, clean), ratio)
        print(f"{name:34}" + "".join(f"{value:18.4f}" for value in row))


if __name__ == "__main__":
    main()
