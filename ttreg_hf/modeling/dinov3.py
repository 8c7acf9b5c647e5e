"""DINOv3 ViT with test-time registers: the parent does the work; these classes add the registers and the edit.

DINOv3 has no absolute position embedding: positions enter through RoPE, which `apply_rotary_pos_emb` applies to the
last ``len(cos)`` tokens, taking every token before them for a prefix token (CLS, trained registers). The appended
test-time registers therefore get rows of the identity rotation (cos 1, sin 0): they are counted in, and unrotated.
"""

import torch
from torch import nn
from transformers import DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTEmbeddings,
    DINOv3ViTGatedMLP,
    DINOv3ViTMLP,
    DINOv3ViTRopePositionEmbedding,
)
from transformers.utils.generic import can_return_tuple

from ..configs.dinov3 import DINOv3ViTTTRegConfig
from .layout import TokenLayout
from .registers import (
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    TestTimeRegisterModelOutput,
    adopt,
    check_pixel_values,
)


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


class DINOv3ViTTTRegModel(PreTrainedTestTimeRegisterMixin, DINOv3ViTModel):
    """[`DINOv3ViTModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    The tokens are ``[CLS | num_register_tokens trained registers | patches | test-time registers]``; `pooler_output`
    is the CLS token, as in the parent.
    """

    config: DINOv3ViTTTRegConfig
    config_class = DINOv3ViTTTRegConfig
    register_seams = RegisterSeams(
        appender="embeddings", blocks="model.layer", mlp="mlp", layout_readers=("rope_embeddings",)
    )
    _no_split_modules = [*DINOv3ViTModel._no_split_modules, "DINOv3ViTTTRegEmbeddings"]

    def __init__(self, config: DINOv3ViTTTRegConfig):
        super().__init__(config)
        adopt(self.embeddings, DINOv3ViTTTRegEmbeddings)
        adopt(self.rope_embeddings, DINOv3ViTTTRegRopePositionEmbedding)
        for layer in self.model.layer:
            adopt(layer.mlp, DINOv3ViTTTRegGatedMLP if config.use_gated_mlp else DINOv3ViTTTRegMLP)
        self.refresh_test_time_registers()

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, **kwargs
    ) -> TestTimeRegisterModelOutput:
        self.refresh_test_time_registers()
        check_pixel_values(pixel_values, self.config.patch_size)  # here: the parent casts to float before embedding
        outputs = super().forward(pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True, **kwargs)
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)
