"""DINOv2 as facebookresearch/dinov2 ships it: checkpoint layout, architectures, and its torch.hub interface."""

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn

from ..configs.dinov2 import Dinov2TTRegConfig
from ..family import check_keywords
from ..hub import check_downloadable

if TYPE_CHECKING:
    from .dinov2 import Dinov2TTRegModel

# arch -> (hidden_size, num_hidden_layers, num_attention_heads, use_swiglu_ffn), as in dinov2/hub/backbones.py
DINOV2_ARCHS = {
    "vits14": (384, 12, 6, False),
    "vitb14": (768, 12, 12, False),
    "vitl14": (1024, 24, 16, False),
    "vitg14": (1536, 40, 24, True),
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_pretrain.pth"

_BLOCK_KEY = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")  # plain or chunked (`blocks.<chunk>.<i>.`) blocks
_BLOCK_RENAMES = {
    "norm1.": "norm1.",
    "attn.proj.": "attention.o_proj.",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.": "norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "mlp.w3.": "mlp.down_proj.",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


def dinov2_config(arch: str, **settings) -> Dinov2TTRegConfig:
    """The configuration of the upstream ``dinov2_{arch}`` backbone (518 px position table, patch 14, upstream
    position interpolation unless ``settings`` say ``position_interpolation="transformers"``)."""
    if arch not in DINOV2_ARCHS:
        raise ValueError(f"Unknown DINOv2 architecture {arch!r}; choose one of {sorted(DINOV2_ARCHS)}.")
    hidden_size, num_layers, num_heads, swiglu = DINOV2_ARCHS[arch]
    return Dinov2TTRegConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        use_swiglu_ffn=swiglu,
        image_size=518,
        patch_size=14,
        **{"position_interpolation": "upstream", **settings},
    )


def convert_original_state_dict(
    state_dict: dict[str, torch.Tensor], config: Dinov2TTRegConfig
) -> dict[str, torch.Tensor]:
    """Rename an original DINOv2 state dict (``blocks.N.attn.qkv`` ...) to `Dinov2Model`'s keys."""
    if "register_tokens" in state_dict:
        raise ValueError(
            "This checkpoint has trained registers (a dinov2_*_reg model); test-time registers are for the models "
            "trained without them (dinov2_vit{s,b,l,g}14)."
        )
    converted = {"embeddings.mask_token": torch.zeros(1, config.hidden_size)}  # absent from some exports
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            if key not in _TOP_RENAMES:
                raise KeyError(f"Unexpected key {key!r}: is this an original DINOv2 checkpoint?")
            converted[_TOP_RENAMES[key]] = value.reshape(1, -1) if key == "mask_token" else value
            continue
        prefix, name = f"encoder.layer.{match[1]}.", match[2]
        if name.startswith("attn.qkv."):
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                converted[f"{prefix}attention.{proj}.{name.removeprefix('attn.qkv.')}"] = chunk
        elif name.startswith("mlp.w12."):
            for proj, chunk in zip(("gate_proj", "up_proj"), value.chunk(2)):
                converted[f"{prefix}mlp.{proj}.{name.removeprefix('mlp.w12.')}"] = chunk
        else:
            old = next((old for old in _BLOCK_RENAMES if name.startswith(old)), None)
            if old is None:
                raise KeyError(f"Unexpected key {key!r}: is this an original DINOv2 checkpoint?")
            converted[prefix + _BLOCK_RENAMES[old] + name.removeprefix(old)] = value
    return converted


def load_original_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """An original-layout state dict from a URL, a ``.pth`` (loaded with ``weights_only=True``) or a ``.safetensors``."""
    weights = str(weights)
    if weights.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(weights, map_location="cpu", weights_only=True)
    if not Path(weights).is_file():
        raise FileNotFoundError(f"No checkpoint at {weights}: give a URL, a .pth or a .safetensors file.")
    if weights.endswith(".safetensors"):
        return load_file(weights)
    return torch.load(weights, map_location="cpu", weights_only=True)


def load_dinov2(config: Dinov2TTRegConfig, weights: str | Path | None) -> "Dinov2TTRegModel":
    """`Dinov2TTRegModel` of ``config``: random weights when ``weights`` is None, else converted original ones."""
    from .dinov2 import Dinov2TTRegModel  # the family module, which declares this module's checkpoints

    if weights is None:
        return Dinov2TTRegModel(config).eval()
    state_dict = convert_original_state_dict(load_original_state_dict(weights), config)
    with torch.device("meta"):  # built with the edit off; the edits are built once, on the weights' device
        model = Dinov2TTRegModel(dataclasses.replace(config, register_neurons={}))
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}  # upstream's fp32, whatever the file's
    state_dict = {name: value.to(dtypes.get(name, value.dtype)) for name, value in state_dict.items()}
    model.load_state_dict(state_dict, assign=True)
    return model.set_register_neurons(config.register_neurons or {}).eval()


def load_upstream_dinov2(
    arch: str, *, pretrained: bool, weights: str | Path | None, register_neurons=None, **settings
) -> "DinoVisionTransformerTTReg":
    """The upstream torch.hub model ``dinov2_{arch}`` with test-time registers: random weights, ``weights`` (a local
    original checkpoint) or, ``pretrained``, upstream's checkpoint from its URL; ``settings`` are config fields."""
    fields = {field.name for field in dataclasses.fields(Dinov2TTRegConfig)}
    check_keywords(settings, fields, f"dinov2_{arch}_tt_reg")
    config = dinov2_config(arch, **settings)
    semantics = settings.get("register_semantics")
    config.attach_register_neurons(register_neurons, checkpoint=f"dinov2_{arch}", register_semantics=semantics)
    if pretrained and weights is None:
        weights = DINOV2_URL.format(arch=arch)
        check_downloadable(weights)
    return DinoVisionTransformerTTReg(load_dinov2(config, weights))


class DinoVisionTransformerTTReg(nn.Module):
    """The interface of the upstream DINOv2 torch.hub models over a `Dinov2TTRegModel`.

    ``model(x)`` is the normalized CLS embedding; `forward_features` and `get_intermediate_layers` return what the
    upstream methods return. Test-time registers never appear in token sequences (``num_register_tokens`` is 0):
    they are in ``x_norm_regtokens`` only.
    """

    num_register_tokens = 0

    def __init__(self, dinov2: "Dinov2TTRegModel"):
        super().__init__()
        self.dinov2 = dinov2
        self.embed_dim = self.num_features = dinov2.config.hidden_size
        self.patch_size = dinov2.config.patch_size
        self.n_blocks = dinov2.config.num_hidden_layers

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        outputs = self.dinov2(x, bool_masked_pos=masks, output_hidden_states=[-1])
        tokens = outputs.last_hidden_state
        registers = outputs.test_time_registers
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_norm_regtokens": tokens[:, :0] if registers is None else registers,
            "x_norm_patchtokens": tokens[:, 1:],
            "x_prenorm": outputs.hidden_states[-1],
            "masks": masks,
        }

    def forward(self, x: torch.Tensor, is_training: bool = False):
        features = self.forward_features(x)
        return features if is_training else features["x_norm_clstoken"]

    def _blocks_to_take(self, n: int | Sequence[int]) -> list[int]:
        """Upstream's choice: the last ``n`` blocks for an int, else the listed 0-based blocks, in block order.

        Unlike upstream, a negative index counts from the end (-1 is the last block)."""
        if isinstance(n, int):
            if not 1 <= n <= self.n_blocks:
                raise ValueError(f"n={n} asks for the last {n} of {self.n_blocks} blocks: give 1 to {self.n_blocks}.")
            return list(range(self.n_blocks - n, self.n_blocks))
        if not n or not all(isinstance(block, int) for block in n):
            raise TypeError(f"n must be an int or a non-empty list of int block indices, got {n!r}.")
        outside = [block for block in n if not -self.n_blocks <= block < self.n_blocks]
        if outside:
            raise ValueError(
                f"Blocks {outside} are out of range: the model has {self.n_blocks} blocks, 0 to {self.n_blocks - 1} "
                f"(or -{self.n_blocks} to -1 from the end)."
            )
        blocks = sorted(block % self.n_blocks for block in n)
        if len(set(blocks)) < len(blocks):
            raise ValueError(f"n={list(n)} names a block twice.")
        return blocks

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """The outputs of the last ``n`` blocks (an int) or of the blocks listed in ``n`` (negative indices count from
        the end), in block order as upstream returns them; see `_blocks_to_take`."""
        blocks = self._blocks_to_take(n)
        hidden_states = self.dinov2(x, output_hidden_states=[block + 1 for block in blocks]).hidden_states
        outputs = [hidden_states[block + 1] for block in blocks]
        if norm:
            outputs = [self.dinov2.layernorm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1:] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid = (height // self.patch_size, width // self.patch_size)
            outputs = [out.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        return tuple(zip(outputs, class_tokens)) if return_class_token else tuple(outputs)
