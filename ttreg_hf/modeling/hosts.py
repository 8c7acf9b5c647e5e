"""The models built around one of our towers whose saved folders load with plain `transformers`: VLMs (LLaVA,
LLaVA-NeXT, LLaVA-OneVision) and depth and segmentation models on a backbone (DPT, Depth Anything, ZoeDepth,
Mask2Former), with the tower of any family (`WithRegisterTowerHostMixin`). `to_test_time_registers` and `load_vlm`
make a loaded host one of these in place; each family's remote code holds those its tower can stand in, in two files
of their own that a saved host carries beside the family's two (a tower's save carries the family's only), so a saved
host loads through its Auto class (``trust_remote_code=True``) where ttreg_hf is not installed.

`HOSTS` declares them: each class and the Auto classes that build it, as a family declares its classes."""

from transformers import (
    DepthAnythingForDepthEstimation,
    DPTForDepthEstimation,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerModel,
    ZoeDepthForDepthEstimation,
)

from ..configs.hosts import (
    DepthAnythingTTRegConfig,
    DPTTTRegConfig,
    LlavaNextTTRegConfig,
    LlavaOnevisionTTRegConfig,
    LlavaTTRegConfig,
    Mask2FormerTTRegConfig,
    ZoeDepthTTRegConfig,
)
from ..family import Family, register_auto_classes
from .registers import WithRegisterTowerHostMixin


class LlavaTTRegForConditionalGeneration(WithRegisterTowerHostMixin, LlavaForConditionalGeneration):
    config_class = LlavaTTRegConfig


class LlavaNextTTRegForConditionalGeneration(WithRegisterTowerHostMixin, LlavaNextForConditionalGeneration):
    config_class = LlavaNextTTRegConfig


class LlavaOnevisionTTRegForConditionalGeneration(WithRegisterTowerHostMixin, LlavaOnevisionForConditionalGeneration):
    config_class = LlavaOnevisionTTRegConfig


class DPTTTRegForDepthEstimation(WithRegisterTowerHostMixin, DPTForDepthEstimation):
    config_class = DPTTTRegConfig


class DepthAnythingTTRegForDepthEstimation(WithRegisterTowerHostMixin, DepthAnythingForDepthEstimation):
    config_class = DepthAnythingTTRegConfig


class ZoeDepthTTRegForDepthEstimation(WithRegisterTowerHostMixin, ZoeDepthForDepthEstimation):
    config_class = ZoeDepthTTRegConfig


class Mask2FormerTTRegModel(WithRegisterTowerHostMixin, Mask2FormerModel):
    config_class = Mask2FormerTTRegConfig


class Mask2FormerTTRegForUniversalSegmentation(WithRegisterTowerHostMixin, Mask2FormerForUniversalSegmentation):
    config_class = Mask2FormerTTRegConfig


HOSTS = Family(
    name="hosts",
    model_classes=(
        LlavaTTRegForConditionalGeneration,
        LlavaNextTTRegForConditionalGeneration,
        LlavaOnevisionTTRegForConditionalGeneration,
        DPTTTRegForDepthEstimation,
        DepthAnythingTTRegForDepthEstimation,
        ZoeDepthTTRegForDepthEstimation,
        Mask2FormerTTRegModel,
        Mask2FormerTTRegForUniversalSegmentation,
    ),
    auto_classes=(
        ("AutoModelForImageTextToText", LlavaTTRegForConditionalGeneration),
        ("AutoModelForImageTextToText", LlavaNextTTRegForConditionalGeneration),
        ("AutoModelForImageTextToText", LlavaOnevisionTTRegForConditionalGeneration),
        ("AutoModelForDepthEstimation", DPTTTRegForDepthEstimation),
        ("AutoModelForDepthEstimation", DepthAnythingTTRegForDepthEstimation),
        ("AutoModelForDepthEstimation", ZoeDepthTTRegForDepthEstimation),
        ("AutoModel", Mask2FormerTTRegModel),
        ("AutoModelForUniversalSegmentation", Mask2FormerTTRegForUniversalSegmentation),
    ),
)

register_auto_classes(HOSTS)
