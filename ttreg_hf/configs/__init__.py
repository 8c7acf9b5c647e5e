from .clip import CLIPVisionTTRegConfig, OpenCLIPVisionTTRegConfig
from .dinov2 import Dinov2TTRegConfig
from .registers import TestTimeRegisterConfigMixin
from .timm import TimmTTRegConfig

__all__ = [
    "CLIPVisionTTRegConfig",
    "Dinov2TTRegConfig",
    "OpenCLIPVisionTTRegConfig",
    "TestTimeRegisterConfigMixin",
    "TimmTTRegConfig",
]
