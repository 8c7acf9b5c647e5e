"""Test-time registers for pretrained Vision Transformers, as drop-in `transformers` and OpenCLIP classes."""

from transformers import AutoConfig, AutoModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configs import Dinov2TTRegConfig, TestTimeRegisterConfigMixin
from .index import RegisterNeuronIndex, RegisterNeuronIndexError, find_shipped_index, load_index, shipped_indices
from .modeling.dinov2 import Dinov2TTRegModel
from .modeling.edit import RegisterNeuronEdit
from .modeling.layout import TokenLayout
from .modeling.registers import PreTrainedTestTimeRegisterMixin, TestTimeRegisterMixin, TestTimeRegisterModelOutput

__version__ = "0.1.0"


def _register(config_class, model_class, parent_class_name: str) -> None:
    """Make `AutoModel` know the class, and let it load the parent's checkpoints (renamed keys included)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    register_checkpoint_conversion_mapping(
        model_class.__name__, get_checkpoint_conversion_mapping(parent_class_name) or [], overwrite=True
    )


_register(Dinov2TTRegConfig, Dinov2TTRegModel, "Dinov2Model")

__all__ = [
    "Dinov2TTRegConfig",
    "Dinov2TTRegModel",
    "RegisterNeuronEdit",
    "RegisterNeuronIndex",
    "RegisterNeuronIndexError",
    "PreTrainedTestTimeRegisterMixin",
    "TestTimeRegisterConfigMixin",
    "TestTimeRegisterMixin",
    "TestTimeRegisterModelOutput",
    "TokenLayout",
    "find_shipped_index",
    "load_index",
    "shipped_indices",
]
