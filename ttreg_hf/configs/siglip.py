"""SigLIP and SigLIP2 with test-time registers: configurations of the vision towers and of the whole models."""

from huggingface_hub.dataclasses import strict
from transformers import (
    Siglip2Config,
    Siglip2TextConfig,
    Siglip2VisionConfig,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from .registers import TestTimeRegisterCompositeConfigMixin, TestTimeRegisterConfigMixin


@strict
class SiglipVisionTTRegConfig(TestTimeRegisterConfigMixin, SiglipVisionConfig):
    r"""
    [`SiglipVisionConfig`] plus the test-time-register fields of [`TestTimeRegisterConfigMixin`] and:

    pool_registers (`bool`, *optional*, defaults to `True`):
        Whether the attention-pooling head (`head`) attends over the test-time registers as well as the patches.
        The default keeps `pooler_output` closest to the unedited model's: the head's probe attends to the outlier
        tokens, which the edit moves onto the registers (`benchmarks/siglip_pooling.py` measures it).

    Example:

    ```python
    >>> from ttreg_hf import SiglipVisionTTRegConfig, SiglipVisionTTRegModel
    >>> config = SiglipVisionTTRegConfig(register_neurons={10: [42, 7]}, num_test_time_registers=1)
    >>> model = SiglipVisionTTRegModel(config)
    ```"""

    model_type = "siglip_vision_tt_reg"
    pool_registers: bool = True


@strict
class Siglip2VisionTTRegConfig(TestTimeRegisterConfigMixin, Siglip2VisionConfig):
    r"""
    [`Siglip2VisionConfig`] plus the test-time-register fields of [`TestTimeRegisterConfigMixin`] and `pool_registers`
    (see [`SiglipVisionTTRegConfig`]).
    """

    model_type = "siglip2_vision_tt_reg"
    pool_registers: bool = True


@strict
class SiglipTTRegConfig(TestTimeRegisterCompositeConfigMixin, SiglipConfig):
    r"""
    [`SiglipConfig`] whose `vision_config` is a [`SiglipVisionTTRegConfig`], which holds the test-time-register
    settings: the configuration of [`SiglipTTRegModel`] and [`SiglipTTRegForImageClassification`].
    """

    model_type = "siglip_tt_reg"
    sub_configs_defaults = {"vision_config": SiglipVisionTTRegConfig, "text_config": SiglipTextConfig}


@strict
class Siglip2TTRegConfig(TestTimeRegisterCompositeConfigMixin, Siglip2Config):
    r"""
    [`Siglip2Config`] whose `vision_config` is a [`Siglip2VisionTTRegConfig`], which holds the test-time-register
    settings: the configuration of [`Siglip2TTRegModel`] and [`Siglip2TTRegForImageClassification`].
    """

    model_type = "siglip2_tt_reg"
    sub_configs_defaults = {"vision_config": Siglip2VisionTTRegConfig, "text_config": Siglip2TextConfig}
