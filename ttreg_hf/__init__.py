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

# the `transformers` families: model class -> (its module, its config class, the parent whose checkpoints it loads);
# `AutoModel` builds the model class for the config class (for the CLIP projection model, the tower)
_FAMILIES = {
    "Dinov2TTRegModel": (".modeling.dinov2", "Dinov2TTRegConfig", "Dinov2Model"),
    "CLIPVisionTTRegModel": (".modeling.clip", "CLIPVisionTTRegConfig", "CLIPVisionModel"),
    "CLIPVisionTTRegModelWithProjection": (".modeling.clip", None, "CLIPVisionModelWithProjection"),
    "SiglipVisionTTRegModel": (".modeling.siglip", "SiglipVisionTTRegConfig", "SiglipVisionModel"),
    "Siglip2VisionTTRegModel": (".modeling.siglip", "Siglip2VisionTTRegConfig", "Siglip2VisionModel"),
    "ViTTTRegModel": (".modeling.vit", "ViTTTRegConfig", "ViTModel"),
    "DeiTTTRegModel": (".modeling.vit", "DeiTTTRegConfig", "DeiTModel"),
    "DINOv3ViTTTRegModel": (".modeling.dinov3", "DINOv3ViTTTRegConfig", "DINOv3ViTModel"),
}
# public name -> defining module
_EXPORTS = {
    **{name: module for name, (module, _, _) in _FAMILIES.items()},
    **dict.fromkeys(
        (
            "CLIPVisionTTRegConfig",
            "DeiTTTRegConfig",
            "DINOv3ViTTTRegConfig",
            "Dinov2TTRegConfig",
            "TestTimeRegisterConfig",
            "TestTimeRegisterConfigMixin",
            "ViTTTRegConfig",
        ),
        ".configs",
    ),
    **dict.fromkeys(("Siglip2VisionTTRegConfig", "SiglipVisionTTRegConfig"), ".configs.siglip"),
    **dict.fromkeys(("DiscoveryResult", "find_register_neurons"), ".discovery"),
    **dict.fromkeys(
        ("RegisterNeuronIndex", "RegisterNeuronIndexError", "find_shipped_index", "load_index", "shipped_indices"),
        ".index",
    ),
    "CLIPVisionTTRegModelOutput": ".modeling.clip",
    **dict.fromkeys(("load_vlm", "to_test_time_registers", "vision_tower_with_registers"), ".modeling.vlm"),
    **dict.fromkeys(("RegisterIndexMismatchWarning", "RegisterNeuronEdit"), ".modeling.edit"),
    "TokenLayout": ".modeling.layout",
    **dict.fromkeys(
        (
            "EditAfterActivationMixin",
            "PreTrainedTestTimeRegisterMixin",
            "RegisterAppender",
            "RegisterEditOffWarning",
            "RegisterSeams",
            "TestTimeRegisterMixin",
            "TestTimeRegisterModelOutput",
            "adopt",
            "check_pixel_values",
        ),
        ".modeling.registers",
    ),
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
    """Make `AutoConfig` / `AutoModel` know the classes, and let them load their parents' checkpoints (once).

    Runs on first use of a name of this package and when `transformers` imports its auto classes after this package.
    Code of this package that calls `AutoConfig` / `AutoModel` on its own model types calls it first: when the
    package's own imports are what import `transformers`' auto classes, registering then may be circular.
    """
    from transformers import AutoConfig, AutoModel
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    # `transformers` looks the key conversions up by class name: each class gets its parent's
    for name, (module_name, config_name, parent_name) in _FAMILIES.items():
        module = importlib.import_module(module_name, __name__)
        if name not in vars(module):  # half-imported: see `_RegisterWithAutoClasses`
            raise ImportError(f"cannot import name {name!r} from partially initialized module {module.__name__!r}")
        model_class = vars(module)[name]
        register_checkpoint_conversion_mapping(
            name, get_checkpoint_conversion_mapping(parent_name) or [], overwrite=True
        )
        if config_name is not None:
            config_class = model_class.config_class
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModel.register(config_class, model_class, exist_ok=True)


@functools.cache
def transformers_families() -> dict[type, type]:
    """``{parent model class: our subclass of it}`` for every `transformers` family, e.g. `CLIPVisionModel` ->
    `CLIPVisionTTRegModel`: the towers `to_test_time_registers` upgrades."""
    import transformers

    return {getattr(transformers, parent): __getattr__(ours) for ours, (_, _, parent) in _FAMILIES.items()}


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
