"""DINOv2 as facebookresearch/dinov2 ships it: checkpoint layout, architectures, and its torch.hub interface."""

import dataclasses
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub.constants import is_offline_mode
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import Dinov2Model
from transformers.models.dinov2.modeling_dinov2 import Dinov2PatchEmbeddings

from ..configs.dinov2 import Dinov2TTRegConfig
from ..errors import TTRegTypeError, TTRegValueError
from ..family import CONFIG_KEYWORDS, LOADER_ARGUMENTS, check_keywords
from .layout import feature_maps
from .registers import IndexSpec, adopt

# arch -> (hidden_size, num_hidden_layers, num_attention_heads, use_swiglu_ffn), as in dinov2/hub/backbones.py
DINOV2_ARCHS = {
    "vits14": (384, 12, 6, False),
    "vitb14": (768, 12, 12, False),
    "vitl14": (1024, 24, 16, False),
    "vitg14": (1536, 40, 24, True),
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_pretrain.pth"
# upstream's ImageNet-1k linear heads (dinov2/hub/classifiers.py): "" for the 1-layer head, "4" for the 4-layer one
DINOV2_LINEAR_HEAD_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}_linear{layers}_head.pth"
HEAD_LAYERS = (1, 4)
NUM_CLASSES = 1000

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


def dinov2_architecture(arch: str) -> dict:
    """The config fields of the upstream ``dinov2_{arch}`` backbone's architecture (518 px position table, patch 14)."""
    if arch not in DINOV2_ARCHS:
        raise TTRegValueError(f"Unknown DINOv2 architecture {arch!r}; choose one of {sorted(DINOV2_ARCHS)}.")
    hidden_size, num_layers, num_heads, swiglu = DINOV2_ARCHS[arch]
    return dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        use_swiglu_ffn=swiglu,
        image_size=518,
        patch_size=14,
    )


def dinov2_config(arch: str, register_neurons: IndexSpec | None = None, **settings) -> Dinov2TTRegConfig:
    """The configuration of the upstream ``dinov2_{arch}`` backbone (518 px position table, patch 14, upstream
    position interpolation unless ``settings`` say ``position_interpolation="transformers"``), with
    ``register_neurons`` or the index shipped for ``dinov2_{arch}`` attached (or refused, before any download)."""
    config = Dinov2TTRegConfig(**{**dinov2_architecture(arch), "position_interpolation": "upstream", **settings})
    semantics = settings.get("register_semantics")
    config.attach_register_neurons(register_neurons, checkpoint=f"dinov2_{arch}", register_semantics=semantics)
    return config


def convert_original_state_dict(
    state_dict: dict[str, torch.Tensor], config: Dinov2TTRegConfig
) -> dict[str, torch.Tensor]:
    """Rename an original DINOv2 state dict (``blocks.N.attn.qkv`` ...) to `Dinov2Model`'s keys."""
    if "register_tokens" in state_dict:
        raise TTRegValueError(
            "This checkpoint has trained registers (a dinov2_*_reg model); test-time registers are for the models "
            "trained without them (dinov2_vit{s,b,l,g}14)."
        )
    converted = {"embeddings.mask_token": torch.zeros(1, config.hidden_size)}  # absent from some exports
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            if key not in _TOP_RENAMES:
                raise TTRegValueError(f"Unexpected key {key!r}: is this an original DINOv2 checkpoint?")
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
                raise TTRegValueError(f"Unexpected key {key!r}: is this an original DINOv2 checkpoint?")
            converted[prefix + _BLOCK_RENAMES[old] + name.removeprefix(old)] = value
    return converted


def check_downloadable(url: str) -> None:
    """Offline (``HF_HUB_OFFLINE=1``), a URL that torch.hub has not cached is an error, not a network attempt."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if is_offline_mode() and not cached.is_file():
        raise OSError(
            f"offline (HF_HUB_OFFLINE is set) and {url} is not in torch.hub's cache {cached.parent}: put the file "
            "there, or pass a local copy (`weights=` for a backbone, `head_weights=` for a head)"
        )


def load_original_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """An original-layout state dict from a URL (torch.hub's cache; offline, only from there), a ``.pth`` (loaded with
    ``weights_only=True``) or a ``.safetensors``."""
    weights = str(weights)
    if weights.startswith(("http://", "https://")):
        check_downloadable(weights)
        return torch.hub.load_state_dict_from_url(weights, map_location="cpu", weights_only=True)
    if not Path(weights).is_file():
        raise FileNotFoundError(f"No checkpoint at {weights}: give a URL, a .pth or a .safetensors file.")
    try:
        state_dict = (
            load_file(weights)
            if weights.endswith(".safetensors")
            else torch.load(weights, map_location="cpu", weights_only=True)
        )
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as error:  # torch.load's, by damage
        raise TTRegValueError(
            f"Cannot read the checkpoint {weights} ({_first_line(error)}): give a .pth or .safetensors file of "
            "upstream DINOv2's layout."
        ) from error
    if not (isinstance(state_dict, dict) and all(isinstance(value, torch.Tensor) for value in state_dict.values())):
        raise TTRegValueError(f"{weights} holds a {type(state_dict).__name__}, not a state dict of tensors by name.")
    return state_dict


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], weights: str | Path, what: str, **kwargs):
    """``module.load_state_dict(state_dict)``, read from ``weights``: keys or shapes that do not fit ``what`` (another
    model's file, another size's) are the file's, and refused naming the first of them."""
    try:
        module.load_state_dict(state_dict, **kwargs)
    except RuntimeError as error:  # "Error(s) in loading state_dict for X:", then a line per kind of misfit
        first = str(error).splitlines()[1:2] or [str(error)]
        raise TTRegValueError(
            f"{weights} does not fit {what}: {_first_line(first[0])} Give the checkpoint of this architecture."
        ) from error


def _first_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def load_dinov2(
    model_class: type[Dinov2Model], config: Dinov2TTRegConfig, weights: str | Path | None, auto_dtype: bool = False
):
    """``model_class`` (`Dinov2TTRegModel`, which the family module passes: this module is below it) of ``config``:
    random weights when ``weights`` is None, else converted original ones; with ``auto_dtype``, in the weights' dtype
    (``dtype="auto"``, as `from_pretrained` reads it)."""
    if weights is None:
        if auto_dtype:
            raise TTRegValueError(
                "dtype='auto': 'auto' means the dtype of a checkpoint's weights, and there are none here (random "
                "weights): give a dtype, or weights."
            )
        return model_class._from_config(config).eval()  # built in ``config.dtype``, as `from_config` builds
    state_dict = convert_original_state_dict(load_original_state_dict(weights), config)
    if auto_dtype:
        config.dtype = next(tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point())
    with torch.device("meta"):  # built with the edit off; the edits are built once, on the weights' device
        model = model_class._from_config(dataclasses.replace(config, register_neurons={}))
    # in ``config.dtype``, whatever the file's
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    state_dict = {name: value.to(dtypes.get(name, value.dtype)) for name, value in state_dict.items()}
    size = f"DINOv2 with width {config.hidden_size} and {config.num_hidden_layers} layers"
    load_weights(model, state_dict, weights, size, assign=True)
    provenance = config.register_index_provenance  # with the index: where it was found, for the warnings
    return model.set_register_neurons(config.register_neurons or {}, register_index_provenance=provenance).eval()


class _PatchEmbed(Dinov2PatchEmbeddings):
    """`Dinov2PatchEmbeddings` that also answers to upstream `PatchEmbed`'s name for its convolution, ``proj``: an
    alias of ``projection``, no state of its own (adopted by `DinoVisionTransformerTTReg`)."""

    @property
    def proj(self) -> nn.Conv2d:
        return self.projection


class DinoVisionTransformerTTReg(nn.Module):
    """The interface of the upstream DINOv2 torch.hub models (`DinoVisionTransformer`) over a `Dinov2TTRegModel`.

    ``model(x)`` is ``head`` (an `nn.Identity`, as upstream; replace it to add one) of the normalized CLS embedding;
    `forward_features` and `get_intermediate_layers` return what the upstream methods return, the test-time
    registers stripped from every token sequence: they are in ``x_norm_regtokens`` only.

    Upstream's attributes that research code reads are read-only aliases of the wrapped model's parts (the same
    modules and Parameters, no state-dict keys of their own; assign through the aliased attribute): ``blocks``
    (``dinov2.encoder.layer``), ``norm`` (``dinov2.layernorm``), ``patch_embed`` (``dinov2.embeddings.patch_embeddings``,
    with upstream's ``proj`` for its ``projection``), ``pos_embed``, ``cls_token`` and ``mask_token`` (of
    ``dinov2.embeddings``; the first is its ``position_embeddings``). The blocks are `transformers`' `Dinov2Layer`s,
    not upstream's `Block`s: ``block(x)`` maps a token sequence to the next, as upstream's does (and takes an optional
    ``attention_mask``), but their parts have `transformers`' names: ``attention.{q,k,v,o}_proj`` for ``attn.qkv`` and
    ``attn.proj``, ``layer_scale1.lambda1`` for ``ls1.gamma`` (``norm1``, ``mlp.fc1`` and ``mlp.fc2`` as upstream).

    Registers: ``num_register_tokens`` (0) and ``register_tokens`` (None) describe upstream's trained registers, which
    sit between CLS and the patches; research code slices ``[:, 1 + num_register_tokens:]`` from the outputs of
    `forward_features` and `get_intermediate_layers`, which hold no test-time registers, so 0 keeps those slices
    right. ``num_test_time_registers`` is how many run now (0 with the edit off): zero-initialised tokens appended
    after the patches. `prepare_tokens_with_masks` returns the sequence the blocks run on, ``[CLS, patches, test-time
    registers]``, so ``for block in model.blocks: x = block(x)`` computes what `forward_features` does, with the
    registers as the last ``num_test_time_registers`` tokens.
    """

    num_register_tokens = 0
    register_tokens = None

    def __init__(self, dinov2: Dinov2Model):
        super().__init__()
        self.dinov2 = dinov2
        self.embed_dim = self.num_features = dinov2.config.hidden_size
        self.patch_size = dinov2.config.patch_size
        self.n_blocks = dinov2.config.num_hidden_layers
        self.num_heads = dinov2.config.num_attention_heads
        self.head = nn.Identity()
        adopt(dinov2.embeddings.patch_embeddings, _PatchEmbed)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.dinov2.encoder.layer

    @property
    def norm(self) -> nn.LayerNorm:
        return self.dinov2.layernorm

    @property
    def patch_embed(self) -> _PatchEmbed:
        return self.dinov2.embeddings.patch_embeddings

    @property
    def pos_embed(self) -> nn.Parameter:
        return self.dinov2.embeddings.position_embeddings

    @property
    def cls_token(self) -> nn.Parameter:
        return self.dinov2.embeddings.cls_token

    @property
    def mask_token(self) -> nn.Parameter | None:
        return self.dinov2.embeddings.mask_token

    @property
    def num_test_time_registers(self) -> int:
        """How many test-time registers the blocks run with under the config as it is now (0 with the edit off)."""
        return self.dinov2.token_layout.num_registers

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """Upstream's: the position table for the tokens ``x`` (CLS and patches) of a ``w`` x ``h`` image (upstream's
        ``w`` is the height), resized as ``dinov2.config.position_interpolation`` says."""
        return self.dinov2.embeddings.interpolate_pos_encoding(x, w, h)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens the first block gets: CLS and patches (``masks`` ones replaced by ``mask_token``) with their
        position embedding, then the test-time registers."""
        return self.dinov2.embeddings(x, bool_masked_pos=masks)

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
        return features if is_training else self.head(features["x_norm_clstoken"])

    def _blocks_to_take(self, n: int | Sequence[int]) -> list[int]:
        """Upstream's choice: the last ``n`` blocks for an int, else the listed 0-based blocks, in block order.

        Unlike upstream, a negative index counts from the end (-1 is the last block)."""

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if is_int(n):
            if not 1 <= n <= self.n_blocks:
                raise TTRegValueError(
                    f"n={n} asks for the last {n} of {self.n_blocks} blocks: give 1 to {self.n_blocks}."
                )
            return list(range(self.n_blocks - n, self.n_blocks))
        if not isinstance(n, (list, tuple, range)) or not n or not all(map(is_int, n)):
            raise TTRegTypeError(f"n must be an int or a non-empty list of int block indices, got {n!r}.")
        outside = [block for block in n if not -self.n_blocks <= block < self.n_blocks]
        if outside:
            raise TTRegValueError(
                f"Blocks {outside} are out of range: the model has {self.n_blocks} blocks, 0 to {self.n_blocks - 1} "
                f"(or -{self.n_blocks} to -1 from the end)."
            )
        blocks = sorted(block % self.n_blocks for block in n)
        if len(set(blocks)) < len(blocks):
            raise TTRegValueError(f"n={list(n)} names a block twice.")
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
            height, width = (size // self.patch_size for size in x.shape[-2:])
            outputs = [feature_maps(out, height, width) for out in outputs]
        return tuple(zip(outputs, class_tokens)) if return_class_token else tuple(outputs)


class DinoVisionTransformerTTRegClassifier(nn.Module):
    """Upstream's ImageNet-1k linear classifier (``dinov2_vit*14_lc``) over a `DinoVisionTransformerTTReg`.

    ``model(x)`` is the logits of ``linear_head`` on the layer-normed CLS tokens of the last ``layers`` blocks and the
    mean of the last block's patch tokens, concatenated, as upstream's `_LinearClassifierWrapper` computes them (its
    ``layers=1`` branch reads `forward_features`: the same normed output of the last block). The test-time registers
    are in none of them, as upstream's own registers are in none of them. ``backbone``, ``linear_head`` and ``layers``
    are upstream's attribute names.
    """

    def __init__(self, backbone: DinoVisionTransformerTTReg, linear_head: nn.Linear, layers: int = 4):
        super().__init__()
        if linear_head.in_features != (1 + layers) * backbone.embed_dim:
            raise TTRegValueError(
                f"A {layers}-layer head reads {(1 + layers) * backbone.embed_dim} features ((1 + layers) * embed_dim), "
                f"but this one has {linear_head.in_features}."
            )
        self.backbone = backbone
        self.linear_head = linear_head
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.backbone.get_intermediate_layers(x, n=self.layers, return_class_token=True)
        class_tokens = [class_token for _, class_token in blocks]
        last_patches = blocks[-1][0]
        return self.linear_head(torch.cat([*class_tokens, last_patches.mean(dim=1)], dim=1))


_CONFIG_FIELDS = frozenset(field.name for field in dataclasses.fields(Dinov2TTRegConfig)) | set(CONFIG_KEYWORDS)
_HEAD_ARGUMENTS = ("layers", "head_weights")


def pop_auto_dtype(settings: dict) -> bool:
    """Whether ``dtype`` (or its older name ``torch_dtype``) is ``"auto"``, then removed from ``settings``: the
    weights' dtype, known once they are read (`load_dinov2`)."""
    auto = [key for key in ("dtype", "torch_dtype") if settings.get(key) == "auto"]
    for key in auto:
        del settings[key]
    return bool(auto)


def backbone_weights(arch: str, pretrained: bool, weights: str | Path | None) -> str | Path | None:
    """Where the ``dinov2_{arch}`` backbone's weights come from: the local ``weights``, else upstream's URL when
    ``pretrained``, else none (random)."""
    return DINOV2_URL.format(arch=arch) if pretrained and weights is None else weights


def load_dinov2_backbone(
    model_class: type[Dinov2Model],
    arch: str,
    pretrained: bool = True,
    weights: str | Path | None = None,
    register_neurons: IndexSpec | None = None,
    **settings,
) -> Dinov2Model:
    """The ``dinov2_{arch}`` backbone: upstream's checkpoint (``pretrained``), a local ``weights`` file in its layout,
    or random weights; ``register_neurons`` or the index shipped for it; ``settings`` are config fields."""
    check_keywords(settings, {*_CONFIG_FIELDS, *LOADER_ARGUMENTS}, f"dinov2_{arch}_tt_reg")
    auto_dtype = pop_auto_dtype(settings)
    config = dinov2_config(arch, register_neurons, **settings)
    return load_dinov2(model_class, config, backbone_weights(arch, pretrained, weights), auto_dtype)


def load_dinov2_linear_head(
    arch: str,
    layers: int = 4,
    pretrained: bool = True,
    head_weights: str | Path | None = None,
    embed_dim: int | None = None,
) -> nn.Linear:
    """Upstream's ImageNet-1k linear head for ``dinov2_{arch}`` (``layers`` 1 or 4): from a local ``head_weights``
    file (``.pth`` or ``.safetensors``, keys ``weight`` and ``bias``), else from upstream's URL (``pretrained``),
    else random; on features of ``embed_dim`` channels (default: the architecture's; a backbone built with another
    ``hidden_size`` gives its own)."""
    if type(layers) is not int or layers not in HEAD_LAYERS:  # 4.0 == 4, True == 1: the types are checked too
        raise TTRegValueError(f"layers={layers!r}: upstream's linear heads read the last 1 or 4 blocks (an int).")
    embed_dim = embed_dim or DINOV2_ARCHS[arch][0]
    head = nn.Linear((1 + layers) * embed_dim, NUM_CLASSES)
    if pretrained and head_weights is None:
        head_weights = DINOV2_LINEAR_HEAD_URL.format(arch=arch, layers="4" if layers == 4 else "")
    if head_weights is not None:
        state_dict = load_original_state_dict(head_weights)
        in_features = state_dict.get("weight", head.weight).shape[-1]
        fits = [other for other in HEAD_LAYERS if other != layers and (1 + other) * embed_dim == in_features]
        if fits:
            raise TTRegValueError(
                f"{head_weights} holds a {fits[0]}-layer head of dinov2_{arch}, not a {layers}-layer one: pass "
                f"layers={fits[0]}."
            )
        load_weights(head, state_dict, head_weights, f"the {layers}-layer linear head of dinov2_{arch}")
    return head


def load_dinov2_linear_classifier(
    model_class: type[Dinov2Model],
    arch: str,
    layers: int = 4,
    pretrained: bool = True,
    weights: str | Path | None = None,
    head_weights: str | Path | None = None,
    register_neurons: IndexSpec | None = None,
    **settings,
) -> DinoVisionTransformerTTRegClassifier:
    """Upstream's ``dinov2_{arch}_lc`` with test-time registers: the backbone as `load_dinov2_backbone` loads it, the
    head as `load_dinov2_linear_head` does. Arguments and the index are checked first, then the small head is
    loaded (offline, a head missing from the cache fails before the backbone loads), then the backbone."""
    check_keywords(settings, {*_CONFIG_FIELDS, *LOADER_ARGUMENTS, *_HEAD_ARGUMENTS}, f"dinov2_{arch}_tt_reg_lc")
    auto_dtype = pop_auto_dtype(settings)
    config = dinov2_config(arch, register_neurons, **settings)
    head = load_dinov2_linear_head(arch, layers, pretrained, head_weights, config.hidden_size)
    backbone = load_dinov2(model_class, config, backbone_weights(arch, pretrained, weights), auto_dtype)
    head = head.to(backbone.dtype)  # ``dtype=`` builds the backbone in it: the head reads its features
    return DinoVisionTransformerTTRegClassifier(DinoVisionTransformerTTReg(backbone), head, layers).eval()


def load_upstream_dinov2(model_class: type[Dinov2Model], arch: str, **kwargs) -> DinoVisionTransformerTTReg:
    """The torch.hub model ``dinov2_{arch}_tt_reg``: `load_dinov2_backbone`'s model behind upstream's interface."""
    return DinoVisionTransformerTTReg(load_dinov2_backbone(model_class, arch, **kwargs))
