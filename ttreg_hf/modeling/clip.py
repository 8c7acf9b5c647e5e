"""CLIP vision towers with test-time registers: the parent does the work; these classes add the registers and the edit."""

from dataclasses import dataclass

import torch
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPVisionEmbeddings, CLIPVisionModelOutput
from transformers.utils.generic import can_return_tuple

from ..configs.clip import CLIPVisionTTRegConfig
from .layout import TokenLayout
from .registers import (
    EditAfterActivationMixin,
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    TestTimeRegisterModelOutput,
    TestTimeRegisterOutputMixin,
    adopt,
    check_image_size,
    check_pixel_values,
)


@dataclass
class CLIPVisionTTRegModelOutput(TestTimeRegisterOutputMixin, CLIPVisionModelOutput):
    r"""
    image_embeds (`torch.Tensor` of shape `(batch_size, output_dim)`):
        The image embeddings obtained by applying the projection layer to the pooler_output.
    test_time_registers (`torch.FloatTensor` of shape `(batch_size, num_test_time_registers, hidden_size)`):
        The test-time registers' rows of the final sequence, stripped from `last_hidden_state`. `None` when the edit
        is off.
    test_time_register_attentions (`tuple(torch.FloatTensor)`, one per layer, each of shape `(batch_size, num_heads,
    sequence_length, num_test_time_registers)`):
        The attention of every token onto the test-time registers, cut from `attentions`; see
        `TestTimeRegisterModelOutput`.
    """

    test_time_registers: torch.FloatTensor | None = None
    test_time_register_attentions: tuple[torch.FloatTensor, ...] | None = None


class CLIPVisionTTRegEmbeddings(CLIPVisionEmbeddings):
    """Appends the test-time registers after the position embedding (they get none), before `pre_layrnorm`."""

    token_layout: TokenLayout

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        check_pixel_values(pixel_values, self.patch_size)
        check_image_size(pixel_values, self.image_size, interpolate_pos_encoding)
        return self.token_layout.append_registers(super().forward(pixel_values, interpolate_pos_encoding))


class CLIPTTRegMLP(EditAfterActivationMixin, CLIPMLP):
    """`CLIPMLP` with the register-neuron edit right after the activation."""


def adopt_register_modules(vision_model: CLIPVisionModel) -> None:
    """Turn a `CLIPVisionModel`'s embeddings and MLPs into their register-aware subclasses (weights kept)."""
    adopt(vision_model.embeddings, CLIPVisionTTRegEmbeddings)
    for layer in vision_model.encoder.layers:
        adopt(layer.mlp, CLIPTTRegMLP)


class CLIPVisionTTRegModel(PreTrainedTestTimeRegisterMixin, CLIPVisionModel):
    """[`CLIPVisionModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    Loads any CLIP checkpoint (full `CLIPModel` ones included) with `from_pretrained`, and is the vision tower
    `AutoModel` builds for a `CLIPVisionTTRegConfig`, e.g. inside LLaVA. `pooler_output` is the CLS token after
    `post_layernorm`, as in the parent.
    """

    config: CLIPVisionTTRegConfig
    config_class = CLIPVisionTTRegConfig
    register_seams = RegisterSeams(appender="embeddings", blocks="encoder.layers", mlp="mlp")
    _no_split_modules = [*CLIPVisionModel._no_split_modules, "CLIPVisionTTRegEmbeddings"]

    def __init__(self, config: CLIPVisionTTRegConfig):
        super().__init__(config)
        adopt_register_modules(self)
        self.refresh_test_time_registers()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False, **kwargs
    ) -> TestTimeRegisterModelOutput:
        self.refresh_test_time_registers()
        outputs = super().forward(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)


class CLIPVisionTTRegModelWithProjection(PreTrainedTestTimeRegisterMixin, CLIPVisionModelWithProjection):
    """[`CLIPVisionModelWithProjection`] with test-time registers in its `vision_model` (a `CLIPVisionModel` whose
    embeddings and MLPs are adopted, as in `CLIPVisionTTRegModel`)."""

    config: CLIPVisionTTRegConfig
    config_class = CLIPVisionTTRegConfig
    register_seams = RegisterSeams(appender="vision_model.embeddings", blocks="vision_model.encoder.layers", mlp="mlp")
    _no_split_modules = CLIPVisionTTRegModel._no_split_modules

    def __init__(self, config: CLIPVisionTTRegConfig):
        super().__init__(config)
        adopt_register_modules(self.vision_model)
        self.refresh_test_time_registers()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False, **kwargs
    ) -> CLIPVisionTTRegModelOutput:
        # the parent's forward would drop `test_time_registers`: same composition, one more field
        self.refresh_test_time_registers()
        vision_outputs = self.vision_model(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        vision_outputs = self.strip_test_time_registers(vision_outputs, TestTimeRegisterModelOutput)
        return CLIPVisionTTRegModelOutput(
            image_embeds=self.visual_projection(vision_outputs.pooler_output),
            last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            test_time_registers=vision_outputs.test_time_registers,
            test_time_register_attentions=vision_outputs.test_time_register_attentions,
        )
