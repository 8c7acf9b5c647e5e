from .clip import CLIPTTRegConfig, CLIPVisionTTRegConfig
from .dinov2 import Dinov2TTRegConfig
from .dinov3 import DINOv3ViTTTRegConfig
from .registers import TestTimeRegisterConfig, TestTimeRegisterConfigMixin
from .vit import DeiTTTRegConfig, ViTTTRegConfig

__all__ = [
    "CLIPTTRegConfig",
    "CLIPVisionTTRegConfig",
    "DeiTTTRegConfig",
    "DINOv3ViTTTRegConfig",
    "Dinov2TTRegConfig",
    "TestTimeRegisterConfig",
    "TestTimeRegisterConfigMixin",
    "ViTTTRegConfig",
]
