"""Test-time registers for pretrained Vision Transformers, as drop-in `transformers` and OpenCLIP classes."""

from transformers import AutoConfig, AutoModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configs import (
    CLIPVisionTTRegConfig,
    DeiTTTRegConfig,
    DINOv3ViTTTRegConfig,
    Dinov2TTRegConfig,
    TestTimeRegisterConfig,
    TestTimeRegisterConfigMixin,
    ViTTTRegConfig,
)
from .configs.siglip import Siglip2VisionTTRegConfig, SiglipVisionTTRegConfig
from .discovery import DiscoveryResult, find_register_neurons
from .index import RegisterNeuronIndex, RegisterNeuronIndexError, find_shipped_index, load_index, shipped_indices
from .modeling.clip import CLIPVisionTTRegModel, CLIPVisionTTRegModelOutput, CLIPVisionTTRegModelWithProjection
from .modeling.dinov2 import Dinov2TTRegModel
from .modeling.dinov3 import DINOv3ViTTTRegModel
from .modeling.edit import RegisterNeuronEdit
from .modeling.layout import TokenLayout
from .modeling.registers import (
    PreTrainedTestTimeRegisterMixin,
    RegisterSeams,
    TestTimeRegisterMixin,
    TestTimeRegisterModelOutput,
    adopt,
    check_pixel_values,
)
from .modeling.siglip import Siglip2VisionTTRegModel, SiglipVisionTTRegModel
from .modeling.vit import DeiTTTRegModel, ViTTTRegModel

__version__ = "0.1.0"


def _load_parent_checkpoints(model_class, parent_class_name: str) -> None:
    """Give the class its parent's checkpoint key conversions (`transformers` looks them up by class name)."""
    register_checkpoint_conversion_mapping(
        model_class.__name__, get_checkpoint_conversion_mapping(parent_class_name) or [], overwrite=True
    )


def _register(config_class, model_class, parent_class_name: str) -> None:
    """Make `AutoConfig` / `AutoModel` know the class, and let it load the parent's checkpoints."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    _load_parent_checkpoints(model_class, parent_class_name)


_register(Dinov2TTRegConfig, Dinov2TTRegModel, "Dinov2Model")
_register(CLIPVisionTTRegConfig, CLIPVisionTTRegModel, "CLIPVisionModel")
_load_parent_checkpoints(CLIPVisionTTRegModelWithProjection, "CLIPVisionModelWithProjection")  # AutoModel: the tower
_register(SiglipVisionTTRegConfig, SiglipVisionTTRegModel, "SiglipVisionModel")
_register(Siglip2VisionTTRegConfig, Siglip2VisionTTRegModel, "Siglip2VisionModel")
_register(ViTTTRegConfig, ViTTTRegModel, "ViTModel")
_register(DeiTTTRegConfig, DeiTTTRegModel, "DeiTModel")
_register(DINOv3ViTTTRegConfig, DINOv3ViTTTRegModel, "DINOv3ViTModel")

__all__ = [
    "CLIPVisionTTRegConfig",
    "CLIPVisionTTRegModel",
    "CLIPVisionTTRegModelOutput",
    "CLIPVisionTTRegModelWithProjection",
    "Dinov2TTRegConfig",
    "Dinov2TTRegModel",
    "DeiTTTRegConfig",
    "DeiTTTRegModel",
    "DINOv3ViTTTRegConfig",
    "DINOv3ViTTTRegModel",
    "ViTTTRegConfig",
    "ViTTTRegModel",
    "RegisterNeuronEdit",
    "Siglip2VisionTTRegConfig",
    "Siglip2VisionTTRegModel",
    "SiglipVisionTTRegConfig",
    "SiglipVisionTTRegModel",
    "RegisterNeuronIndex",
    "RegisterNeuronIndexError",
    "PreTrainedTestTimeRegisterMixin",
    "RegisterSeams",
    "TestTimeRegisterConfig",
    "TestTimeRegisterConfigMixin",
    "TestTimeRegisterMixin",
    "TestTimeRegisterModelOutput",
    "TokenLayout",
    "DiscoveryResult",
    "adopt",
    "check_pixel_values",
    "find_register_neurons",
    "find_shipped_index",
    "load_index",
    "shipped_indices",
]
