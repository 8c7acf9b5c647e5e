"""CLIP vision towers with test-time registers: the configuration of the `transformers` tower."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig

from .registers import TestTimeRegisterConfigMixin


@strict
class CLIPVisionTTRegConfig(TestTimeRegisterConfigMixin, CLIPVisionConfig):
    r"""
    [`CLIPVisionConfig`] plus the test-time-register fields of [`TestTimeRegisterConfigMixin`].

    Example:

    ```python
    >>> from ttreg_hf import CLIPVisionTTRegConfig, CLIPVisionTTRegModel
    >>> config = CLIPVisionTTRegConfig(register_neurons={5: [599, 1869]}, num_test_time_registers=1)
    >>> model = CLIPVisionTTRegModel(config)
    ```"""

    model_type = "clip_vision_tt_reg"

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size
