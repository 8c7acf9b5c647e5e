"""An independent, deliberately plain DINOv2 forward as facebookresearch/dinov2 computes it, for tests only.

It runs on a state dict in the original layout (``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv`` ...) and follows
upstream's `DinoVisionTransformer` (interpolate_offset 0.1, no antialias, `Attention` without xformers, LayerScale,
MLP blocks). ``tokens`` (after the position embedding) and each ``blocks[i].mlp.fc2`` are modules, so that
tests/reference_edit.py can hook them. Nothing is shared with `ttreg_hf`.
"""

import math

import torch
from torch import nn


def upstream_position_embedding(pos_embed: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Upstream's `interpolate_pos_encoding` (which names the height ``w`` and the width ``h``)."""
    table_patches = pos_embed.shape[1] - 1
    rows, columns = height // patch_size, width // patch_size
    if rows * columns == table_patches and height == width:
        return pos_embed
    side = int(math.sqrt(table_patches))
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = nn.functional.interpolate(
        patch_pos,
        scale_factor=(float(rows + 0.1) / side, float(columns + 0.1) / side),
        mode="bicubic",
        antialias=False,
    )
    assert patch_pos.shape[-2:] == (rows, columns)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)
    return torch.cat((pos_embed[:, :1].float(), patch_pos), dim=1).to(pos_embed.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // self.num_heads) ** -0.5, qkv[1], qkv[2]
        attention = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class UpstreamDinov2(nn.Module):
    """``forward(pixels)`` returns upstream's `forward_features` dict (without masks)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], num_heads: int):
        super().__init__()
        dim = state_dict["cls_token"].shape[-1]
        self.patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty_like(state_dict["pos_embed"]))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, self.patch_size, self.patch_size)
        self.tokens = nn.Identity()  # a hook point: the tokens after the position embedding
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.load_state_dict({key: value for key, value in state_dict.items() if key != "mask_token"})

    def prepare_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        _, _, height, width = pixels.shape
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.tokens(x + upstream_position_embedding(self.pos_embed, height, width, self.patch_size))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare_tokens(pixels)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": x}


def random_original_state_dict(
    dim: int, depth: int, patch_size: int, table_side: int, swiglu_width: int | None = None
) -> dict[str, torch.Tensor]:
    """Random weights of a small DINOv2 in the original layout (position table of ``table_side``²); with
    ``swiglu_width``, SwiGLU MLPs of that width (ViT-g's ``mlp.w12``, ``mlp.w3``), which the forward here lacks."""
    state_dict = {
        "cls_token": torch.randn(1, 1, dim),
        "pos_embed": torch.randn(1, table_side**2 + 1, dim),
        "mask_token": torch.zeros(1, dim),
        "patch_embed.proj.weight": torch.randn(dim, 3, patch_size, patch_size) / patch_size,
        "patch_embed.proj.bias": torch.randn(dim),
        "norm.weight": 1 + torch.randn(dim) / 10,
        "norm.bias": torch.randn(dim) / 10,
    }
    for i in range(depth):
        block = Block(dim, num_heads=1).state_dict()
        if swiglu_width is not None:
            block = {key: value for key, value in block.items() if not key.startswith("mlp.")}
            w12, w3 = torch.empty(2 * swiglu_width, dim), torch.empty(dim, swiglu_width)
            block.update(
                {"mlp.w12.weight": w12, "mlp.w12.bias": w12[:, 0], "mlp.w3.weight": w3, "mlp.w3.bias": w3[:, 0]}
            )
        state_dict.update({f"blocks.{i}.{key}": torch.randn_like(value) / 4 for key, value in block.items()})
    return state_dict
