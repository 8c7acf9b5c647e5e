"""ViT and DeiT with test-time registers: the parent does the work; these classes add the registers and the edit.

`transformers` generates DeiT's modules from ViT's (``modular_deit.py``): same forwards, own classes. So each piece
here is one mixin, combined with the ViT and with the DeiT parent. The classifiers and the masked-image models are
the parents' on our towers.
"""

import torch
from torch import nn
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForMaskedImageModeling,
    DeiTImageProcessor,
    DeiTModel,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTImageProcessor,
    ViTModel,
)
from transformers.models.deit.modeling_deit import DeiTEmbeddings, DeiTMLP
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTMLP
from transformers.utils.generic import can_return_tuple

from ..configs.vit import DeiTTTRegConfig, ViTTTRegConfig
from ..family import Family, register_auto_classes, transformers_checkpoint
from .attention import attention_probabilities
from .layout import TokenLayout
from .registers import (
    EditAfterActivationMixin,
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    TestTimeRegisterModelOutput,
    WithRegisterTowerMixin,
    check_pixel_values,
)
from .sites import PlantingSites, block_sites


class ViTStyleTTRegEmbeddingsMixin:
    """Appends the test-time registers after the position embedding (they get none)."""

    token_layout: TokenLayout

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        embeddings = super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        return self.token_layout.append_registers(embeddings)


class ViTTTRegEmbeddings(ViTStyleTTRegEmbeddingsMixin, ViTEmbeddings):
    """`ViTEmbeddings` followed by the test-time registers."""


class ViTTTRegMLP(EditAfterActivationMixin, ViTMLP):
    """`ViTMLP` with the register-neuron edit right after the activation."""


class DeiTTTRegEmbeddings(ViTStyleTTRegEmbeddingsMixin, DeiTEmbeddings):
    """`DeiTEmbeddings` (CLS, distillation token, patches) followed by the test-time registers."""


class DeiTTTRegMLP(EditAfterActivationMixin, DeiTMLP):
    """`DeiTMLP` with the register-neuron edit right after the activation."""


class ViTStyleTTRegModelMixin(PreTrainedTestTimeRegisterMixin):
    """The test-time-register side of [`ViTModel`] and of [`DeiTModel`], which share their layout and forward."""

    def __init__(self, config, add_pooling_layer: bool = True, use_mask_token: bool = False):
        # the parent's signature, which callers inspect (e.g. for `use_mask_token`)
        super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)

    @classmethod
    def constructor_arguments(cls, parent_model: ViTModel | DeiTModel) -> dict:
        """A classifier's tower has no pooler; a masked-image-modeling one has a mask token."""
        return dict(
            add_pooling_layer=parent_model.pooler is not None,
            use_mask_token=parent_model.embeddings.mask_token is not None,
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> TestTimeRegisterModelOutput:
        check_pixel_values(pixel_values, self.config.patch_size)  # here: the parent casts to float before embedding
        attention_mask = self.token_layout.append_registers_to_mask(attention_mask)
        outputs = super().forward(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            return_dict=True,
            **kwargs,
        )
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)


class ViTTTRegModel(ViTStyleTTRegModelMixin, ViTModel):
    """[`ViTModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    `pooler_output` reads the CLS token, as in the parent.
    """

    config: ViTTTRegConfig
    config_class = ViTTTRegConfig
    register_seams = RegisterSeams("embeddings", "layers", "mlp", modules=(ViTTTRegEmbeddings, ViTTTRegMLP))
    _no_split_modules = [*ViTModel._no_split_modules, "ViTTTRegEmbeddings"]


class DeiTTTRegModel(ViTStyleTTRegModelMixin, DeiTModel):
    """[`DeiTModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    The CLS and the distillation token both come before the patches; `pooler_output` reads the CLS token.
    """

    config: DeiTTTRegConfig
    config_class = DeiTTTRegConfig
    register_seams = RegisterSeams("embeddings", "layers", "mlp", modules=(DeiTTTRegEmbeddings, DeiTTTRegMLP))
    num_prefix_tokens = 2
    _no_split_modules = [*DeiTModel._no_split_modules, "DeiTTTRegEmbeddings"]


class ViTTTRegForImageClassification(WithRegisterTowerMixin, ViTForImageClassification):
    """[`ViTForImageClassification`] on a `ViTTTRegModel` (``vit``): the head reads the CLS token; labels and loss as in
    the parent."""

    config: ViTTTRegConfig
    config_class = ViTTTRegConfig
    tower_class = ViTTTRegModel


class DeiTTTRegForImageClassification(WithRegisterTowerMixin, DeiTForImageClassification):
    """[`DeiTForImageClassification`] on a `DeiTTTRegModel` (``deit``): the head reads the CLS token; labels and loss
    as in the parent."""

    config: DeiTTTRegConfig
    config_class = DeiTTTRegConfig
    tower_class = DeiTTTRegModel


class DeiTTTRegForImageClassificationWithTeacher(WithRegisterTowerMixin, DeiTForImageClassificationWithTeacher):
    """[`DeiTForImageClassificationWithTeacher`] on a `DeiTTTRegModel` (``deit``): the CLS head and the distillation
    head read their tokens, both before the patches; the logits are their mean, as in the parent (inference only)."""

    config: DeiTTTRegConfig
    config_class = DeiTTTRegConfig
    tower_class = DeiTTTRegModel


class ViTTTRegForMaskedImageModeling(WithRegisterTowerMixin, ViTForMaskedImageModeling):
    """[`ViTForMaskedImageModeling`] on a `ViTTTRegModel` (``vit``, with the parent's mask token): the decoder reads the
    patches, the registers cut; ``bool_masked_pos``, reconstruction and loss as in the parent."""

    config: ViTTTRegConfig
    config_class = ViTTTRegConfig
    tower_class = ViTTTRegModel


class DeiTTTRegForMaskedImageModeling(WithRegisterTowerMixin, DeiTForMaskedImageModeling):
    """[`DeiTForMaskedImageModeling`] on a `DeiTTTRegModel` (``deit``, with the parent's mask token): the decoder reads
    the patches, the registers cut; ``bool_masked_pos``, reconstruction and loss as in the parent."""

    config: DeiTTTRegConfig
    config_class = DeiTTTRegConfig
    tower_class = DeiTTTRegModel


# ---- the families' declarations ----------------------------------------------------------------------------------


def vit_image_processor(config: ViTTTRegConfig) -> ViTImageProcessor:
    """ViT's preprocessing: resize to the model's square size (bilinear), mean and std 0.5."""
    return ViTImageProcessor(size={"height": config.image_size, "width": config.image_size})


def deit_image_processor(config: DeiTTTRegConfig) -> DeiTImageProcessor:
    """DeiT's preprocessing: resize to 256/224 of the model's size (bicubic), center-crop it, ImageNet statistics."""
    side = config.image_size
    resized = round(side * 256 / 224)
    return DeiTImageProcessor(size={"height": resized, "width": resized}, crop_size={"height": side, "width": side})


def vit_attention(
    block: nn.Module, hidden_states: torch.Tensor, keys_only: bool = False, num_queries: int | None = None, **_
) -> torch.Tensor:
    attention, normed = block.attention, block.layernorm_before(hidden_states)
    keys = attention.k_proj(normed)
    if keys_only:
        return keys
    queries = attention.q_proj(normed[:, :num_queries])
    return attention_probabilities(queries, keys, attention.num_attention_heads, attention.scaling)


def vit_planting_sites(model: ViTModel | DeiTModel) -> PlantingSites:
    embeddings = model.embeddings
    prefix = tuple(t for t in (embeddings.cls_token, getattr(embeddings, "distillation_token", None)) if t is not None)
    blocks = block_sites(model.layers, lambda block: block.attention)
    heads = model.config.num_attention_heads
    return PlantingSites(embeddings.patch_embeddings.projection, blocks, heads, prefix, embeddings.position_embeddings)


VIT_B16_ARCH = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16
)

FAMILIES = (
    Family(
        name="vit",
        model_classes=(ViTTTRegModel, ViTTTRegForImageClassification, ViTTTRegForMaskedImageModeling),
        auto_classes=(
            ("AutoModel", ViTTTRegModel),
            ("AutoModelForImageClassification", ViTTTRegForImageClassification),
            ("AutoModelForMaskedImageModeling", ViTTTRegForMaskedImageModeling),
        ),
        checkpoint_model_types=("vit",),
        attention_reader=vit_attention,
        planting_sites=vit_planting_sites,
        default_image_processor=vit_image_processor,
        checkpoints=(
            transformers_checkpoint(
                "vit_base_patch16_224_in21k",
                "Google ViT-B/16 (ImageNet-21k) with a test-time register (no shipped index: pass one).",
                ViTTTRegModel,
                "google/vit-base-patch16-224-in21k",
                VIT_B16_ARCH,
            ),
        ),
    ),
    Family(
        name="deit",
        model_classes=(
            DeiTTTRegModel,
            DeiTTTRegForImageClassification,
            DeiTTTRegForImageClassificationWithTeacher,
            DeiTTTRegForMaskedImageModeling,
        ),
        auto_classes=(
            ("AutoModel", DeiTTTRegModel),
            (
                "AutoModelForImageClassification",
                (DeiTTTRegForImageClassification, DeiTTTRegForImageClassificationWithTeacher),
            ),
            ("AutoModelForMaskedImageModeling", DeiTTTRegForMaskedImageModeling),
        ),
        checkpoint_model_types=("deit",),
        attention_reader=vit_attention,
        planting_sites=vit_planting_sites,
        default_image_processor=deit_image_processor,
        checkpoints=(
            transformers_checkpoint(  # a classifier checkpoint: it holds no pooler, so the model gets none
                "deit_base_distilled_patch16_224",
                "DeiT-B/16 distilled, without a pooler, with a test-time register (no shipped index: pass one).",
                DeiTTTRegModel,
                "facebook/deit-base-distilled-patch16-224",
                VIT_B16_ARCH,
                add_pooling_layer=False,
            ),
        ),
    ),
)

register_auto_classes(*FAMILIES)
