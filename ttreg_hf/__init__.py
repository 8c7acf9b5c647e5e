"""Test-time registers for pretrained Vision Transformers, as drop-in `transformers` and OpenCLIP classes.

Importing the package is cheap (``ttreg --help`` must not wait for torch): the names below load on first use. The
classes are registered with `AutoConfig` / `AutoModel` as soon as the package and `transformers`' auto classes are
both imported, in either order, so ``import ttreg_hf`` followed by ``AutoModel.from_pretrained(...)`` works.
"""

import functools
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> defining module (imported on first use)
_EXPORTS = {
    **dict.fromkeys(
        ("Dinov2TTRegModel", "Dinov2TTRegBackbone", "Dinov2TTRegForImageClassification"), ".modeling.dinov2"
    ),
    **dict.fromkeys(
        (
            "CLIPTTRegForImageClassification",
            "CLIPTTRegModel",
            "CLIPVisionTTRegModel",
            "CLIPVisionTTRegModelOutput",
            "CLIPVisionTTRegModelWithProjection",
        ),
        ".modeling.clip",
    ),
    **dict.fromkeys(
        (
            "Siglip2TTRegForImageClassification",
            "Siglip2TTRegModel",
            "Siglip2VisionTTRegModel",
            "SiglipTTRegForImageClassification",
            "SiglipTTRegModel",
            "SiglipVisionTTRegModel",
        ),
        ".modeling.siglip",
    ),
    **dict.fromkeys(
        (
            "DeiTTTRegForImageClassification",
            "DeiTTTRegForImageClassificationWithTeacher",
            "DeiTTTRegModel",
            "ViTTTRegForImageClassification",
            "ViTTTRegModel",
        ),
        ".modeling.vit",
    ),
    **dict.fromkeys(("DINOv3ViTTTRegModel", "DINOv3ViTTTRegBackbone"), ".modeling.dinov3"),
    **dict.fromkeys(
        (
            "CLIPTTRegConfig",
            "CLIPVisionTTRegConfig",
            "DeiTTTRegConfig",
            "DINOv3ViTTTRegConfig",
            "Dinov2TTRegConfig",
            "TestTimeRegisterConfig",
            "TestTimeRegisterConfigMixin",
            "ViTTTRegConfig",
        ),
        ".configs",
    ),  # fmt: skip
    **dict.fromkeys(
        ("Siglip2TTRegConfig", "Siglip2VisionTTRegConfig", "SiglipTTRegConfig", "SiglipVisionTTRegConfig"),
        ".configs.siglip",
    ),
    **dict.fromkeys(("DiscoveryResult", "find_register_neurons"), ".discovery"),
    **dict.fromkeys(("Checkpoint", "Family", "families", "family_of", "register_family"), ".family"),
    **dict.fromkeys(
        (
            "RegisterIndexMismatchWarning",
            "RegisterNeuronIndex",
            "RegisterNeuronIndexError",
            "find_shipped_index",
            "load_index",
            "shipped_indices",
        ),
        ".index",
    ),
    **dict.fromkeys(
        ("WithRegisterTowerMixin", "load_vlm", "to_test_time_registers", "vision_tower_with_registers"), ".modeling.vlm"
    ),
    "RegisterNeuronEdit": ".modeling.edit",
    "TokenLayout": ".modeling.layout",
    **dict.fromkeys(
        (
            "EditAfterActivationMixin",
            "KeywordRegisterSettingsMixin",
            "PreTrainedTestTimeRegisterMixin",
            "RegisterAppender",
            "RegisterEditOffWarning",
            "RegisterSeams",
            "StripRegistersMixin",
            "TestTimeRegisterLoadingMixin",
            "TestTimeRegisterMixin",
            "TestTimeRegisterModelOutput",
            "adopt",
            "check_pixel_values",
        ),
        ".modeling.registers",
    ),  # fmt: skip
}
__all__ = sorted(_EXPORTS)
_AUTO_MODULE = "transformers.models.auto.modeling_auto"  # imported by every use of AutoConfig / AutoModel


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    register_auto_classes()
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


@functools.cache
def register_auto_classes() -> None:
    """Make the Auto classes know every `transformers` family's classes, each wherever its parent class is, keyed by
    its config class (e.g. `AutoModel` builds `Dinov2TTRegModel` for a `Dinov2TTRegConfig`, `AutoBackbone`
    `Dinov2TTRegBackbone`, `AutoModelForImageClassification` builds both DeiT classifiers, as for `DeiTConfig`), and
    let them load their parents' checkpoints.

    Runs on first use of a name of this package and when `transformers` imports its auto classes after this package.
    Code of this package that calls `AutoConfig` / `AutoModel` on its own model types calls it first: when the
    package's own imports are what import `transformers`' auto classes, registering then may be circular.
    """
    from transformers import AutoBackbone, AutoConfig
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.models.auto import modeling_auto

    from .configs.registers import ARCHITECTURES
    from .family import transformers_families

    auto_classes = [
        AutoBackbone,
        *(getattr(modeling_auto, name) for name in modeling_auto.__all__ if name.startswith("AutoModel")),
    ]
    for family in transformers_families():
        ours = dict(zip(family.parents, family.model_classes))
        config_classes = {parent.config_class: model.config_class for parent, model in ours.items()}
        for parent, model_class in ours.items():
            # `transformers` looks the key conversions up by class name: each class gets its parent's
            conversions = get_checkpoint_conversion_mapping(parent.__name__) or []
            register_checkpoint_conversion_mapping(model_class.__name__, conversions, overwrite=True)
            ARCHITECTURES[parent.__name__] = model_class.__name__
        for parent_config, config_class in config_classes.items():
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            for auto_class in auto_classes:
                parents = auto_class._model_mapping.get(parent_config, None)  # a class, or several (DeiT's)
                if parents is None:
                    continue
                if not isinstance(parents, tuple):
                    if parents in ours:
                        auto_class.register(config_class, ours[parents], exist_ok=True)
                elif all(parent in ours for parent in parents):
                    auto_class.register(config_class, tuple(ours[parent] for parent in parents), exist_ok=True)


def _half_imported() -> bool:
    """Whether a module of this package or of `transformers` is half-imported."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith((f"{__name__}.", "transformers."))
    )


class _RegisterWithAutoClasses(importlib.abc.MetaPathFinder):
    """Register the classes right after `transformers` imports its auto classes. When a half-imported module (one of
    this package's, or a `transformers` model module the classes subclass) is what imported them, registering is a
    circular import: it is left to the next `register_auto_classes` call (a package name's first use, or the package
    code that needs it)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            try:
                register_auto_classes()
            except ImportError:
                if not _half_imported():
                    raise

        spec.loader.exec_module = exec_module
        return spec


if _AUTO_MODULE in sys.modules:
    register_auto_classes()
else:
    sys.meta_path.insert(0, _RegisterWithAutoClasses())
