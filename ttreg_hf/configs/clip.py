"""CLIP with test-time registers: the configurations of the `transformers` vision tower and of the whole model."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from .registers import TestTimeRegisterCompositeConfigMixin, TestTimeRegisterConfigMixin


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


@strict
class CLIPTTRegConfig(TestTimeRegisterCompositeConfigMixin, CLIPConfig):
    r"""
    [`CLIPConfig`] whose `vision_config` is a [`CLIPVisionTTRegConfig`], which holds the test-time-register settings:
    the configuration of [`CLIPTTRegModel`] and [`CLIPTTRegForImageClassification`]. A `CLIPVisionConfig` (or its
    dict) is converted.

    Example:

    ```python
    >>> from ttreg_hf import CLIPTTRegConfig, CLIPTTRegModel
    >>> config = CLIPTTRegConfig(vision_config={"register_neurons": {5: [599, 1869]}})
    >>> model = CLIPTTRegModel(config)
    ```"""

    model_type = "clip_tt_reg"
    sub_configs_defaults = {"vision_config": CLIPVisionTTRegConfig, "text_config": CLIPTextConfig}
