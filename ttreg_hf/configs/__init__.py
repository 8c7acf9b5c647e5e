from .clip import CLIPVisionTTRegConfig, OpenCLIPVisionTTRegConfig
from .dinov2 import Dinov2TTRegConfig
from .registers import TestTimeRegisterConfigMixin

__all__ = ["CLIPVisionTTRegConfig", "Dinov2TTRegConfig", "OpenCLIPVisionTTRegConfig", "TestTimeRegisterConfigMixin"]
