"""Test-time registers for pretrained Vision Transformers, as drop-in `transformers`, OpenCLIP and timm classes.

Importing the package, or any module of it, imports its `transformers` families, each of which registers its classes
with the Auto classes as it is defined: after ``import ttreg_hf``, ``AutoModel.from_pretrained`` builds our classes
for our saved folders, and our classes load their parents' checkpoints with every weight. The OpenCLIP and timm
families (optional dependencies) are `ttreg_hf.modeling.open_clip` and `ttreg_hf.modeling.timm`.
"""

from types import ModuleType

from .configs import (
    CLIPTTRegConfig,
    CLIPVisionTTRegConfig,
    DeiTTTRegConfig,
    Dinov2TTRegConfig,
    DINOv3ViTTTRegConfig,
    TestTimeRegisterConfig,
    TestTimeRegisterConfigMixin,
    ViTTTRegConfig,
)
from .configs.hosts import (
    DepthAnythingTTRegConfig,
    DPTTTRegConfig,
    LlavaNextTTRegConfig,
    LlavaOnevisionTTRegConfig,
    LlavaTTRegConfig,
    Mask2FormerTTRegConfig,
    ZoeDepthTTRegConfig,
)
from .configs.siglip import Siglip2TTRegConfig, Siglip2VisionTTRegConfig, SiglipTTRegConfig, SiglipVisionTTRegConfig
from .discovery import DiscoveryResult, find_register_neurons
from .family import Checkpoint, Family
from .hub import load_tt_model
from .index import (
    RegisterIndexMismatchWarning,
    RegisterNeuronIndex,
    RegisterNeuronIndexError,
    find_shipped_index,
    load_index,
    shipped_indices,
)
from .modeling.clip import (
    CLIPTTRegForImageClassification,
    CLIPTTRegModel,
    CLIPVisionTTRegModel,
    CLIPVisionTTRegModelOutput,
    CLIPVisionTTRegModelWithProjection,
)
from .modeling.dinov2 import Dinov2TTRegBackbone, Dinov2TTRegForImageClassification, Dinov2TTRegModel
from .modeling.dinov3 import DINOv3ViTTTRegBackbone, DINOv3ViTTTRegModel
from .modeling.edit import RegisterNeuronEdit
from .modeling.hosts import (
    DepthAnythingTTRegForDepthEstimation,
    DPTTTRegForDepthEstimation,
    LlavaNextTTRegForConditionalGeneration,
    LlavaOnevisionTTRegForConditionalGeneration,
    LlavaTTRegForConditionalGeneration,
    Mask2FormerTTRegForUniversalSegmentation,
    Mask2FormerTTRegModel,
    ZoeDepthTTRegForDepthEstimation,
)
from .modeling.layout import TokenLayout
from .modeling.registers import (
    EditAfterActivationMixin,
    KeywordRegisterSettingsMixin,
    PreTrainedTestTimeRegisterMixin,
    RegisterAppender,
    RegisterEditOffWarning,
    RegisterSeams,
    StripRegistersMixin,
    TestTimeRegisterLoadingMixin,
    TestTimeRegisterMixin,
    TestTimeRegisterModelOutput,
    WithRegisterTowerMixin,
    adopt,
    check_pixel_values,
    vision_tower_with_registers,
)
from .modeling.siglip import (
    Siglip2TTRegForImageClassification,
    Siglip2TTRegModel,
    Siglip2VisionTTRegModel,
    SiglipTTRegForImageClassification,
    SiglipTTRegModel,
    SiglipVisionTTRegModel,
)
from .modeling.vit import (
    DeiTTTRegForImageClassification,
    DeiTTTRegForImageClassificationWithTeacher,
    DeiTTTRegForMaskedImageModeling,
    DeiTTTRegModel,
    ViTTTRegForImageClassification,
    ViTTTRegForMaskedImageModeling,
    ViTTTRegModel,
)
from .modeling.vlm import load_vlm, to_test_time_registers
from .registry import families, family_of, register_checkpoint, register_family
from .version import __version__

__all__ = sorted(name for name, value in globals().items() if not (name[0] == "_" or isinstance(value, ModuleType)))
