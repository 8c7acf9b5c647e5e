from .clip import CLIPVisionTTRegConfig, OpenCLIPVisionTTRegConfig
from .dinov2 import Dinov2TTRegConfig
from .dinov3 import DINOv3ViTTTRegConfig
from .registers import TestTimeRegisterConfigMixin
from .timm import TimmTTRegConfig
from .vit import DeiTTTRegConfig, ViTTTRegConfig

__all__ = [
    "CLIPVisionTTRegConfig",
    "DeiTTTRegConfig",
    "DINOv3ViTTTRegConfig",
    "Dinov2TTRegConfig",
    "OpenCLIPVisionTTRegConfig",
    "TestTimeRegisterConfigMixin",
    "TimmTTRegConfig",
    "ViTTTRegConfig",
]
