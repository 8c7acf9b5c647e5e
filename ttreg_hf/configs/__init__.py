from .dinov2 import Dinov2TTRegConfig
from .registers import TestTimeRegisterConfigMixin

__all__ = ["Dinov2TTRegConfig", "TestTimeRegisterConfigMixin"]
