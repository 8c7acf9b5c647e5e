"""The configs of the models built around one of our towers (VLMs, depth and segmentation models): the host's config
with its ``vision_config`` or ``backbone_config`` one of ours, whatever the family (`TestTimeRegisterHostConfigMixin`).
Each keeps its host's fields; its ``model_type`` (the host's, ``_tt_reg`` added) is what the Auto classes and the
remote code read."""

from huggingface_hub.dataclasses import strict
from transformers import (
    DepthAnythingConfig,
    DPTConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    Mask2FormerConfig,
    ZoeDepthConfig,
)

from .registers import TestTimeRegisterHostConfigMixin


@strict
class LlavaTTRegConfig(TestTimeRegisterHostConfigMixin, LlavaConfig):
    """[`LlavaConfig`] whose `vision_config` is one of ours (e.g. a [`CLIPVisionTTRegConfig`])."""

    model_type = "llava_tt_reg"


@strict
class LlavaNextTTRegConfig(TestTimeRegisterHostConfigMixin, LlavaNextConfig):
    """[`LlavaNextConfig`] whose `vision_config` is one of ours."""

    model_type = "llava_next_tt_reg"


@strict
class LlavaOnevisionTTRegConfig(TestTimeRegisterHostConfigMixin, LlavaOnevisionConfig):
    """[`LlavaOnevisionConfig`] whose `vision_config` is one of ours (e.g. a [`SiglipVisionTTRegConfig`])."""

    model_type = "llava_onevision_tt_reg"


@strict
class DPTTTRegConfig(TestTimeRegisterHostConfigMixin, DPTConfig):
    """[`DPTConfig`] whose `backbone_config` is one of ours (e.g. a [`Dinov2TTRegConfig`])."""

    model_type = "dpt_tt_reg"


@strict
class DepthAnythingTTRegConfig(TestTimeRegisterHostConfigMixin, DepthAnythingConfig):
    """[`DepthAnythingConfig`] whose `backbone_config` is one of ours."""

    model_type = "depth_anything_tt_reg"


@strict
class ZoeDepthTTRegConfig(TestTimeRegisterHostConfigMixin, ZoeDepthConfig):
    """[`ZoeDepthConfig`] whose `backbone_config` is one of ours."""

    model_type = "zoedepth_tt_reg"


@strict
class Mask2FormerTTRegConfig(TestTimeRegisterHostConfigMixin, Mask2FormerConfig):
    """[`Mask2FormerConfig`] whose `backbone_config` is one of ours."""

    model_type = "mask2former_tt_reg"
