"""SigLIP and SigLIP2 vision towers with test-time registers: the parent does the work; these classes add the
registers, the edit, and the choice of whether the attention-pooling head sees the registers.

SigLIP has no CLS token (``num_prefix_tokens = 0``): the registers follow the patches, and `head` (multihead attention
pooling, MAP) pools the final sequence. SigLIP2's variable-resolution (NaFlex) batches are padded: the registers follow
the padded patch sequence, the attention mask is extended so every token attends to them, and the edit is given the
mask so that padding feeds neither the register value nor the patch statistics.
"""

import torch
from torch import nn
from transformers import (
    Siglip2ForImageClassification,
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2VisionModel,
    SiglipForImageClassification,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionModel,
)
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

from ..configs.siglip import Siglip2TTRegConfig, Siglip2VisionTTRegConfig, SiglipTTRegConfig, SiglipVisionTTRegConfig
from ..errors import TTRegValueError
from ..family import Family, register_auto_classes, transformers_checkpoint
from .attention import attention_probabilities
from .clip import clip_attention
from .layout import TokenLayout
from .registers import (
    EditAfterActivationMixin,
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    TestTimeRegisterModelOutput,
    WithRegisterTowerMixin,
    check_image_size,
    check_pixel_values,
)
from .sites import PlantingSites, block_sites


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
    """`Siglip2EncoderLayer` whose MLP gets the batch's token mask (``register_token_mask``, real tokens and
    registers) as an argument, for its edit. The parent's forward, which calls ``self.mlp(hidden_states)`` with
    nothing else, with that one call changed; gradient checkpointing recomputes the layer from its arguments."""

    mlp: Siglip2TTRegMLP

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        register_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.layer_norm2(hidden_states), register_token_mask)


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
    register_modules: tuple[type[nn.Module], ...]  # embeddings, MLP, pooling head (and SigLIP2's encoder layer)

    @property
    def register_seams(self) -> RegisterSeams:
        """The head, when the model has one, reads the layout (and ``pool_registers`` from the config)."""
        readers = ("head",) if self.use_head else ()
        return RegisterSeams("embeddings", "encoder.layers", "mlp", readers, self.register_modules)

    def adopt_register_modules(self) -> None:
        super().adopt_register_modules()
        if self.use_head:
            self.head.config = self.config


class SiglipVisionTTRegModel(_SiglipTTRegMixin, SiglipVisionModel):
    """[`SiglipVisionModel`] with test-time registers: same weights, same output shapes, registers in their own field.

    Loads any SigLIP checkpoint (full `SiglipModel` ones included) with `from_pretrained`. `pooler_output` is the
    MAP head's, over the patches and (with ``pool_registers``, the default) the registers.
    """

    config: SiglipVisionTTRegConfig
    config_class = SiglipVisionTTRegConfig
    _no_split_modules = [*SiglipVisionModel._no_split_modules, "SiglipVisionTTRegEmbeddings", "SiglipTTRegPoolingHead"]
    register_modules = (SiglipVisionTTRegEmbeddings, SiglipTTRegMLP, SiglipTTRegPoolingHead)

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = False, **kwargs
    ) -> TestTimeRegisterModelOutput:
        outputs = super().forward(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)


def check_spatial_shapes(
    pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None, spatial_shapes: torch.Tensor
) -> None:
    """Refuse NaFlex inputs whose ``spatial_shapes`` (rows, columns of each image) disagree with the batch or the
    mask, which the parent silently mangles: each image's rows x columns patches come first, then padding. Eager
    only (it reads values; under `torch.compile` it is skipped, as nothing can be refused there without a sync)."""
    if torch.compiler.is_compiling():
        return
    batch, length = pixel_values.shape[:2]
    if (
        not isinstance(spatial_shapes, torch.Tensor)
        or spatial_shapes.shape != (batch, 2)
        or spatial_shapes.is_floating_point()
    ):
        got = tuple(spatial_shapes.shape) if isinstance(spatial_shapes, torch.Tensor) else type(spatial_shapes)
        raise TTRegValueError(
            f"spatial_shapes must be an integer tensor of shape (batch, 2) = ({batch}, 2), each image's patch rows and "
            f"columns, got {got}; pass the image processor's outputs together."
        )
    shapes = spatial_shapes.tolist()
    for image, (rows, columns) in enumerate(shapes):
        if rows < 1 or columns < 1 or rows * columns > length:
            raise TTRegValueError(
                f"spatial_shapes says image {image} is {rows}x{columns} patches, which does not fit the "
                f"{length} patches of pixel_values; pass the image processor's outputs together."
            )
    counts = spatial_shapes.prod(dim=-1, keepdim=True)
    expected = torch.arange(length, device=counts.device) < counts  # the real patches' places
    mask = torch.ones_like(expected) if pixel_attention_mask is None else pixel_attention_mask.to(expected.device)
    wrong = ((mask == 1) != expected) | ((mask != 0) & (mask != 1))
    if bool(wrong.any()):
        image = int(wrong.any(dim=-1).nonzero()[0, 0])
        rows, columns = shapes[image]
        found = (
            "no pixel_attention_mask marks the rest as padding"
            if pixel_attention_mask is None
            else f"its pixel_attention_mask marks {int((mask[image] == 1).sum())} real patches (1) and "
            f"{int((mask[image] == 0).sum())} padding (0) of {length}, where the first {rows * columns} must be real "
            "and the rest padding"
        )
        raise TTRegValueError(
            f"spatial_shapes says image {image} is {rows}x{columns} = {rows * columns} patches, but {found}: pass the "
            "image processor's outputs (pixel_values, pixel_attention_mask, spatial_shapes) together."
        )


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
    register_modules = (
        Siglip2VisionTTRegEmbeddings,
        Siglip2TTRegEncoderLayer,
        Siglip2TTRegMLP,
        Siglip2TTRegPoolingHead,
    )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None,
        spatial_shapes: torch.LongTensor,
        **kwargs,
    ) -> TestTimeRegisterModelOutput:
        if pixel_attention_mask is not None and pixel_attention_mask.shape != pixel_values.shape[:2]:
            raise TTRegValueError(
                f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}, pixel_values "
                f"{tuple(pixel_values.shape)}: the mask needs one entry per patch, (batch, max_num_patches); pass the "
                "image processor's outputs together."
            )
        check_spatial_shapes(pixel_values, pixel_attention_mask, spatial_shapes)
        token_mask = self.token_layout.append_registers_to_mask(pixel_attention_mask)
        outputs = super().forward(
            pixel_values, token_mask, spatial_shapes, register_token_mask=token_mask, return_dict=True, **kwargs
        )
        return self.strip_test_time_registers(outputs, TestTimeRegisterModelOutput)


class SiglipTTRegModel(WithRegisterTowerMixin, SiglipModel):
    """[`SiglipModel`] whose `vision_model` is a `SiglipVisionTTRegModel`: image embeddings (and zero-shot logits) from
    its attention-pooling head (``pool_registers`` as configured); `vision_model_output` carries
    `test_time_registers`. Its `SiglipTTRegConfig` saves and reloads the registers."""

    config: SiglipTTRegConfig
    config_class = SiglipTTRegConfig
    tower_class = SiglipVisionTTRegModel


class SiglipTTRegForImageClassification(WithRegisterTowerMixin, SiglipForImageClassification):
    """[`SiglipForImageClassification`] on a `SiglipVisionTTRegModel`: the head reads the mean of the patch tokens, the
    registers left out; labels and loss as in the parent."""

    config: SiglipTTRegConfig
    config_class = SiglipTTRegConfig
    tower_class = SiglipVisionTTRegModel


class Siglip2TTRegModel(WithRegisterTowerMixin, Siglip2Model):
    """[`Siglip2Model`] whose `vision_model` is a `Siglip2VisionTTRegModel` (NaFlex inputs, see there)."""

    config: Siglip2TTRegConfig
    config_class = Siglip2TTRegConfig
    tower_class = Siglip2VisionTTRegModel


class Siglip2TTRegForImageClassification(WithRegisterTowerMixin, Siglip2ForImageClassification):
    """[`Siglip2ForImageClassification`] on a `Siglip2VisionTTRegModel`: the head reads the mean of the real patch
    tokens (``pixel_attention_mask``), the registers left out; labels and loss as in the parent."""

    config: Siglip2TTRegConfig
    config_class = Siglip2TTRegConfig
    tower_class = Siglip2VisionTTRegModel


# ---- the families' declarations ----------------------------------------------------------------------------------


def siglip_image_processor(config: SiglipVisionTTRegConfig) -> SiglipImageProcessor:
    """SigLIP's preprocessing: resize to the tower's square size (bicubic), mean and std 0.5."""
    return SiglipImageProcessor(size={"height": config.image_size, "width": config.image_size})


def siglip2_image_processor(config: Siglip2VisionTTRegConfig) -> Siglip2ImageProcessor:
    """SigLIP2's NaFlex preprocessing: each image resized to at most ``num_patches`` patches, aspect ratio kept,
    patchified and padded, with the mask and the patch grid of every image."""
    return Siglip2ImageProcessor(patch_size=config.patch_size, max_num_patches=config.num_patches)


def siglip2_attention(
    block: nn.Module,
    hidden_states: torch.Tensor,
    register_token_mask: torch.Tensor | None = None,
    keys_only: bool = False,
    num_queries: int | None = None,
    **_,
) -> torch.Tensor:
    """As `clip_attention`, with the padding keys masked as the layer's attention masks them."""
    attention, normed = block.self_attn, block.layer_norm1(hidden_states)
    keys = attention.k_proj(normed)
    if keys_only:
        return keys
    queries = attention.q_proj(normed[:, :num_queries])
    return attention_probabilities(queries, keys, attention.num_heads, attention.scale, register_token_mask)


def siglip_planting_sites(model: SiglipVisionModel | Siglip2VisionModel) -> PlantingSites:
    blocks = block_sites(model.encoder.layers, lambda block: block.self_attn)
    embeddings = model.embeddings
    heads = model.config.num_attention_heads
    return PlantingSites(embeddings.patch_embedding, blocks, heads, (), embeddings.position_embedding.weight)


SIGLIP_SO400M_ARCH = dict(  # LLaVA-OneVision's vision tower
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
SIGLIP2_B16_NAFLEX_ARCH = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_patches=256,
    patch_size=16,
)

FAMILIES = (
    Family(
        name="siglip",
        model_classes=(SiglipVisionTTRegModel, SiglipTTRegModel, SiglipTTRegForImageClassification),
        auto_classes=(
            ("AutoModel", SiglipVisionTTRegModel),
            ("AutoModel", SiglipTTRegModel),
            ("AutoModelForZeroShotImageClassification", SiglipTTRegModel),
            ("AutoModelForImageClassification", SiglipTTRegForImageClassification),
        ),
        checkpoint_model_types=("siglip", "siglip_vision_model"),
        attention_reader=clip_attention,
        planting_sites=siglip_planting_sites,
        default_image_processor=siglip_image_processor,
        checkpoints=(
            transformers_checkpoint(
                "siglip_so400m_patch14_384",
                "SigLIP So400m/14 at 384 px, LLaVA-OneVision's tower, with a test-time register (no shipped index: pass one).",
                SiglipVisionTTRegModel,
                "google/siglip-so400m-patch14-384",
                SIGLIP_SO400M_ARCH,
            ),
        ),
    ),
    Family(
        name="siglip2",
        model_classes=(Siglip2VisionTTRegModel, Siglip2TTRegModel, Siglip2TTRegForImageClassification),
        auto_classes=(
            ("AutoModel", Siglip2VisionTTRegModel),
            ("AutoModel", Siglip2TTRegModel),
            ("AutoModelForZeroShotImageClassification", Siglip2TTRegModel),
            ("AutoModelForImageClassification", Siglip2TTRegForImageClassification),
        ),
        checkpoint_model_types=("siglip2", "siglip2_vision_model"),
        attention_reader=siglip2_attention,
        planting_sites=siglip_planting_sites,
        default_image_processor=siglip2_image_processor,
        padding_mask="pixel_attention_mask",
        checkpoints=(
            transformers_checkpoint(
                "siglip2_base_patch16_naflex",
                "SigLIP2 B/16 NaFlex (variable resolution) with a test-time register (no shipped index: pass one).",
                Siglip2VisionTTRegModel,
                "google/siglip2-base-patch16-naflex",
                SIGLIP2_B16_NAFLEX_ARCH,
            ),
        ),
    ),
)

register_auto_classes(*FAMILIES)
