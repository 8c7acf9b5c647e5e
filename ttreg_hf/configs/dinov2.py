"""DINOv2 with test-time registers: configuration."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import Dinov2Config

from .registers import TestTimeRegisterConfigMixin

PositionInterpolation = Literal["transformers", "upstream"]


@strict
class Dinov2TTRegConfig(TestTimeRegisterConfigMixin, Dinov2Config):
    r"""
    [`Dinov2Config`] plus the test-time-register fields of [`TestTimeRegisterConfigMixin`], and:

    position_interpolation (`str`, *optional*, defaults to `"transformers"`):
        How the position table is resized for images of another size. `"transformers"`: as [`Dinov2Model`] does
        (bicubic to the patch grid's size). `"upstream"`: as facebookresearch/dinov2 does (bicubic by the scale
        factors (patches + 0.1) / table side, the table unchanged only for square images of its own patch count),
        which the upstream torch.hub models, their heads and the papers' numbers use. The two agree at the table's
        own size and differ elsewhere (by up to 0.1 in DINOv2 ViT-S/14 features at 224 px). The torch.hub models of
        this package use `"upstream"`.

    Example:

    ```python
    >>> from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel
    >>> config = Dinov2TTRegConfig(register_neurons={17: [884, 133]}, num_test_time_registers=1)
    >>> model = Dinov2TTRegModel(config)
    ```"""

    model_type = "dinov2_tt_reg"

    position_interpolation: PositionInterpolation = "transformers"  # `@strict` refuses any other value

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """Refuses a DINOv2-with-registers checkpoint: this model has no place for its trained ``register_tokens``."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "dinov2_with_registers":
            raise ValueError(
                f"{config_dict.get('_name_or_path') or 'This checkpoint'} is a DINOv2 with trained registers "
                "(Dinov2WithRegisters): a Dinov2TTReg class would drop its `embeddings.register_tokens`. Load it with "
                "`transformers.Dinov2WithRegistersModel`, which has registers already, or give test-time registers to "
                "a DINOv2 trained without them (facebook/dinov2-small, -base, -large, -giant)."
            )
        return config_dict, kwargs

    @property
    def mlp_width(self) -> int:
        width = int(self.hidden_size * self.mlp_ratio)
        # Dinov2SwiGLUFFN keeps two thirds of the width, rounded up to a multiple of 8
        return (int(width * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else width
