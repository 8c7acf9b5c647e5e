"""ViT and DeiT with test-time registers: configurations."""

from huggingface_hub.dataclasses import strict
from transformers import DeiTConfig, ViTConfig

from .registers import TestTimeRegisterConfigMixin


@strict
class ViTTTRegConfig(TestTimeRegisterConfigMixin, ViTConfig):
    r"""
    [`ViTConfig`] plus the test-time-register fields of [`TestTimeRegisterConfigMixin`].

    Example:

    ```python
    >>> from ttreg_hf import ViTTTRegConfig, ViTTTRegModel
    >>> config = ViTTTRegConfig(register_neurons={8: [1200, 77]}, num_test_time_registers=1)
    >>> model = ViTTTRegModel(config)
    ```"""

    model_type = "vit_tt_reg"


@strict
class DeiTTTRegConfig(TestTimeRegisterConfigMixin, DeiTConfig):
    r"""
    [`DeiTConfig`] plus the test-time-register fields of [`TestTimeRegisterConfigMixin`].

    Example:

    ```python
    >>> from ttreg_hf import DeiTTTRegConfig, DeiTTTRegModel
    >>> config = DeiTTTRegConfig(register_neurons={8: [1200, 77]}, num_test_time_registers=1)
    >>> model = DeiTTTRegModel(config)
    ```"""

    model_type = "deit_tt_reg"
