"""DINOv2 with test-time registers: configuration."""

from huggingface_hub.dataclasses import strict
from transformers import Dinov2Config

from .registers import TestTimeRegisterConfigMixin


@strict
class Dinov2TTRegConfig(TestTimeRegisterConfigMixin, Dinov2Config):
    r"""
    [`Dinov2Config`] plus the test-time-register fields of [`TestTimeRegisterConfigMixin`].

    Example:

    ```python
    >>> from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel
    >>> config = Dinov2TTRegConfig(register_neurons={17: [884, 133]}, num_test_time_registers=1)
    >>> model = Dinov2TTRegModel(config)
    ```"""

    model_type = "dinov2_tt_reg"

    @property
    def mlp_width(self) -> int:
        width = int(self.hidden_size * self.mlp_ratio)
        # Dinov2SwiGLUFFN keeps two thirds of the width, rounded up to a multiple of 8
        return (int(width * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else width
