"""DINOv2 with test-time registers: the parent does the work; these classes add the registers and the edit.

`Dinov2TTRegModel` is the tower; `Dinov2TTRegBackbone` gives depth and segmentation models (DPT, Depth Anything,
Mask2Former) feature maps of the parent's shapes; `Dinov2TTRegForImageClassification` is the parent classifier on our
tower.
"""

import math
from functools import partial

import torch
from torch import nn
from transformers import BitImageProcessor, Dinov2Backbone, Dinov2ForImageClassification, Dinov2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.modeling_outputs import BackboneOutput
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings, Dinov2Encoder, Dinov2MLP, Dinov2SwiGLUFFN
from transformers.utils.generic import can_return_tuple

from ..configs.dinov2 import Dinov2TTRegConfig
from ..family import Checkpoint, Family, register_auto_classes
from .attention import attention_probabilities
from .dinov2_original import load_dinov2_linear_classifier, load_upstream_dinov2
from .layout import TokenLayout
from .registers import (
    EditAfterActivationMixin,
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    StripRegistersMixin,
    TestTimeRegisterModelOutput,
    WithRegisterTowerMixin,
    check_pixel_values,
)
from .sites import PlantingSites, block_sites


class Dinov2TTRegEmbeddings(Dinov2Embeddings):
    """Appends the test-time registers after the position embedding (they get none); resizes the position table as
    ``config.position_interpolation`` says."""

    token_layout: TokenLayout
    config: Dinov2TTRegConfig

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.config.position_interpolation == "transformers":
            return super().interpolate_pos_encoding(embeddings, height, width)
        # facebookresearch/dinov2's `DinoVisionTransformer.interpolate_pos_encoding` (interpolate_offset 0.1, no
        # antialias): the offset scale factors sample other points than `size=` does
        table = self.position_embeddings
        side = math.isqrt(table.shape[1] - 1)
        patch_height, patch_width = self.patch_embeddings.patch_size
        rows, columns = height // patch_height, width // patch_width
        if rows * columns == side * side and height == width:
            return table
        grid = table[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale_factor = ((rows + 0.1) / side, (columns + 0.1) / side)
        grid = nn.functional.interpolate(grid, scale_factor=scale_factor, mode="bicubic", antialias=False)
        patches = grid.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)
        return torch.cat((table[:, :1].float(), patches), dim=1).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None) -> torch.Tensor:
        check_pixel_values(pixel_values, self.patch_embeddings.patch_size)
        return self.token_layout.append_registers(super().forward(pixel_values, bool_masked_pos))


class Dinov2TTRegMLP(EditAfterActivationMixin, Dinov2MLP):
    """`Dinov2MLP` with the register-neuron edit right after the activation."""


class Dinov2TTRegSwiGLUFFN(Dinov2SwiGLUFFN):
    """`Dinov2SwiGLUFFN` (ViT-g) with the register-neuron edit right after the gating."""

    register_edit: nn.Module

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gated = self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        return self.down_proj(self.register_edit(gated))


class Dinov2TTRegModel(PreTrainedTestTimeRegisterMixin, Dinov2Model):
    """[`Dinov2Model`] with test-time registers: same weights, same output shapes, registers in their own field."""

    config: Dinov2TTRegConfig
    config_class = Dinov2TTRegConfig
    register_seams = RegisterSeams(
        appender="embeddings",
        blocks="encoder.layer",
        mlp="mlp",
        modules=(Dinov2TTRegEmbeddings, Dinov2TTRegMLP, Dinov2TTRegSwiGLUFFN),
    )
    _no_split_modules = [*Dinov2Model._no_split_modules, "Dinov2TTRegEmbeddings"]

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> TestTimeRegisterModelOutput:
        attention_mask = self.token_layout.append_registers_to_mask(attention_mask)
        outputs = super().forward(
            pixel_values, bool_masked_pos=bool_masked_pos, attention_mask=attention_mask, return_dict=True, **kwargs
        )
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)


class Dinov2TTRegEncoder(StripRegistersMixin, Dinov2Encoder):
    """`Dinov2Encoder` whose outputs come without the test-time registers: the backbone makes feature maps of them."""


class Dinov2TTRegBackbone(PreTrainedTestTimeRegisterMixin, Dinov2Backbone):
    """[`Dinov2Backbone`] with test-time registers, for DPT, Depth Anything, Mask2Former and any model that takes a
    backbone (`AutoBackbone`, `load_backbone`, a ``backbone_config``): the encoder drops the registers from the hidden
    states before the parent makes its feature maps, so maps, hidden states and attentions have the parent's shapes
    and no head sees a register. The output is the parent's `BackboneOutput` (the registers are not returned: read
    them with `Dinov2TTRegModel`)."""

    config: Dinov2TTRegConfig
    config_class = Dinov2TTRegConfig
    register_seams = RegisterSeams(
        appender="embeddings",
        blocks="encoder.layer",
        mlp="mlp",
        layout_readers=("encoder",),
        modules=(*Dinov2TTRegModel.register_seams.modules, Dinov2TTRegEncoder),
    )
    _no_split_modules = Dinov2TTRegModel._no_split_modules

    def forward(
        self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BackboneOutput:
        attention_mask = self.token_layout.append_registers_to_mask(attention_mask)
        return super().forward(pixel_values, attention_mask=attention_mask, **kwargs)


class Dinov2TTRegForImageClassification(WithRegisterTowerMixin, Dinov2ForImageClassification):
    """[`Dinov2ForImageClassification`] on a `Dinov2TTRegModel` (``dinov2``): the head reads the CLS token and the
    mean of the patch tokens, the registers left out; labels and loss as in the parent."""

    config: Dinov2TTRegConfig
    config_class = Dinov2TTRegConfig
    tower_class = Dinov2TTRegModel


# ---- the family's declaration ------------------------------------------------------------------------------------


def dinov2_image_processor(config: Dinov2TTRegConfig | None = None) -> BitImageProcessor:
    """The preprocessing of facebook/dinov2-* and of upstream DINOv2's evaluation: resize 256 (bicubic), crop 224,
    ImageNet statistics (the same at every model size)."""
    return BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


def dinov2_attention(
    block: nn.Module, hidden_states: torch.Tensor, keys_only: bool = False, num_queries: int | None = None, **_
) -> torch.Tensor:
    attention, normed = block.attention, block.norm1(hidden_states)
    keys = attention.k_proj(normed)
    if keys_only:
        return keys
    queries = attention.q_proj(normed[:, :num_queries])
    return attention_probabilities(queries, keys, attention.num_attention_heads, attention.scaling)


def dinov2_planting_sites(model: Dinov2Model) -> PlantingSites:
    embeddings, config = model.embeddings, model.config
    gated = ("gate_proj", "down_proj", "up_proj") if config.use_swiglu_ffn else ()
    blocks = block_sites(model.encoder.layer, lambda block: block.attention, *gated)
    heads, prefix = config.num_attention_heads, (embeddings.cls_token,)
    return PlantingSites(embeddings.patch_embeddings.projection, blocks, heads, prefix, embeddings.position_embeddings)


def _upstream(arch: str, summary: str, timm_size: str) -> tuple[Checkpoint, Checkpoint]:
    """Upstream's ``dinov2_{arch}`` backbone and its ImageNet-1k linear classifier ``dinov2_{arch}_lc``. timm's
    ``vit_{timm_size}_patch14_dinov2`` holds the same weights (converted with the neuron order kept)."""
    backbone = Checkpoint(
        f"dinov2_{arch}",
        summary,
        partial(load_upstream_dinov2, Dinov2TTRegModel, arch),
        tower=lambda hub_model: hub_model.dinov2,
        image_processor=dinov2_image_processor,
        aliases=(f"vit_{timm_size}_patch14_dinov2",),
    )
    classifier = Checkpoint(
        f"dinov2_{arch}_lc",
        f"Upstream's ImageNet-1k linear classifier on {summary.partition(' with ')[0]}, with test-time registers; "
        "``layers`` 1 or 4 (default); ``head_weights``: a local head file.",
        partial(load_dinov2_linear_classifier, Dinov2TTRegModel, arch),
        tower=lambda classifier: classifier.backbone.dinov2,
        image_processor=dinov2_image_processor,
        entry=f"dinov2_{arch}_tt_reg_lc",
    )
    return backbone, classifier


FAMILIES = (
    Family(
        name="dinov2",
        model_classes=(Dinov2TTRegModel, Dinov2TTRegBackbone, Dinov2TTRegForImageClassification),
        auto_classes=(
            ("AutoModel", Dinov2TTRegModel),
            ("AutoBackbone", Dinov2TTRegBackbone),
            ("AutoModelForImageClassification", Dinov2TTRegForImageClassification),
        ),
        checkpoint_model_types=("dinov2",),
        attention_reader=dinov2_attention,
        planting_sites=dinov2_planting_sites,
        default_image_processor=dinov2_image_processor,
        licences={"facebook/dinov2-": "apache-2.0"},
        checkpoints=(
            *_upstream(
                "vits14",
                "DINOv2 ViT-S/14 with test-time registers (no shipped index: pass ``register_neurons``).",
                "small",
            ),
            *_upstream(
                "vitb14",
                "DINOv2 ViT-B/14 with test-time registers (no shipped index: pass ``register_neurons``).",
                "base",
            ),
            *_upstream(
                "vitl14",
                "DINOv2 ViT-L/14 with a test-time register and the authors' index (45 neurons, layers 12-17).",
                "large",
            ),
            *_upstream(
                "vitg14",
                "DINOv2 ViT-g/14 (SwiGLU) with test-time registers (no shipped index: pass ``register_neurons``).",
                "giant",
            ),
        ),
    ),
)

register_auto_classes(*FAMILIES)
