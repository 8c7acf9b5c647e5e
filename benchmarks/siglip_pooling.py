"""Should SigLIP's attention-pooling (MAP) head see the test-time registers? Measured on a planted SigLIP.

The planted model is `ttreg_hf.planted.plant_register_neurons` on a SigLIP tower: register neurons at `PLANTED_LAYER`
fire on uniform patches and write high-norm outliers; every later block, and the MAP head's probe, attends to them (as
the trained heads of real SigLIPs attend to their high-norm tokens). The table compares `pooler_output` with the edit
on, the head pooling the registers or not, against two references: the ORIGINAL model (the same weights, no edit: what
the text tower or the LLM was trained on) and a CLEAN one (the planted neurons silenced: no outlier ever written).

    python benchmarks/siglip_pooling.py [--images 16]
"""

import argparse

import torch
from torch import nn

from ttreg_hf import SiglipVisionTTRegConfig, SiglipVisionTTRegModel
from ttreg_hf.planted import (
    ANCHOR,
    IMAGE_SIZE,
    OUTLIER,
    PLANTED_LAYER,
    PLANTED_NEURONS,
    alternating,
    plant_register_neurons,
    planting_sites,
    textured_images,
)

WIDTH, LAYERS, HEADS, PATCH = 96, 6, 4, 14


@torch.no_grad()
def build_planted_siglip(seed: int = 0, **settings) -> SiglipVisionTTRegModel:
    """A SigLIP-shaped planted model (no CLS, MAP head); ``settings`` go to the config."""
    config = SiglipVisionTTRegConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        **{"register_neurons": {}, **settings},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipVisionTTRegModel(config).eval()
    plant_register_neurons(planting_sites(model), PLANTED_LAYER, PLANTED_NEURONS, seed=seed)  # quiet channels
    plant_pooling_sink(model.head)
    return model


def plant_pooling_sink(head: nn.Module) -> None:
    """The MAP head's probe matches the outliers' keys, in every head (``in_proj`` stacks q, k, v)."""
    head.probe.zero_()
    head.probe[0, 0, ANCHOR] = 12.0 * alternating(ANCHOR.stop - ANCHOR.start)
    attention = head.attention
    for h in range(HEADS):
        row = h * (WIDTH // HEADS)
        for offset, columns in ((0, ANCHOR), (WIDTH, OUTLIER)):  # the query rows, then the key rows
            attention.in_proj_weight[offset + row] = 0.0
            attention.in_proj_weight[offset + row, columns] = alternating(columns.stop - columns.start)
            attention.in_proj_bias[offset + row] = 0.0


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
