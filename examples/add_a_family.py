"""Test-time registers for a ViT that ttreg_hf has never seen, with only its public API.

1. `TinyViT`: a plain-PyTorch ViT, as a user might have one (pre-norm blocks, CLS token, GELU MLPs).
2. Its test-time-register family: a subclass of the embedding that appends the registers, a subclass of the MLP that
   calls ``register_edit`` right after the activation, a model class that declares where those parts are, and the
   family's declaration (`Family`: its attention reader and planting sites), registered with `register_family`.
3. Register neurons planted in it with `ttreg_hf.planted` (neurons that fire on uniform patches and write high-norm
   tokens), found with `find_register_neurons`, attached, and the outlier ratio before and after.

Run: ``python examples/add_a_family.py`` (a few seconds on a CPU).
"""

import torch
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ttreg_hf import (
    Family,
    RegisterSeams,
    TestTimeRegisterConfig,
    TestTimeRegisterMixin,
    find_register_neurons,
    register_family,
)
from ttreg_hf.analysis import patch_norms, run_with_cache
from ttreg_hf.images import normalize
from ttreg_hf.modeling.attention import attention_probabilities
from ttreg_hf.modeling.sites import BlockSites, LinearRows, PlantingSites
from ttreg_hf.planted import plant_register_neurons, planting_sites, textured_images

# 1. The user's ViT ---------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int, image: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image // patch) ** 2, width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat((self.cls_token.expand(len(images), -1, -1), patches), dim=1) + self.pos_embed


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(width), Mlp(width, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4, heads: int = 4, patch: int = 8, image: int = 64):
        super().__init__()
        self.patch_size = patch
        self.embed = PatchEmbed(width, patch, image)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# 2. Its test-time-register family --------------------------------------------------------------------------------------


class RegisterAppendingPatchEmbed(PatchEmbed):
    """Appends the test-time registers after the position embedding (they get none)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.token_layout.append_registers(super().forward(images))


class RegisterEditMlp(Mlp):
    """The register-neuron edit right after the activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.register_edit(self.act(self.fc1(x))))


class TinyViTTTReg(TestTimeRegisterMixin, TinyViT):
    """`TinyViT` with test-time registers: same weights and keys, same output shape."""

    register_seams = RegisterSeams(
        appender="embed", blocks="blocks", mlp="mlp", modules=(RegisterAppendingPatchEmbed, RegisterEditMlp)
    )
    num_prefix_tokens = 1

    def __init__(self, register_neurons=None, **kwargs):
        super().__init__(**kwargs)
        self.config = TestTimeRegisterConfig(
            num_hidden_layers=len(self.blocks), mlp_width=4 * self.norm.normalized_shape[0]
        )
        self.adopt_register_modules()  # the seams' modules become the subclasses declared above
        self.set_register_neurons(register_neurons or {})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.token_layout.strip_registers(super().forward(images))


def tiny_vit_attention(block: Block, hidden_states: torch.Tensor, **_) -> torch.Tensor:
    """The block's attention probabilities, recomputed from its input (the analysis tools' attention maps)."""
    attention, width = block.attn, hidden_states.shape[-1]
    queries, keys, _ = nn.functional.linear(
        block.norm1(hidden_states), attention.in_proj_weight, attention.in_proj_bias
    ).split(width, dim=-1)
    return attention_probabilities(queries, keys, attention.num_heads, (width // attention.num_heads) ** -0.5)


def tiny_vit_planting_sites(model: TinyViT) -> PlantingSites:
    """The modules `plant_register_neurons` writes to (the package's families declare theirs the same way)."""
    width = model.norm.normalized_shape[0]

    def block_sites(block: Block) -> BlockSites:
        attention = block.attn  # nn.MultiheadAttention: the query and key rows are packed in `in_proj`

        def rows(start: int) -> LinearRows:
            return LinearRows.of(attention, slice(start, start + width), "in_proj_weight", "in_proj_bias")

        return BlockSites(
            block.mlp.fc1, block.mlp.fc2, query=rows(0), key=rows(width), attention_out=attention.out_proj
        )

    embed = model.embed
    heads = model.blocks[0].attn.num_heads
    return PlantingSites(embed.proj, [block_sites(b) for b in model.blocks], heads, (embed.cls_token,), embed.pos_embed)


FAMILY = register_family(
    Family(
        name="tiny_vit",
        model_classes=(TinyViTTTReg,),
        attention_reader=tiny_vit_attention,
        planting_sites=tiny_vit_planting_sites,
    )
)


# 3. Plant register neurons, find them, attach them ---------------------------------------------------------------

PLANTED_LAYER, PLANTED_NEURONS = 2, (21, 60)
IMAGE_SIZE = 96


def images(num_images: int, seed: int) -> torch.Tensor:
    """Random textures with uniform regions (where planted neurons fire), normalized."""
    return normalize(
        textured_images(num_images, seed=seed, size=IMAGE_SIZE), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    )


def outlier_ratio(model: TinyViTTTReg, images: torch.Tensor, threshold: float) -> float:
    last = len(model.blocks) - 1
    _, cache = run_with_cache(model, images, blocks=[last])
    return float((patch_norms(cache.block_outputs[last], cache.layout) > threshold).float().mean())


def main() -> None:
    torch.manual_seed(0)
    model = TinyViTTTReg(image=IMAGE_SIZE).eval()
    plant_register_neurons(planting_sites(model), PLANTED_LAYER, PLANTED_NEURONS)
    result = find_register_neurons(model, list(images(32, seed=0)))
    print(result.summary())
    held_out = images(16, seed=1)
    before = outlier_ratio(model, held_out, result.threshold)
    model.set_register_neurons(result.index)
    after = outlier_ratio(model, held_out, result.threshold)
    print(f"planted: layer {PLANTED_LAYER}, neurons {list(PLANTED_NEURONS)}; found: {dict(result.index.neurons)}")
    print(
        f"outlier ratio on held-out images: {100 * before:.2f} % before, {100 * after:.2f} % with the test-time register"
    )


if __name__ == "__main__":
    main()
