"""LLaVA-family models whose CLIP vision tower is a `CLIPVisionTTRegModel`, loaded in one call.

The tower is the one `AutoModel` builds for a `CLIPVisionTTRegConfig`: its hidden states come without the
registers, so the language model sees exactly the image tokens the processor inserted, for every
``vision_feature_layer`` and feature-select strategy.
"""

import copy
from pathlib import Path

from transformers import AutoConfig, AutoModelForImageTextToText, CLIPVisionConfig, PreTrainedConfig, PreTrainedModel

from ..configs.clip import CLIPVisionTTRegConfig, pop_register_settings
from ..index import resolve_index
from .clip import CLIPVisionTTRegModel
from .registers import IndexSpec, index_attached_later


def with_test_time_register_tower(config: PreTrainedConfig, **register_settings) -> PreTrainedConfig:
    """A copy of ``config`` (LLaVA, LLaVA-NeXT, ...) with its CLIP ``vision_config`` a `CLIPVisionTTRegConfig`."""
    config = copy.deepcopy(config)
    vision_config = config.vision_config
    if not isinstance(vision_config, CLIPVisionConfig):
        raise TypeError(
            f"Test-time registers plug into CLIP vision towers; this model's tower is {vision_config.model_type!r}."
        )
    config.vision_config = CLIPVisionTTRegConfig.from_dict({**vision_config.to_dict(), **register_settings})
    return config


def vision_tower_with_registers(model: PreTrainedModel) -> CLIPVisionTTRegModel:
    """The `CLIPVisionTTRegModel` inside ``model``, e.g. to call `set_register_neurons` on it."""
    return next(module for module in model.modules() if isinstance(module, CLIPVisionTTRegModel))


def load_llava(
    pretrained_model_name_or_path: str | Path,
    *,
    register_neurons: IndexSpec | None = None,
    model_class: type = AutoModelForImageTextToText,
    **kwargs,
) -> PreTrainedModel:
    """``model_class.from_pretrained`` of a LLaVA-family checkpoint, with a test-time register in its CLIP tower.

    The index is ``register_neurons``, else the one saved in the checkpoint's config, else the shipped one for
    this checkpoint id. ``num_test_time_registers=0`` gives the unmodified model (a baseline, bit-identical);
    the other register settings (``register_scale``, ...) go to the tower, everything else to `from_pretrained`.
    """
    settings = pop_register_settings(kwargs)
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(pretrained_model_name_or_path)
    config = with_test_time_register_tower(config, **settings)
    tower_config = config.vision_config
    register_neurons = resolve_index(
        register_neurons,
        checkpoint=str(pretrained_model_name_or_path),
        saved=bool(tower_config.register_neurons),
        num_registers=tower_config.num_test_time_registers,
    )
    with index_attached_later():
        model = model_class.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
    vision_tower_with_registers(model).set_register_neurons(
        register_neurons, register_semantics=settings.get("register_semantics")
    )
    return model
