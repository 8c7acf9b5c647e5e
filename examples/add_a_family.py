"""Test-time registers for a ViT that ttreg_hf has never seen, with only its public API.

1. `TinyViT`: a plain-PyTorch ViT, as a user might have one (pre-norm blocks, CLS token, GELU MLPs).
2. Its test-time-register family: a subclass of the embedding that appends the registers, a subclass of the MLP that
   calls ``register_edit`` right after the activation, and a model class that declares where those parts are.
3. A register neuron planted in it (a neuron that fires on uniform patches and writes a high-norm token), found with
   `find_register_neurons`, attached, and the outlier ratio before and after.

Run: ``python examples/add_a_family.py`` (a few seconds on a CPU).
"""

import torch
from torch import nn

from ttreg_hf import RegisterSeams, TestTimeRegisterConfig, TestTimeRegisterMixin, adopt, find_register_neurons
from ttreg_hf.analysis import patch_norms, run_with_cache

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

    register_seams = RegisterSeams(appender="embed", blocks="blocks", mlp="mlp")
    num_prefix_tokens = 1

    def __init__(self, register_neurons=None, **kwargs):
        super().__init__(**kwargs)
        adopt(self.embed, RegisterAppendingPatchEmbed)
        for block in self.blocks:
            adopt(block.mlp, RegisterEditMlp)
        self.config = TestTimeRegisterConfig(num_hidden_layers=len(self.blocks), mlp_width=4 * self.norm.normalized_shape[0])
        self.set_register_neurons(register_neurons or {})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.refresh_test_time_registers()
        return self.token_layout.strip_registers(super().forward(images))


# 3. Plant a register neuron, find it, attach it ----------------------------------------------------------------------

PLANTED_LAYER, PLANTED_NEURON = 1, 77
ANCHOR, EDGES, ENERGY, CLS_MARK, OUTLIER = slice(0, 8), slice(8, 12), 12, 13, slice(32, 64)


def alternating(size: int) -> torch.Tensor:
    """A unit vector with zero mean, which LayerNorm keeps."""
    return torch.tensor([(-1.0) ** i for i in range(size)]) / size**0.5


@torch.no_grad()
def plant_register_neuron(model: TinyViT) -> None:
    """Patch embedding: edge filters (zero on uniform patches). Layer 0: |edges| into ENERGY. The planted neuron fires
    where the energy is low (uniform patches, not CLS) and writes a large vector along OUTLIER."""
    for parameter in model.parameters():
        parameter.mul_(0.1)
    for norm in [model.norm, *(m for b in model.blocks for m in (b.norm1, b.norm2))]:
        norm.weight.fill_(1.0)
    embed, anchor = model.embed, 8.0 * alternating(8)
    embed.proj.bias[ANCHOR] = anchor
    embed.cls_token[0, 0, ANCHOR] = anchor
    embed.cls_token[0, 0, CLS_MARK] = 6.0
    patch = model.patch_size
    for channel in range(EDGES.start, EDGES.stop):
        signs = torch.ones(patch * patch)
        signs[torch.randperm(patch * patch)[: patch * patch // 2]] = -1.0
        embed.proj.weight[channel] = 0.1 * signs.view(1, patch, patch).expand(3, -1, -1)
        embed.proj.bias[channel] = 0.0
    mlp = model.blocks[0].mlp
    for k, channel in enumerate(range(EDGES.start, EDGES.stop)):
        for neuron, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
            mlp.fc1.weight[neuron].zero_()
            mlp.fc1.weight[neuron, channel], mlp.fc1.bias[neuron] = 2.0 * sign, 0.0
            mlp.fc2.weight[:, neuron].zero_()
            mlp.fc2.weight[ENERGY, neuron] = 0.5
    mlp = model.blocks[PLANTED_LAYER].mlp
    mlp.fc1.weight[PLANTED_NEURON].zero_()
    mlp.fc1.weight[PLANTED_NEURON, ENERGY], mlp.fc1.weight[PLANTED_NEURON, CLS_MARK] = -12.0, -4.0
    mlp.fc1.bias[PLANTED_NEURON] = 3.0
    mlp.fc2.weight[:, PLANTED_NEURON].zero_()
    mlp.fc2.weight[OUTLIER, PLANTED_NEURON] = 40.0 * alternating(OUTLIER.stop - OUTLIER.start)


def images_with_uniform_regions(num_images: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, size, size, generator=generator)
    for image in images:
        top, left = (int(v) for v in torch.randint(0, size - 16, (2,), generator=generator))
        image[:, top : top + 16, left : left + 16] = torch.rand(3, 1, 1, generator=generator)
    return images


def outlier_ratio(model: TinyViTTTReg, images: torch.Tensor, threshold: float) -> float:
    last = len(model.blocks) - 1
    _, cache = run_with_cache(model, images, blocks=[last])
    return float((patch_norms(cache.block_outputs[last], cache.layout) > threshold).float().mean())


def main() -> None:
    torch.manual_seed(0)
    model = TinyViTTTReg().eval()
    plant_register_neuron(model)
    result = find_register_neurons(model, list(images_with_uniform_regions(64)))
    print(result.summary())
    held_out = images_with_uniform_regions(32, seed=1)
    before = outlier_ratio(model, held_out, result.threshold)
    model.set_register_neurons(result.index)
    after = outlier_ratio(model, held_out, result.threshold)
    print(f"planted: layer {PLANTED_LAYER}, neuron {PLANTED_NEURON}; found: {dict(result.index.neurons)}")
    print(f"outlier ratio on held-out images: {100 * before:.2f} % before, {100 * after:.2f} % with the test-time register")


if __name__ == "__main__":
    main()
