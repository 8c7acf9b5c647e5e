"""CLIP with test-time registers: the parent does the work; these classes add the registers and the edit.

`CLIPVisionTTRegModel` (and `...WithProjection`) is the vision tower; `CLIPTTRegModel` (zero-shot) and
`CLIPTTRegForImageClassification` are the parents on our tower, with a `CLIPTTRegConfig` that saves and reloads it.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    CLIPForImageClassification,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPVisionEmbeddings, CLIPVisionModelOutput
from transformers.utils.generic import can_return_tuple

from ..configs.clip import CLIPTTRegConfig, CLIPVisionTTRegConfig
from ..family import Family, register_auto_classes, transformers_checkpoint
from .attention import attention_probabilities
from .layout import TokenLayout
from .registers import (
    EditAfterActivationMixin,
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    TestTimeRegisterModelOutput,
    TestTimeRegisterOutputMixin,
    WithRegisterTowerMixin,
    check_image_size,
    check_pixel_values,
)
from .sites import PlantingSites, block_sites


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


class CLIPVisionTTRegModel(PreTrainedTestTimeRegisterMixin, CLIPVisionModel):
    """[`CLIPVisionModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    Loads any CLIP checkpoint (full `CLIPModel` ones included) with `from_pretrained`, and is the vision tower
    `AutoModel` builds for a `CLIPVisionTTRegConfig`, e.g. inside LLaVA. `pooler_output` is the CLS token after
    `post_layernorm`, as in the parent.
    """

    config: CLIPVisionTTRegConfig
    config_class = CLIPVisionTTRegConfig
    register_seams = RegisterSeams(
        appender="embeddings", blocks="encoder.layers", mlp="mlp", modules=(CLIPVisionTTRegEmbeddings, CLIPTTRegMLP)
    )
    _no_split_modules = [*CLIPVisionModel._no_split_modules, "CLIPVisionTTRegEmbeddings"]

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False, **kwargs
    ) -> TestTimeRegisterModelOutput:
        outputs = super().forward(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)


class CLIPVisionTTRegModelWithProjection(PreTrainedTestTimeRegisterMixin, CLIPVisionModelWithProjection):
    """[`CLIPVisionModelWithProjection`] with test-time registers in its `vision_model` (a `CLIPVisionModel` whose
    embeddings and MLPs are adopted, as in `CLIPVisionTTRegModel`)."""

    config: CLIPVisionTTRegConfig
    config_class = CLIPVisionTTRegConfig
    register_seams = RegisterSeams(
        appender="vision_model.embeddings",
        blocks="vision_model.encoder.layers",
        mlp="mlp",
        modules=CLIPVisionTTRegModel.register_seams.modules,
    )
    _no_split_modules = CLIPVisionTTRegModel._no_split_modules

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False, **kwargs
    ) -> CLIPVisionTTRegModelOutput:
        # the parent's forward would drop `test_time_registers`: same composition, one more field
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


class CLIPTTRegModel(WithRegisterTowerMixin, CLIPModel):
    """[`CLIPModel`] whose `vision_model` is a `CLIPVisionTTRegModel`: image embeddings (and zero-shot logits) from the
    CLS token of a tower with test-time registers; `vision_model_output` carries `test_time_registers`. Its
    `CLIPTTRegConfig` saves and reloads the registers (`AutoModel`, `AutoModelForZeroShotImageClassification`)."""

    config: CLIPTTRegConfig
    config_class = CLIPTTRegConfig
    tower_class = CLIPVisionTTRegModel


class CLIPTTRegForImageClassification(WithRegisterTowerMixin, CLIPForImageClassification):
    """[`CLIPForImageClassification`] on a `CLIPVisionTTRegModel`: the head reads the mean of the patch tokens, the
    registers left out; labels and loss as in the parent."""

    config: CLIPTTRegConfig
    config_class = CLIPTTRegConfig
    tower_class = CLIPVisionTTRegModel


# ---- the family's declaration ------------------------------------------------------------------------------------


def clip_image_processor(config: CLIPVisionTTRegConfig) -> CLIPImageProcessor:
    """OpenAI CLIP's preprocessing at the tower's image size: resize the shorter side (bicubic), center-crop, CLIP's
    statistics."""
    side = config.image_size
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def clip_attention(
    block: nn.Module, hidden_states: torch.Tensor, keys_only: bool = False, num_queries: int | None = None, **_
) -> torch.Tensor:
    """CLIP's (and SigLIP's) encoder layer: pre-norm ``layer_norm1``, ``self_attn`` with ``q_proj`` / ``k_proj``."""
    attention, normed = block.self_attn, block.layer_norm1(hidden_states)
    if keys_only:
        return attention.k_proj(normed)
    queries = attention.q_proj(normed[:, :num_queries])
    return attention_probabilities(queries, attention.k_proj(normed), attention.num_heads, attention.scale)


def clip_planting_sites(model: CLIPVisionModel | CLIPVisionModelWithProjection) -> PlantingSites:
    tower = getattr(model, "vision_model", model)  # the projection model keeps the tower inside
    blocks = block_sites(tower.encoder.layers, lambda block: block.self_attn)
    embeddings = tower.embeddings
    return PlantingSites(
        embeddings.patch_embedding,
        blocks,
        model.config.num_attention_heads,
        (embeddings.class_embedding,),
        embeddings.position_embedding.weight,
    )


CLIP_VITL14_336_ARCH = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768,
)  # fmt: skip

FAMILIES = (
    Family(
        name="clip",
        model_classes=(
            CLIPVisionTTRegModel,
            CLIPVisionTTRegModelWithProjection,
            CLIPTTRegModel,
            CLIPTTRegForImageClassification,
        ),
        auto_classes=(
            ("AutoModel", CLIPVisionTTRegModel),
            ("AutoModel", CLIPTTRegModel),
            ("AutoModelForZeroShotImageClassification", CLIPTTRegModel),
            ("AutoModelForImageClassification", CLIPTTRegForImageClassification),
        ),
        checkpoint_model_types=("clip", "clip_vision_model"),
        attention_reader=clip_attention,
        planting_sites=clip_planting_sites,
        default_image_processor=clip_image_processor,
        licences={"openai/clip-vit-": "mit", "laion/CLIP-ViT-": "mit"},
        checkpoints=(
            transformers_checkpoint(
                "clip_vitl14_336",
                "OpenAI CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower, with a test-time register (no shipped index: pass one).",
                CLIPVisionTTRegModel,
                "openai/clip-vit-large-patch14-336",
                CLIP_VITL14_336_ARCH,
            ),
        ),
    ),
)

register_auto_classes(*FAMILIES)
