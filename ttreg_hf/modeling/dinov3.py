"""DINOv3 ViT with test-time registers: the parent does the work; these classes add the registers and the edit.

DINOv3 has no absolute position embedding: positions enter through RoPE, which `apply_rotary_pos_emb` applies to the
last ``len(cos)`` tokens, taking every token before them for a prefix token (CLS, trained registers). The appended
test-time registers therefore get rows of the identity rotation (cos 1, sin 0): they are counted in, and unrotated.
"""

import torch
from torch import nn
from transformers import DINOv3ViTBackbone, DINOv3ViTImageProcessor, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTBackboneOutput,
    DINOv3ViTEmbeddings,
    DINOv3ViTEncoder,
    DINOv3ViTGatedMLP,
    DINOv3ViTMLP,
    DINOv3ViTRopePositionEmbedding,
    apply_rotary_pos_emb,
)
from transformers.utils.generic import can_return_tuple

from ..configs.dinov3 import DINOv3ViTTTRegConfig
from ..family import Family, register_auto_classes, transformers_checkpoint
from .layout import TokenLayout
from .registers import (
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    StripRegistersMixin,
    TestTimeRegisterModelOutput,
    check_pixel_values,
)
from .sites import PlantingSites, block_sites


class DINOv3ViTTTRegEmbeddings(DINOv3ViTEmbeddings):
    """Appends the test-time registers after the patches (CLS and the trained registers come before them)."""

    token_layout: TokenLayout

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.token_layout.append_registers(super().forward(pixel_values, bool_masked_pos))


class DINOv3ViTTTRegRopePositionEmbedding(DINOv3ViTRopePositionEmbedding):
    """The patches' rotations, then the identity rotation for each test-time register: they get no position."""

    token_layout: TokenLayout

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = super().forward(pixel_values)
        registers = (0, 0, 0, self.token_layout.num_registers)  # rows appended after the patches'
        return nn.functional.pad(cos, registers, value=1.0), nn.functional.pad(sin, registers, value=0.0)


class DINOv3ViTTTRegMLP(DINOv3ViTMLP):
    """`DINOv3ViTMLP` with the register-neuron edit right after the activation."""

    register_edit: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.register_edit(self.act_fn(self.up_proj(x))))


class DINOv3ViTTTRegGatedMLP(DINOv3ViTGatedMLP):
    """`DINOv3ViTGatedMLP` (SwiGLU) with the register-neuron edit right after the gating."""

    register_edit: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.register_edit(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class DINOv3ViTTTRegEncoder(StripRegistersMixin, DINOv3ViTEncoder):
    """`DINOv3ViTEncoder` whose outputs come without the test-time registers: the backbone makes feature maps of them."""


class _DINOv3ViTTTRegMixin(PreTrainedTestTimeRegisterMixin):
    """What the model and the backbone share: the same module tree, CLS and trained registers before the patches."""

    config: DINOv3ViTTTRegConfig
    config_class = DINOv3ViTTTRegConfig
    _no_split_modules = [*DINOv3ViTModel._no_split_modules, "DINOv3ViTTTRegEmbeddings"]

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens


class DINOv3ViTTTRegModel(_DINOv3ViTTTRegMixin, DINOv3ViTModel):
    """[`DINOv3ViTModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    The tokens are ``[CLS | num_register_tokens trained registers | patches | test-time registers]``; `pooler_output`
    is the CLS token, as in the parent.
    """

    register_seams = RegisterSeams(
        appender="embeddings",
        blocks="model.layer",
        mlp="mlp",
        layout_readers=("rope_embeddings",),
        modules=(
            DINOv3ViTTTRegEmbeddings,
            DINOv3ViTTTRegRopePositionEmbedding,
            DINOv3ViTTTRegMLP,
            DINOv3ViTTTRegGatedMLP,
        ),
    )

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, **kwargs
    ) -> TestTimeRegisterModelOutput:
        check_pixel_values(pixel_values, self.config.patch_size)  # here: the parent casts to float before embedding
        outputs = super().forward(pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True, **kwargs)
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)


class DINOv3ViTTTRegBackbone(_DINOv3ViTTTRegMixin, DINOv3ViTBackbone):
    """[`DINOv3ViTBackbone`] with test-time registers (see `Dinov2TTRegBackbone`): the encoder drops the registers
    before the parent makes its feature maps (and class tokens, and ``last_hidden_state``), so every tensor has the
    parent's shape."""

    register_seams = RegisterSeams(
        appender="embeddings",
        blocks="model.layer",
        mlp="mlp",
        layout_readers=("rope_embeddings", "model"),
        modules=(*DINOv3ViTTTRegModel.register_seams.modules, DINOv3ViTTTRegEncoder),
    )

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> DINOv3ViTBackboneOutput:
        check_pixel_values(pixel_values, self.config.patch_size)
        return super().forward(pixel_values, **kwargs)


# ---- the family's declaration ------------------------------------------------------------------------------------


def dinov3_image_processor(config: DINOv3ViTTTRegConfig) -> DINOv3ViTImageProcessor:
    """DINOv3's preprocessing: resize to the model's square size, ImageNet statistics."""
    return DINOv3ViTImageProcessor(size={"height": config.image_size, "width": config.image_size})


def dinov3_attention(
    block: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings=None,
    keys_only: bool = False,
    num_queries: int | None = None,
    **_,
) -> torch.Tensor:
    """With RoPE on the patches (and, through this family's rotation table, the identity on the test-time registers);
    the keys as the attention uses them, rotated. RoPE tells the prefix tokens by the sequence length, so every
    query is computed, and the rows of the first ``num_queries`` kept."""
    attention, normed = block.attention, block.norm1(hidden_states)
    shape = (*normed.shape[:2], attention.num_heads, attention.head_dim)
    queries = attention.q_proj(normed).view(shape).transpose(1, 2)
    keys = attention.k_proj(normed).view(shape).transpose(1, 2)
    if position_embeddings is not None:
        queries, keys = apply_rotary_pos_emb(queries, keys, *position_embeddings)
    if keys_only:
        return keys.transpose(1, 2).flatten(2)
    scores = queries[:, :, :num_queries].float() @ keys.float().transpose(-1, -2)
    return torch.softmax(scores * attention.scaling, dim=-1)


def dinov3_planting_sites(model: DINOv3ViTModel) -> PlantingSites:
    embeddings, config = model.embeddings, model.config
    gated = ("gate_proj", "down_proj", "up_proj") if config.use_gated_mlp else ("up_proj", "down_proj")
    blocks = block_sites(model.model.layer, lambda block: block.attention, *gated, sink=False)  # RoPE rotates the keys
    prefix = (embeddings.cls_token, embeddings.register_tokens)
    return PlantingSites(embeddings.patch_embeddings, blocks, config.num_attention_heads, prefix)


DINOV3_VITL16_ARCH = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=16, num_register_tokens=4,
)  # fmt: skip

FAMILIES = (
    Family(
        name="dinov3",
        model_classes=(DINOv3ViTTTRegModel, DINOv3ViTTTRegBackbone),
        auto_classes=(
            ("AutoModel", DINOv3ViTTTRegModel),
            ("AutoBackbone", DINOv3ViTTTRegBackbone),
        ),
        checkpoint_model_types=("dinov3_vit",),
        attention_reader=dinov3_attention,
        planting_sites=dinov3_planting_sites,
        default_image_processor=dinov3_image_processor,
        checkpoints=(
            transformers_checkpoint(
                "dinov3_vitl16",
                "DINOv3 ViT-L/16 (LVD-1689M; a gated hub repository) with a test-time register (no shipped index: pass one).",
                DINOv3ViTTTRegModel,
                "facebook/dinov3-vitl16-pretrain-lvd1689m",
                DINOV3_VITL16_ARCH,
            ),
        ),
    ),
)

register_auto_classes(*FAMILIES)
