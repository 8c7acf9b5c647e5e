"""OpenCLIP's `VisionTransformer` with test-time registers, subclassed at open_clip's seams.

The weights and state-dict keys stay as they are: the registers are appended by a `RegisterAppender` around
`patch_dropout` (before `ln_pre`), the edit sits in a parameter-free ``register_edit`` slot between the activation
and ``c_proj`` of every block's MLP, and the registers are stripped before pooling and from `forward_intermediates`.
Their final tokens come from `OpenCLIPTTRegVisionTransformer.forward_with_registers`, and every intermediate's from
`forward_intermediates` with ``output_extra_tokens=True`` (``image_intermediates_registers``).
"""

import inspect
import warnings
from functools import partial
from pathlib import Path

import open_clip
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from open_clip.factory import parse_model_name
from open_clip.model import CLIPVisionCfg
from open_clip.pretrained import get_pretrained_cfg
from open_clip.transformer import VisionTransformer
from torch import nn

from ..configs.registers import REGISTER_SETTINGS, TestTimeRegisterConfig, pop_register_settings, square_patch_size
from ..errors import TTRegTypeError, TTRegValueError
from ..family import (
    LOADER_ARGUMENTS,
    Checkpoint,
    Family,
    check_close_keywords,
    check_keywords,
    closest_keyword_on_error,
    parameter_names,
)
from ..images import Preprocessor, transform_preprocessor
from ..index import INDEX_FILENAME
from .attention import attention_probabilities, fused_projection
from .layout import feature_maps
from .registers import (
    IndexSpec,
    KeywordRegisterSettingsMixin,
    RegisterAppender,
    RegisterSeams,
    adopt,
    check_pixel_values,
)
from .sites import BlockSites, LinearRows, PlantingSites


class OpenCLIPTTRegMLP(nn.Sequential):
    """open_clip's ``Sequential(c_fc, activation, c_proj)`` MLP with the register-neuron edit after the activation."""

    register_edit: nn.Module

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fc, activation, projection = self[0], self[1], self[2]
        return projection(self.register_edit(activation(fc(hidden_states))))


def check_mlps(tower: VisionTransformer) -> None:
    """Refuse blocks whose MLP is not open_clip's ``Sequential(c_fc: Linear, activation, c_proj: Linear)``."""
    for block in tower.transformer.resblocks:
        mlp, layers = block.mlp, list(block.mlp.children())
        if not (
            isinstance(mlp, nn.Sequential)
            and len(layers) == 3
            and isinstance(layers[0], nn.Linear)
            and isinstance(layers[2], nn.Linear)
        ):
            raise TTRegTypeError(
                "Test-time registers expect open_clip's MLP `Sequential(c_fc: Linear, activation, c_proj: Linear)`, "
                f"got {mlp!r}; this open_clip model or version builds its blocks differently and is not supported."
            )


class OpenCLIPTTRegVisionTransformer(KeywordRegisterSettingsMixin, VisionTransformer):
    """open_clip's [`VisionTransformer`] with test-time registers; every output keeps the parent's shape.

    Build one like the parent, with the register settings as extra keywords (``register_neurons=...``,
    ``num_test_time_registers=...``), or convert a tower in place with `to_test_time_registers`.
    `forward_with_registers` also returns the registers' final tokens, `forward_intermediates` with
    ``output_extra_tokens=True`` theirs at every intermediate. ``config`` is a `TestTimeRegisterConfig`.
    """

    config: TestTimeRegisterConfig
    register_seams = RegisterSeams(
        appender="patch_dropout", blocks="transformer.resblocks", mlp="mlp", modules=(OpenCLIPTTRegMLP,)
    )

    def adopt_register_modules(self) -> None:
        """Give the tower its config and the appender around ``patch_dropout``, then adopt at the seams (edit off)."""
        check_mlps(self)
        self.config = register_config(self)
        self.patch_dropout = RegisterAppender(self.patch_dropout)  # dropout never drops the registers
        super().adopt_register_modules()

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        check_pixel_values(x, self.patch_size)
        if tuple(x.shape[-2:]) != tuple(self.image_size):
            raise TTRegValueError(
                f"Image size {x.shape[-2]}x{x.shape[-1]} does not match the model's "
                f"{self.image_size[0]}x{self.image_size[1]}: preprocess the images with the model's transform."
            )
        return super()._embeds(x)

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super()._pool(self.token_layout.strip_registers(x))

    def forward_with_registers(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """`forward` (the pooled, projected embedding; ``(pooled, tokens)`` with ``output_tokens``) and the test-time
        registers' final tokens after the final norm ``ln_post``, ``(batch, registers, width)`` (`None` when the edit
        is off): what timm's `forward_features_with_registers` and the `transformers` classes'
        ``test_time_registers`` give."""
        tokens = self.transformer(self._embeds(x))
        layout = self.token_layout
        registers = self.ln_post(layout.registers(tokens)) if layout.num_registers else None
        pooled, patch_tokens = self._pool(tokens)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return ((pooled, patch_tokens) if self.output_tokens else pooled), registers

    def forward(self, x: torch.Tensor):
        """open_clip's `forward`, the registers stripped before pooling."""
        return self.forward_with_registers(x)[0]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        stop_early: bool = False,
        normalize_intermediates: bool = False,
        intermediates_only: bool = False,
        output_fmt: str = "NCHW",
        output_extra_tokens: bool = False,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """open_clip's `forward_intermediates`, the test-time registers cut from every intermediate; with
        ``output_extra_tokens``, beside the class token of each (``image_intermediates_prefix``), the registers'
        tokens ``(batch, registers, width)`` as ``image_intermediates_registers`` (when the edit is on), which
        `CLIP.forward_intermediates` passes on with ``image_output_extra_tokens=True``.

        The parent runs with token (``NLC``) outputs, from which the registers are cut before the ``NCHW`` reshape.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise TTRegValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        output = super().forward_intermediates(
            x, indices, stop_early, normalize_intermediates, intermediates_only, "NLC", output_extra_tokens
        )
        layout, tokens = self.token_layout, output["image_intermediates"]  # patches, then the registers
        output["image_intermediates"] = [layout.strip_registers(y) for y in tokens]
        if output_fmt == "NCHW":
            height, width = (size // patch for size, patch in zip(x.shape[-2:], self.patch_size))
            output["image_intermediates"] = [feature_maps(y, height, width) for y in output["image_intermediates"]]
        if output_extra_tokens and layout.num_registers:
            output["image_intermediates_registers"] = [layout.registers(y) for y in tokens]
        return output


def to_test_time_registers(model: nn.Module, register_neurons: IndexSpec | None = None, **settings) -> nn.Module:
    """Turn an open_clip model's ``visual`` (or a `VisionTransformer` itself) into an `OpenCLIPTTRegVisionTransformer`.

    In place, weights kept; returns ``model``. ``settings`` are `TestTimeRegisterConfig` fields such as
    ``num_test_time_registers`` (0: edit off). Without ``register_neurons`` the edit stays off until
    `set_register_neurons` gets an index.
    """
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TTRegTypeError(
            f"Test-time registers need open_clip's VisionTransformer tower (ViT-* models), not {type(visual).__name__}."
        )
    check_keywords(settings, REGISTER_SETTINGS, "to_test_time_registers")
    if not isinstance(visual, OpenCLIPTTRegVisionTransformer):
        check_mlps(visual)  # before the class changes: a refused tower stays as it was, and so
        register_config(visual).update_test_time_registers(register_neurons, **settings)  # does a refused setting
        adopt(visual, OpenCLIPTTRegVisionTransformer).adopt_register_modules()
    visual.set_register_neurons(register_neurons, **settings)
    return model


def register_config(visual: VisionTransformer, **settings) -> TestTimeRegisterConfig:
    """The register settings of an open_clip `VisionTransformer`: its depth and MLP width bound the index."""
    blocks = visual.transformer.resblocks
    return TestTimeRegisterConfig(
        num_hidden_layers=len(blocks),
        mlp_width=blocks[0].mlp[0].out_features,
        patch_size=square_patch_size(visual.patch_size),
        **settings,
    )


def checkpoint_uses_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip's pretrained config says the ``pretrained`` weights were trained with QuickGELU (OpenAI's)."""
    return bool(pretrained) and get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False)


def create_model_and_transforms(
    model_name: str,
    pretrained: str | None = None,
    *,
    register_neurons: IndexSpec | None = None,
    checkpoint: str | None = None,
    **kwargs,
):
    """`open_clip.create_model_and_transforms` with a test-time-register vision tower: ``(model, train, val)``.

    Without ``register_neurons``, the index is the one in the repository or folder of an ``"hf-hub:owner/name"`` or
    ``"local-dir:folder"`` model (`repo_index`: an OpenCLIP export's, `ttreg_hf.export_open_clip`), else the one
    shipped for ``checkpoint`` (the id it is looked up by; default ``"MODEL (PRETRAINED)"``); none is an error unless
    ``num_test_time_registers=0``. Other register settings
    (``num_test_time_registers``, ``register_scale``, ...) go to the tower, everything else to open_clip. The
    activation follows the checkpoint: QuickGELU for weights open_clip marks so (OpenAI's), even under a GELU
    model name such as ``"ViT-B-16"`` (open_clip itself only warns); ``force_quick_gelu=False`` opts out.
    """
    settings = pop_register_settings(kwargs)
    check_close_keywords(kwargs, REGISTER_SETTINGS, "create_model_and_transforms")
    config = tower_config(model_name, **settings)
    wanted = register_neurons is None and settings.get("num_test_time_registers") != 0  # 0: the edit off, no index
    saved = repo_index(model_name) if wanted else None
    if saved is not None:  # saved with the weights, as a `transformers` config saves one: the checkpoint's own
        config.update_test_time_registers(saved, **settings)
    checkpoint = checkpoint or (f"{model_name} ({pretrained})" if pretrained else model_name)
    config.attach_register_neurons(
        register_neurons, checkpoint=checkpoint, register_semantics=settings.get("register_semantics")
    )
    kwargs.setdefault("force_quick_gelu", checkpoint_uses_quick_gelu(model_name, pretrained))  # False opts out
    valid = {*OPEN_CLIP_KEYWORDS, *REGISTER_SETTINGS, *parameter_names(create_model_and_transforms)}
    with closest_keyword_on_error(kwargs, valid, "create_model_and_transforms"):
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained, **kwargs
        )
    settings = {name: getattr(config, name) for name in REGISTER_SETTINGS}
    return to_test_time_registers(model, **settings), preprocess_train, preprocess_val


# what open_clip's loader takes: its own keywords and, passed on, the model classes' (``**model_kwargs``)
OPEN_CLIP_KEYWORDS = parameter_names(
    open_clip.create_model_and_transforms, open_clip.create_model, open_clip.CLIP, open_clip.CustomTextCLIP
)


def repo_index(model_name: str) -> Path | str | None:
    """The index of the repository or folder that an open_clip ``"hf-hub:owner/name"`` or ``"local-dir:folder"``
    model name names, as an index spec, when it holds `INDEX_FILENAME`; `None` when it does not (a Hub file that is
    neither in the cache nor reachable counts as absent) and for other names."""
    schema, source = parse_model_name(model_name)
    if schema == "local-dir":
        return Path(source) if (Path(source) / INDEX_FILENAME).is_file() else None
    if schema != "hf-hub":
        return None
    try:
        hf_hub_download(source, INDEX_FILENAME, dry_run=True, library_name="ttreg_hf")
    except EntryNotFoundError:  # not in the repository, or offline and not cached
        return None
    return f"{hub_constants.HF_PROTOCOL}{source}"  # the Hub's, even where a local folder has the same name


def open_clip_model_config(model_name: str) -> dict:
    """open_clip's model config of ``model_name``: a built-in one, or the ``model_cfg`` of the
    ``open_clip_config.json`` of an ``"hf-hub:"`` or ``"local-dir:"`` model. An unknown name, or a file that holds no
    config with ``vision_cfg`` and ``text_cfg`` objects, is a `ValueError` that names it."""
    try:
        config = open_clip.get_model_config(model_name)
    except (AttributeError, TypeError, ValueError) as error:  # a file that is not JSON, or not an object
        raise TTRegValueError(f"The open_clip config of {model_name!r} is not a model config ({error}).") from error
    if config is None:
        raise TTRegValueError(f"Unknown open_clip model {model_name!r}; see `open_clip.list_models()`.")
    if not (isinstance(config, dict) and all(isinstance(config.get(f"{t}_cfg"), dict) for t in ("vision", "text"))):
        raise TTRegValueError(f"The open_clip config of {model_name!r} has no vision_cfg and text_cfg objects.")
    return config


def tower_config(model_name: str, **settings) -> TestTimeRegisterConfig:
    """The register settings of open_clip model ``model_name``'s vision tower, from open_clip's model config (no
    weights downloaded), read as open_clip reads it (`CLIPVisionCfg`): its depth and MLP width bound the index."""
    vision = open_clip_model_config(model_name)["vision_cfg"]
    try:
        vision = CLIPVisionCfg(**vision)
    except TypeError as error:
        raise TTRegValueError(
            f"The vision_cfg of open_clip model {model_name!r} is not open_clip's: {error}"
        ) from error
    tower = "timm" if vision.timm_model_name else "ResNet" if isinstance(vision.layers, (list, tuple)) else None
    if tower:
        raise TTRegValueError(
            f"open_clip model {model_name!r} has a {tower} image tower: test-time registers need open_clip's "
            "VisionTransformer (ViT-* models)."
        )
    return TestTimeRegisterConfig(
        num_hidden_layers=vision.layers,
        mlp_width=int(vision.width * vision.mlp_ratio),
        patch_size=square_patch_size(vision.patch_size),
        **settings,
    )


# ---- the family's declaration ------------------------------------------------------------------------------------


def open_clip_preprocessing(model: VisionTransformer, source=None, image_size: int | None = None) -> Preprocessor:
    """open_clip's evaluation transform of the checkpoint (the tower's ``preprocess_cfg``, which
    `open_clip.create_model` sets from the pretrained tag or Hub config); a tower built without one gets open_clip's
    defaults, with a warning that names them."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    config = getattr(model, "preprocess_cfg", None)
    description = "open_clip's preprocess_cfg of the checkpoint"
    if not config:
        config = {"size": model.image_size}
        description = "open_clip's default transform"
        defaults = PreprocessCfg()
        warnings.warn(
            f"This open_clip tower has no preprocess_cfg (it was not built by open_clip.create_model); using "
            f"{description} (mean {list(defaults.mean)}, std {list(defaults.std)}): check that it fits the weights.",
            stacklevel=2,
        )
    config = PreprocessCfg(**{**config, **({"size": image_size} if image_size else {})})
    return transform_preprocessor(image_transform_v2(config, is_train=False), description, config.mean, config.std)


def open_clip_attention(
    block: nn.Module, hidden_states: torch.Tensor, keys_only: bool = False, num_queries: int | None = None, **_
) -> torch.Tensor:
    attention, normed = block.attn, block.ln_1(hidden_states)  # nn.MultiheadAttention, batch first
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    keys = fused_projection(normed, weight, bias, 1)
    if keys_only:
        return keys
    queries = fused_projection(normed[:, :num_queries], weight, bias, 0)
    return attention_probabilities(queries, keys, attention.num_heads, attention.head_dim**-0.5)


def open_clip_planting_sites(model: VisionTransformer) -> PlantingSites:
    blocks, width = model.transformer.resblocks, model.transformer.width
    sites = [
        BlockSites(
            block.mlp[0],
            block.mlp[2],
            query=LinearRows.of(block.attn, slice(0, width), "in_proj_weight", "in_proj_bias"),
            key=LinearRows.of(block.attn, slice(width, 2 * width), "in_proj_weight", "in_proj_bias"),
            attention_out=block.attn.out_proj,
        )
        for block in blocks
    ]
    heads = blocks[0].attn.num_heads
    return PlantingSites(model.conv1, sites, heads, (model.class_embedding,), model.positional_embedding)


def load_open_clip_checkpoint(
    name: str, model_name: str, tag: str, *, pretrained: bool, weights=None, register_neurons=None, **settings
) -> nn.Module:
    """The whole open_clip model of ``model_name`` (image and text towers), with weights ``tag`` (``pretrained``),
    a local open_clip checkpoint file ``weights``, or random ones; ``settings`` are register settings."""
    loader_arguments = inspect.signature(open_clip.create_model_and_transforms).parameters
    valid = {*REGISTER_SETTINGS, *LOADER_ARGUMENTS, *loader_arguments} - {"model_name"}
    check_keywords(settings, valid, f"{name}_tt_reg")
    pretrained_tag = str(weights) if weights else tag if pretrained else None
    model, _, _ = create_model_and_transforms(
        model_name, pretrained_tag, register_neurons=register_neurons, checkpoint=name, **settings
    )
    return model


def _laion(name: str, model_name: str, tag: str, summary: str) -> Checkpoint:
    load = partial(load_open_clip_checkpoint, name, model_name, tag)
    return Checkpoint(name, summary, load, tower=lambda model: model.visual)


FAMILIES = (
    Family(
        name="open_clip",
        model_classes=(OpenCLIPTTRegVisionTransformer,),
        attention_reader=open_clip_attention,
        planting_sites=open_clip_planting_sites,
        preprocessing=open_clip_preprocessing,
        licences={"laion/CLIP-ViT-": "mit"},
        checkpoints=(  # the checkpoints of the paper; the torch.hub entries return the whole CLIP model
            _laion(
                "openclip_vitb16",
                "ViT-B-16",
                "laion2b_s34b_b88k",
                "OpenCLIP ViT-B/16 (LAION-2B) with a test-time register: the whole CLIP model (no shipped index: pass one).",
            ),
            _laion(
                "openclip_vitl14",
                "ViT-L-14",
                "laion2b_s32b_b82k",
                "OpenCLIP ViT-L/14 (LAION-2B) with a test-time register: the whole CLIP model (no shipped index: pass one).",
            ),
        ),
    ),
)
