"""ViT and DeiT with test-time registers: the parent does the work; these classes add the registers and the edit.

`transformers` generates DeiT's modules from ViT's (``modular_deit.py``): same forwards, own classes. So each piece
here is one mixin, combined with the ViT and with the DeiT parent.
"""

import torch
from torch import nn
from transformers import DeiTModel, ViTModel
from transformers.models.deit.modeling_deit import DeiTEmbeddings, DeiTMLP
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTMLP
from transformers.utils.generic import can_return_tuple

from ..configs.vit import DeiTTTRegConfig, ViTTTRegConfig
from .layout import TokenLayout
from .registers import (
    EditAfterActivationMixin,
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    TestTimeRegisterModelOutput,
    adopt,
    check_pixel_values,
)


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

    register_seams = RegisterSeams(appender="embeddings", blocks="layers", mlp="mlp")
    embeddings_class: type[nn.Module]
    mlp_class: type[nn.Module]

    def __init__(self, config, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        adopt(self.embeddings, self.embeddings_class)
        for layer in self.layers:
            adopt(layer.mlp, self.mlp_class)
        self.refresh_test_time_registers()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> TestTimeRegisterModelOutput:
        self.refresh_test_time_registers()
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
    embeddings_class = ViTTTRegEmbeddings
    mlp_class = ViTTTRegMLP
    _no_split_modules = [*ViTModel._no_split_modules, "ViTTTRegEmbeddings"]


class DeiTTTRegModel(ViTStyleTTRegModelMixin, DeiTModel):
    """[`DeiTModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    The CLS and the distillation token both come before the patches; `pooler_output` reads the CLS token.
    """

    config: DeiTTTRegConfig
    config_class = DeiTTTRegConfig
    embeddings_class = DeiTTTRegEmbeddings
    mlp_class = DeiTTTRegMLP
    num_prefix_tokens = 2
    _no_split_modules = [*DeiTModel._no_split_modules, "DeiTTTRegEmbeddings"]
