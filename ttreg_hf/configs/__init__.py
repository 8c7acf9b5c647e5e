from .clip import CLIPVisionTTRegConfig
from .dinov2 import Dinov2TTRegConfig
from .registers import TestTimeRegisterConfig, TestTimeRegisterConfigMixin

__all__ = ["CLIPVisionTTRegConfig", "Dinov2TTRegConfig", "TestTimeRegisterConfig", "TestTimeRegisterConfigMixin"]
