"""DINOv3 ViT with test-time registers: configuration."""

from huggingface_hub.dataclasses import strict
from transformers import DINOv3ViTConfig

from .registers import TestTimeRegisterConfigMixin


@strict
class DINOv3ViTTTRegConfig(TestTimeRegisterConfigMixin, DINOv3ViTConfig):
    r"""
    [`DINOv3ViTConfig`] plus the test-time-register fields of [`TestTimeRegisterConfigMixin`].

    Example:

    ```python
    >>> from ttreg_hf import DINOv3ViTTTRegConfig, DINOv3ViTTTRegModel
    >>> config = DINOv3ViTTTRegConfig(num_register_tokens=4, register_neurons={6: [300, 12]})
    >>> model = DINOv3ViTTTRegModel(config)
    ```"""

    # `mlp_width` is `intermediate_size`, the gated MLP's too: the edit sits after the gating
    model_type = "dinov3_vit_tt_reg"
