"""CLIP vision towers with test-time registers: configurations for the `transformers` and the OpenCLIP towers."""

from dataclasses import dataclass, fields

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


@strict
@dataclass
class OpenCLIPVisionTTRegConfig(TestTimeRegisterConfigMixin):
    r"""
    The test-time-register settings of an OpenCLIP `VisionTransformer`, which has no config of its own.

    num_hidden_layers (`int`, *optional*, defaults to 12):
        Number of residual attention blocks (``visual.transformer.layers``).
    mlp_width (`int`, *optional*, defaults to 3072):
        Number of neurons in each MLP hidden layer (``c_fc.out_features``). The defaults are ViT-B/16's.
    """

    num_hidden_layers: int = 12
    mlp_width: int = 3072


REGISTER_SETTINGS = tuple(field.name for field in fields(TestTimeRegisterConfigMixin))


def pop_register_settings(kwargs: dict) -> dict:
    """The test-time-register fields (`REGISTER_SETTINGS`) among ``kwargs``, removed from it."""
    return {name: kwargs.pop(name) for name in REGISTER_SETTINGS if name in kwargs}
