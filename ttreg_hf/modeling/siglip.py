"""SigLIP and SigLIP2 vision towers with test-time registers: the parent does the work; these classes add the
registers, the edit, and the choice of whether the attention-pooling head sees the registers.

SigLIP has no CLS token (``num_prefix_tokens = 0``): the registers follow the patches, and `head` (multihead attention
pooling, MAP) pools the final sequence. SigLIP2's variable-resolution (NaFlex) batches are padded: the registers follow
the padded patch sequence, the attention mask is extended so every token attends to them, and the edit is given the
mask so that padding feeds neither the register value nor the patch statistics.
"""

import torch
from torch import nn
from transformers import Siglip2VisionModel, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import (
    SiglipMLP,
    SiglipMultiheadAttentionPoolingHead,
    SiglipVisionEmbeddings,
)
from transformers.models.siglip2.modeling_siglip2 import (
    Siglip2EncoderLayer,
    Siglip2MLP,
    Siglip2MultiheadAttentionPoolingHead,
    Siglip2VisionEmbeddings,
)
from transformers.utils.generic import can_return_tuple

from ..configs.siglip import Siglip2VisionTTRegConfig, SiglipVisionTTRegConfig
from .edit import RegisterNeuronEdit
from .layout import TokenLayout
from .registers import (
    EditAfterActivationMixin,
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    TestTimeRegisterModelOutput,
    adopt,
    check_image_size,
    check_pixel_values,
)


class SiglipVisionTTRegEmbeddings(SiglipVisionEmbeddings):
    """Appends the test-time registers after the position embedding (they get none)."""

    token_layout: TokenLayout

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        check_pixel_values(pixel_values, self.patch_size)
        check_image_size(pixel_values, self.image_size, interpolate_pos_encoding)
        return self.token_layout.append_registers(super().forward(pixel_values, interpolate_pos_encoding))


class Siglip2VisionTTRegEmbeddings(Siglip2VisionEmbeddings):
    """Appends the test-time registers after the (padded) patch sequence; they get no position embedding."""

    token_layout: TokenLayout

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.LongTensor) -> torch.Tensor:
        check_pixel_values(pixel_values, patch_size=1)  # already patchified: only the dtype is left to check
        return self.token_layout.append_registers(super().forward(pixel_values, spatial_shapes))


class SiglipTTRegMLP(EditAfterActivationMixin, SiglipMLP):
    """`SiglipMLP` with the register-neuron edit right after the activation."""


class Siglip2TTRegMLP(EditAfterActivationMixin, Siglip2MLP):
    """`Siglip2MLP` with the register-neuron edit right after the activation."""


class Siglip2TTRegEncoderLayer(Siglip2EncoderLayer):
    """`Siglip2EncoderLayer` that lends its MLP's edit the batch's token mask for the duration of the call. The mask is
    an argument of the layer: gradient checkpointing recomputes the layer from its arguments, mask included."""

    mlp: Siglip2TTRegMLP

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        register_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        edit = self.mlp.register_edit
        if not isinstance(edit, RegisterNeuronEdit):
            return super().forward(hidden_states, attention_mask, **kwargs)
        edit.token_mask = register_token_mask
        try:
            return super().forward(hidden_states, attention_mask, **kwargs)
        finally:
            edit.token_mask = None  # the mask belongs to this call only


class _RegisterPoolingMixin:
    """A MAP head that pools the test-time registers too while the model config's ``pool_registers`` is on."""

    config: SiglipVisionTTRegConfig | Siglip2VisionTTRegConfig  # the model's, read at every call
    token_layout: TokenLayout

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (``(batch, tokens, ...)``) as the probe sees them."""
        return tokens if self.config.pool_registers else self.token_layout.strip_registers(tokens)


class SiglipTTRegPoolingHead(_RegisterPoolingMixin, SiglipMultiheadAttentionPoolingHead):
    """`SiglipMultiheadAttentionPoolingHead` over the patches and, with ``pool_registers``, the registers."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return super().forward(self._pooled(hidden_state))


class Siglip2TTRegPoolingHead(_RegisterPoolingMixin, Siglip2MultiheadAttentionPoolingHead):
    """`Siglip2MultiheadAttentionPoolingHead` over the real patches and, with ``pool_registers``, the registers."""

    def forward(self, hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            attention_mask = self._pooled(attention_mask)
        return super().forward(self._pooled(hidden_state), attention_mask)


class _SiglipTTRegMixin(PreTrainedTestTimeRegisterMixin):
    """What SigLIP and SigLIP2 share: no CLS, the same module tree, the MAP head's view of the registers."""

    num_prefix_tokens = 0
    _register_classes: tuple[type[nn.Module], type[nn.Module], type[nn.Module]]  # embeddings, MLP, pooling head

    def adopt_register_modules(self) -> None:
        """Turn the embeddings, MLPs and head into their register-aware subclasses (weights kept); build the edits.
        The head reads the layout (and ``pool_registers`` from the config) when there is one."""
        embeddings_class, mlp_class, head_class = self._register_classes
        adopt(self.embeddings, embeddings_class)
        for layer in self.encoder.layers:
            adopt(layer.mlp, mlp_class)
        if self.use_head:
            adopt(self.head, head_class).config = self.config
        self.register_seams = RegisterSeams(
            appender="embeddings", blocks="encoder.layers", mlp="mlp", layout_readers=("head",) if self.use_head else ()
        )
        self.refresh_test_time_registers()


class SiglipVisionTTRegModel(_SiglipTTRegMixin, SiglipVisionModel):
    """[`SiglipVisionModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    Loads any SigLIP checkpoint (full `SiglipModel` ones included) with `from_pretrained`. `pooler_output` is the
    MAP head's, over the patches and (with ``pool_registers``, the default) the registers.
    """

    config: SiglipVisionTTRegConfig
    config_class = SiglipVisionTTRegConfig
    _no_split_modules = [*SiglipVisionModel._no_split_modules, "SiglipVisionTTRegEmbeddings", "SiglipTTRegPoolingHead"]
    _register_classes = (SiglipVisionTTRegEmbeddings, SiglipTTRegMLP, SiglipTTRegPoolingHead)

    def __init__(self, config: SiglipVisionTTRegConfig):
        super().__init__(config)
        self.adopt_register_modules()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = False, **kwargs
    ) -> TestTimeRegisterModelOutput:
        self.refresh_test_time_registers()
        outputs = super().forward(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)


class Siglip2VisionTTRegModel(_SiglipTTRegMixin, Siglip2VisionModel):
    """[`Siglip2VisionModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    Takes the parent's NaFlex inputs. In a padded batch each image gets the registers (and `pooler_output`) it gets
    alone: the registers follow the padded sequence, every real token attends to them, and padding is kept out of
    the edit.
    """

    config: Siglip2VisionTTRegConfig
    config_class = Siglip2VisionTTRegConfig
    _no_split_modules = [
        *Siglip2VisionModel._no_split_modules,
        "Siglip2TTRegEncoderLayer",
        "Siglip2VisionTTRegEmbeddings",
        "Siglip2TTRegPoolingHead",
    ]
    _register_classes = (Siglip2VisionTTRegEmbeddings, Siglip2TTRegMLP, Siglip2TTRegPoolingHead)

    def __init__(self, config: Siglip2VisionTTRegConfig):
        super().__init__(config)
        self.adopt_register_modules()

    def adopt_register_modules(self) -> None:
        """As for SigLIP, and the encoder layers, which pass each call's token mask to their edit."""
        for layer in self.encoder.layers:
            adopt(layer, Siglip2TTRegEncoderLayer)
        super().adopt_register_modules()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None,
        spatial_shapes: torch.LongTensor,
        **kwargs,
    ) -> TestTimeRegisterModelOutput:
        self.refresh_test_time_registers()
        if pixel_attention_mask is not None and pixel_attention_mask.shape != pixel_values.shape[:2]:
            raise ValueError(
                f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}, pixel_values "
                f"{tuple(pixel_values.shape)}: the mask needs one entry per patch, (batch, max_num_patches); pass the "
                "image processor's outputs together."
            )
        token_mask = self.token_layout.append_registers_to_mask(pixel_attention_mask)
        outputs = super().forward(
            pixel_values, token_mask, spatial_shapes, register_token_mask=token_mask, return_dict=True, **kwargs
        )
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)
