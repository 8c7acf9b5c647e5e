"""timm's `VisionTransformer` with test-time registers, subclassed at timm's seams.

The weights and state-dict keys stay timm's: the registers are appended by a parameter-free wrapper of ``patch_drop``
(right after ``_pos_embed``, so they get no position and patch dropout never drops them), every block's MLP is
adopted by a parameter-free subclass that edits the hidden activations right before ``drop1`` (after the activation,
after the gating for `GluMlp` / `SwiGLUPacked` / `SwiGLU`), and the registers are stripped from `forward_features`
(hence from every pooling of `forward_head`) and from `forward_intermediates`, which is what timm's
``features_only`` wrapper (`FeatureGetterNet`, timm's default for ViTs) returns.
"""

import json
from collections.abc import Mapping

import timm
import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet
from timm.models._features import FeatureGetterNet  # not re-exported by timm.models
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..configs.registers import REGISTER_SETTINGS, TestTimeRegisterConfig, pop_register_settings, square_patch_size
from ..errors import TTRegTypeError, TTRegValueError
from ..family import Family, check_close_keywords, check_keywords, closest_keyword_on_error, parameter_names
from ..images import Preprocessor, transform_preprocessor
from .attention import attention_probabilities, fused_projection
from .dinov2 import FAMILIES as DINOV2_FAMILIES
from .layout import feature_maps
from .registers import IndexSpec, KeywordRegisterSettingsMixin, RegisterAppender, RegisterSeams, adopt
from .sites import BlockSites, LinearRows, PlantingSites
from .timm_registry import PREFIX, register_timm_models


class TimmTTRegMlp(Mlp):
    """timm's `Mlp` with the register-neuron edit right after the activation."""

    register_edit: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.register_edit(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class TimmTTRegGluMlp(GluMlp):
    """timm's `GluMlp` (and `SwiGLUPacked`, DINOv2 ViT-g's) with the register-neuron edit right after the gating."""

    register_edit: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=self.chunk_dim)
        x = self.register_edit(x1 * self.act(x2) if self.gate_last else self.act(x1) * x2)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class TimmTTRegSwiGLU(SwiGLU):
    """timm's `SwiGLU` with the register-neuron edit right after the gating."""

    register_edit: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.register_edit(self.act(self.fc1_g(x)) * self.fc1_x(x))
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


# exact classes: a subclass of these may compute its hidden activations differently
EDITABLE_MLPS = {Mlp: TimmTTRegMlp, GluMlp: TimmTTRegGluMlp, SwiGLU: TimmTTRegSwiGLU}


def check_editable_mlps(model: VisionTransformer) -> None:
    """Refuse blocks whose MLP the edit cannot reach (fused or parallel MLPs, other MLP classes)."""
    for layer, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        if type(mlp) not in EDITABLE_MLPS:
            raise TTRegTypeError(
                f"Test-time registers need blocks with a timm Mlp, GluMlp, SwiGLUPacked or SwiGLU `mlp`; block "
                f"{layer} ({type(block).__name__}) has {type(mlp).__name__ if mlp is not None else 'none'}."
            )


class TimmTTRegVisionTransformer(KeywordRegisterSettingsMixin, VisionTransformer):
    """timm's [`VisionTransformer`] with test-time registers; every output keeps the parent's shape.

    Build one like the parent, with the register settings as extra keywords (``register_neurons=...``,
    ``num_test_time_registers=...``), with `create_model`, or convert a model in place with `to_test_time_registers`.
    `forward_features_with_registers` also returns the registers' final tokens. ``config`` is a `TestTimeRegisterConfig`.
    Saved with timm's `save_for_hf` / `push_to_hf_hub`, it keeps its register settings (``config.json``'s
    ``model_args``) and its timm name (``ttreg_<architecture>``): `timm.create_model("local-dir:FOLDER")` (or
    ``"hf-hub:owner/name"``) gives it back, once this module is imported.
    """

    config: TestTimeRegisterConfig
    register_seams = RegisterSeams(
        appender="patch_drop", blocks="blocks", mlp="mlp", modules=tuple(EDITABLE_MLPS.values())
    )

    def adopt_register_modules(self) -> None:
        """Give the model its config, the appender and the editing MLPs (edit off)."""
        check_editable_mlps(self)
        self.config = register_config(self)
        # after `_pos_embed`, in every forward; around `patch_drop`, so that patch dropout never drops the registers
        self.patch_drop = RegisterAppender(self.patch_drop)
        super().adopt_register_modules()
        pretrained_cfg = self.__dict__.get("pretrained_cfg")  # set by timm's builder; absent when built directly
        architecture = (pretrained_cfg or {}).get("architecture")
        if architecture and timm.is_model(PREFIX + architecture):  # the name `save_for_hf` writes to config.json
            pretrained_cfg["architecture"] = PREFIX + architecture

    @property
    def _model_args(self) -> dict:
        """timm's record of the arguments that rebuild the model (set by `timm.create_model`, written by
        `save_for_hf` as ``config.json``'s ``model_args``), with the register settings as they are now when the
        ``pretrained_cfg`` names our architecture: the index travels with the weights, as JSON, to its entrypoint.
        Under the parent's name (a ``pretrained_cfg`` replaced), the model saves as the parent: weights only."""
        model_args = dict(self.__dict__.get("_model_args", {}))
        architecture = (self.__dict__.get("pretrained_cfg") or {}).get("architecture") or ""
        if not (architecture.startswith(PREFIX) and timm.is_model(architecture)):
            return model_args
        settings = {name: getattr(self.config, name) for name in REGISTER_SETTINGS}
        settings["register_neurons"] = settings["register_neurons"] or {}  # none: the edit stays off when reloaded
        return {**model_args, **json.loads(json.dumps(settings))}

    @_model_args.setter
    def _model_args(self, model_args: dict) -> None:
        self.__dict__["_model_args"] = {k: v for k, v in model_args.items() if k not in REGISTER_SETTINGS}

    def forward_features_with_registers(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward_features` and the test-time registers' final tokens, ``(batch, registers, dim)`` (`None` when
        the edit is off)."""
        if attn_mask is not None and self.token_layout.num_registers:
            raise TTRegValueError("attn_mask does not cover the test-time registers: turn the edit off to pass a mask.")
        tokens = super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        layout = self.token_layout
        return layout.strip_registers(tokens), layout.registers(tokens) if layout.num_registers else None

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """timm's `forward_features` (all tokens, prefix included), without the test-time registers."""
        return self.forward_features_with_registers(x, attn_mask=attn_mask, is_causal=is_causal)[0]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        """timm's `forward_intermediates`, the test-time registers cut from the features and every intermediate; with
        ``return_prefix_tokens`` and ``output_dict``, the registers' tokens ``(batch, registers, dim)`` of every
        intermediate come as ``image_intermediates_registers`` (when the edit is on), as open_clip's do.

        The parent runs with token (``NLC``) dict outputs, from which the registers are cut before the ``NCHW``
        reshape and the parent's return structure is rebuilt.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise TTRegValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        if attn_mask is not None and self.token_layout.num_registers:
            raise TTRegValueError("attn_mask does not cover the test-time registers: turn the edit off to pass a mask.")
        outputs = super().forward_intermediates(
            x, indices, return_prefix_tokens=True, norm=norm, stop_early=stop_early, output_fmt="NLC",
            intermediates_only=intermediates_only, output_dict=True, attn_mask=attn_mask, is_causal=is_causal,
        )  # fmt: skip
        layout = self.token_layout
        intermediates = [layout.strip_registers(tokens) for tokens in outputs["image_intermediates"]]
        if output_fmt == "NCHW":
            height, width = self.patch_embed.dynamic_feat_size(x.shape[-2:])
            intermediates = [feature_maps(y, height, width) for y in intermediates]
        prefix_tokens = outputs.get("image_intermediates_prefix") if return_prefix_tokens else None
        features = outputs.get("image_features")
        features = None if features is None else layout.strip_registers(features)
        if output_dict:
            result = {"image_intermediates": intermediates}
            if prefix_tokens is not None:
                result["image_intermediates_prefix"] = prefix_tokens
            if return_prefix_tokens and layout.num_registers:
                result["image_intermediates_registers"] = [layout.registers(y) for y in outputs["image_intermediates"]]
            if features is not None:
                result["image_features"] = features
            return result
        if prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (features, intermediates)


class TimmTTRegVisionTransformerDistilled(TimmTTRegVisionTransformer, VisionTransformerDistilled):
    """timm's [`VisionTransformerDistilled`] (DeiT ``deit_*_distilled_*``) with test-time registers.

    The parent's two prefix tokens (CLS, distillation) stay first, its own ``num_prefix_tokens`` (2) is the layout's,
    and its `forward_head` reads them from the stripped tokens.
    """


def vision_transformer(model: nn.Module) -> VisionTransformer:
    """The `VisionTransformer` that test-time registers go into: ``model``, or the one timm's ``features_only`` wrapper
    (`FeatureGetterNet`) holds; a clear `TypeError` for anything else."""
    if isinstance(model, FeatureGetterNet):
        model = model.model
    elif isinstance(model, (FeatureHookNet, FeatureGraphNet)):
        raise TTRegTypeError(
            f"timm's {type(model).__name__} (feature_cls='hook' / 'fx') returns the blocks' raw outputs, which carry "
            "the test-time registers: use timm's default ViT feature wrapper, feature_cls='getter' "
            "(`features_only=True` without `feature_cls`), whose features come from `forward_intermediates` with the "
            "registers stripped."
        )
    if isinstance(model, TimmTTRegVisionTransformer) or type(model) in _ours():
        return model
    supported = "timm's VisionTransformer (vit_* models) and VisionTransformerDistilled (deit_*_distilled_*)"
    if isinstance(model, VisionTransformer):
        raise TTRegTypeError(
            f"{type(model).__name__} subclasses timm's VisionTransformer and may build its tokens or heads differently, "
            f"so test-time registers do not convert it: supported are {supported}. For your own subclass, derive from "
            "both, e.g. `class MyTTReg(TimmTTRegVisionTransformer, MyViT)`, and check it against the parent."
        )
    got = type(model).__name__
    if isinstance(model, FeatureDictNet):  # and FeatureListNet: timm wraps CNN-style models so, never a ViT
        got = f"timm's {got}, the features_only wrapper of a model that is not a ViT"
    raise TTRegTypeError(
        f"Test-time registers need {supported}, optionally in timm's features_only wrapper; got {got}."
    )


def _ours() -> dict[type, type]:
    """``{timm class: ours}`` for the family's classes; exact classes: a subclass of timm's may build its tokens or
    read its outputs differently."""
    family = FAMILIES[0]
    return dict(zip(family.parents, family.model_classes))


def to_test_time_registers(model: nn.Module, register_neurons: IndexSpec | None = None, **settings) -> nn.Module:
    """Turn a timm `VisionTransformer` (or `VisionTransformerDistilled`) into a `TimmTTRegVisionTransformer`, in place
    (weights and keys kept); a ``features_only`` model (timm's `FeatureGetterNet`) has its ViT converted.

    Returns ``model``. ``settings`` are `TestTimeRegisterConfig` fields such as ``num_test_time_registers`` (0: edit off).
    Without ``register_neurons`` the edit stays off until `set_register_neurons` gets an index.
    """
    check_keywords(settings, REGISTER_SETTINGS, "to_test_time_registers")
    vit = vision_transformer(model)
    if not isinstance(vit, TimmTTRegVisionTransformer):
        check_editable_mlps(vit)  # before the class changes: a refused model stays as it was, and so
        register_config(vit).update_test_time_registers(register_neurons, **settings)  # does a refused setting
        adopt(vit, _ours()[type(vit)]).adopt_register_modules()
    vit.set_register_neurons(register_neurons, **settings)
    return model


# other libraries' names of the families' weights (timm's DINOv2 are facebook's): the shipped index is the checkpoint's
CHECKPOINT_ALIASES = {
    alias: checkpoint.name
    for family in DINOV2_FAMILIES
    for checkpoint in family.checkpoints
    for alias in checkpoint.aliases
}


# what timm's loader takes: its own keywords and, passed on, its ViTs' (``**kwargs``)
TIMM_KEYWORDS = parameter_names(timm.create_model, VisionTransformer, VisionTransformerDistilled)


def create_model(model_name: str, pretrained: bool = False, *, register_neurons: IndexSpec | None = None, **kwargs):
    """`timm.create_model` giving a `TimmTTRegVisionTransformer`, or with ``features_only=True`` timm's feature
    wrapper around one (``out_indices`` as in timm; features of the parent's shapes, registers stripped).

    The index is ``register_neurons`` (a dict, a file, a shipped name), else the shipped one for the checkpoint
    (timm's DINOv2 models share the DINOv2 indices, e.g. ``vit_large_patch14_dinov2`` gets ``dinov2_vitl14``'s);
    without one, building fails unless ``num_test_time_registers=0``. Other register settings
    (``num_test_time_registers``, ``register_scale``, ...) go to the model, everything else to timm.
    timm's own ``timm.create_model("ttreg_" + model_name, ...)`` calls this (`timm_registry`), as does
    ``timm.create_model("local-dir:FOLDER")`` for a folder that `save_for_hf` wrote from one of our models.
    """
    settings = pop_register_settings(kwargs)
    check_close_keywords(kwargs, REGISTER_SETTINGS, "create_model")  # the rest: timm checks them
    model_name = model_name.removeprefix(PREFIX)  # our name in timm's registry: the parent's architecture
    valid = {*TIMM_KEYWORDS, *REGISTER_SETTINGS, *parameter_names(create_model)}
    with torch.device("meta"), closest_keyword_on_error(kwargs, valid, "create_model"):  # before any download
        skeleton = vision_transformer(timm.create_model(model_name, pretrained=False, **kwargs))
    # a "local-dir:" / "hf-hub:" model that `save_for_hf` wrote from one of ours comes as ours: its settings first
    ours = isinstance(skeleton, TimmTTRegVisionTransformer)
    if not ours:
        check_editable_mlps(skeleton)
    saved = {name: getattr(skeleton.config, name) for name in REGISTER_SETTINGS} if ours else {}
    config = register_config(skeleton, **{**saved, **settings})
    # timm's architecture name (no pretrained tag), also of a "local-dir:" / "hf-hub:" model: the shipped index's key
    architecture = skeleton.pretrained_cfg.get("architecture", model_name.split(".")[0]).removeprefix(PREFIX)
    config.attach_register_neurons(
        register_neurons,
        checkpoint=CHECKPOINT_ALIASES.get(architecture, architecture),
        register_semantics=settings.get("register_semantics"),
    )
    if isinstance(register_neurons, Mapping) and settings.get("register_index_provenance"):
        # a saved model's ``model_args``: the provenance of its index, which a plain dict has not, kept
        config.update_test_time_registers(register_index_provenance=settings["register_index_provenance"])
    model = timm.create_model(model_name, pretrained, **kwargs)
    return to_test_time_registers(model, **{name: getattr(config, name) for name in REGISTER_SETTINGS})


def register_config(model: VisionTransformer, **settings) -> TestTimeRegisterConfig:
    """The register settings of a timm `VisionTransformer`: its depth and MLP width (after the gating) bound the index.

    The depth is the architecture's, one `feature_info` entry per block, which ``features_only`` pruning
    (`prune_intermediate_layers`, blocks after the last ``out_indices`` dropped) leaves whole: the checkpoint's index
    stays valid, and the edits of the pruned blocks go with them.
    """
    return TestTimeRegisterConfig(
        num_hidden_layers=len(model.feature_info),
        mlp_width=model.blocks[0].mlp.fc2.in_features,
        patch_size=square_patch_size(model.patch_embed.patch_size),
        **settings,
    )


# ---- the family's declaration ------------------------------------------------------------------------------------


def timm_preprocessing(model: VisionTransformer, source=None, image_size: int | None = None) -> Preprocessor:
    """timm's evaluation transform from the model's data config (`timm.data.resolve_data_config`, from its
    ``pretrained_cfg``)."""
    config = timm.data.resolve_data_config(model=model)
    if image_size:
        config["input_size"] = (3, image_size, image_size)
    description = f"timm's data config of {model.pretrained_cfg.get('hf_hub_id') or type(model).__name__}"
    return transform_preprocessor(timm.data.create_transform(**config), description, config["mean"], config["std"])


def timm_attention(
    block: nn.Module, hidden_states: torch.Tensor, keys_only: bool = False, num_queries: int | None = None, **_
) -> torch.Tensor:
    attention, normed = block.attn, block.norm1(hidden_states)  # timm's `Attention` (pre-norm `Block`)
    if type(attention).__name__ != "Attention":
        raise NotImplementedError(f"No attention reader for timm's {type(attention).__name__}.")
    heads = (attention.num_heads, attention.head_dim)
    weight, bias = attention.qkv.weight, attention.qkv.bias
    keys = attention.k_norm(fused_projection(normed, weight, bias, 1).unflatten(-1, heads))  # norms act per head
    if keys_only:
        return keys.flatten(2)
    queries = attention.q_norm(fused_projection(normed[:, :num_queries], weight, bias, 0).unflatten(-1, heads))
    return attention_probabilities(queries.flatten(2), keys.flatten(2), attention.num_heads, attention.scale)


def timm_planting_sites(model: VisionTransformer) -> PlantingSites:
    sites = []
    for block in model.blocks:
        mlp, width = block.mlp, block.attn.qkv.in_features
        if isinstance(mlp, SwiGLU):
            mlp_in, mlp_up = mlp.fc1_g, mlp.fc1_x
        elif isinstance(mlp, GluMlp):  # fc1 packs the two halves; ``gate_last``: the second half is activated
            half = mlp.fc1.out_features // 2
            gate, up = (slice(half, None), slice(0, half)) if mlp.gate_last else (slice(0, half), slice(half, None))
            mlp_in, mlp_up = LinearRows.of(mlp.fc1, gate), LinearRows.of(mlp.fc1, up)
        else:
            mlp_in, mlp_up = mlp.fc1, None
        qkv = block.attn.qkv
        query, key = LinearRows.of(qkv, slice(0, width)), LinearRows.of(qkv, slice(width, 2 * width))
        sites.append(BlockSites(mlp_in, mlp.fc2, mlp_up, query, key, block.attn.proj))
    prefix = tuple(token for token in (model.cls_token, model.reg_token) if token is not None)
    return PlantingSites(model.patch_embed.proj, sites, model.blocks[0].attn.num_heads, prefix, model.pos_embed)


FAMILIES = (
    Family(
        name="timm",
        model_classes=(TimmTTRegVisionTransformer, TimmTTRegVisionTransformerDistilled),
        attention_reader=timm_attention,
        planting_sites=timm_planting_sites,
        preprocessing=timm_preprocessing,
    ),
)

register_timm_models(FAMILIES[0].parents, create_model)
