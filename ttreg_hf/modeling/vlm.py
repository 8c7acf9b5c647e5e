"""Models built around a vision tower that is the parent of one of our families — VLMs (LLaVA, LLaVA-NeXT,
LLaVA-OneVision, ...), depth and segmentation models on a backbone (DPT, Depth Anything, Mask2Former), classifiers,
`CLIPModel` — with a test-time-register tower: upgraded in place (`to_test_time_registers`), at load (`load_vlm`), or
built so (`WithRegisterTowerMixin`, our classifiers and dual encoders).

The new tower strips the registers from every output it returns, so the language model sees exactly the image
tokens the processor inserted, for every ``vision_feature_layer``, feature-select strategy and anyres packing, and a
head, a neck or a pooling sees the parent's tokens and feature maps.
"""

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel

from ..configs.registers import TestTimeRegisterCompositeConfigMixin, TestTimeRegisterConfigMixin
from ..errors import TTRegTypeError, TTRegValueError
from ..family import check_close_keywords, closest_keyword_on_error, closest_name, parameter_names
from ..registry import transformers_families
from .hosts import HOSTS
from .registers import (
    HUB_KWARGS,
    MODEL_KEYWORDS,
    IndexSpec,
    PreTrainedTestTimeRegisterMixin,
    adopt,
    every_family_setting,
    from_pretrained_keywords,
    register_settings,
    set_config_keyword,
    set_tower,
    tower_with_registers,
    vision_tower_with_registers,
)


def _our_classes() -> dict[type[PreTrainedModel], type[PreTrainedModel]]:
    """``{parent class: our subclass of it}`` for every class of every `transformers` family."""
    return {
        parent: ours for family in transformers_families() for ours, parent in zip(family.model_classes, family.parents)
    }


def _host_classes() -> dict[type[PreTrainedModel], type[PreTrainedModel]]:
    """``{host class: our subclass of it}`` for the hosts whose saved folders load with plain `transformers`."""
    return dict(zip(HOSTS.parents, HOSTS.model_classes))


class HostNeedsPackageWarning(UserWarning):
    """A model upgraded in place whose class has no subclass of ours: what it saves needs ttreg_hf to load."""


def _as_our_class(model: PreTrainedModel) -> None:
    """Make an upgraded ``model`` (and a host's config) an instance of our subclass of its class, in place (`adopt`):
    its `save_pretrained` then writes the remote code that loads it with plain `transformers`. A host without one
    is left as it is, with a warning that what it saves needs ttreg_hf."""
    classes = {**_our_classes(), **_host_classes()}
    if type(model) in classes.values():  # built as ours (`load_vlm` of a saved host)
        return
    ours = classes.get(type(model))
    if ours is None:
        hosts = ", ".join(parent.__name__ for parent in HOSTS.parents)
        warnings.warn(
            f"ttreg_hf has no {type(model).__name__} class with a test-time-register tower, so what its "
            "save_pretrained writes loads only where ttreg_hf is imported (through the Auto classes, as before). "
            f"These hosts also load with plain transformers (trust_remote_code=True): {hosts}.",
            HostNeedsPackageWarning,
            stacklevel=3,
        )
        return
    if not isinstance(model.config, ours.config_class):  # a host's: no fields of its own
        adopt(model.config, ours.config_class)
    adopt(model, ours)


def _tower_classes() -> dict[type[PreTrainedModel], type[PreTrainedTestTimeRegisterMixin]]:
    """``{parent tower class: our subclass of it}``, e.g. `CLIPVisionModel` -> `CLIPVisionTTRegModel`,
    `Dinov2Backbone` -> `Dinov2TTRegBackbone`: the towers `to_test_time_registers` upgrades (the classes that hold the
    edits; a classifier or a `CLIPModel` holds one)."""
    return {
        parent: ours for parent, ours in _our_classes().items() if issubclass(ours, PreTrainedTestTimeRegisterMixin)
    }


def _composite_config_classes() -> dict[type[PreTrainedConfig], type[TestTimeRegisterCompositeConfigMixin]]:
    """``{parent config class: ours}`` for the composite models' configs (`CLIPConfig` -> `CLIPTTRegConfig`)."""
    return {
        parent.config_class: ours.config_class
        for parent, ours in _our_classes().items()
        if issubclass(ours.config_class, TestTimeRegisterCompositeConfigMixin)
    }


def _config_classes() -> dict[type[PreTrainedConfig], type[TestTimeRegisterConfigMixin]]:
    """``{tower config class: our config class for it}``, for the parents' (`CLIPVisionConfig`) and ours (a saved
    upgraded model)."""
    pairs = {parent.config_class: ours.config_class for parent, ours in _tower_classes().items()}
    return {**pairs, **{ours: ours for ours in pairs.values()}}


def _with_settings(tower_config: PreTrainedConfig, **settings) -> TestTimeRegisterConfigMixin:
    """``tower_config`` (a `CLIPVisionConfig`, `SiglipVisionConfig`, ...) as its family's config: every field kept,
    plus the register ``settings``."""
    config_class = _config_classes()[type(tower_config)]
    valid = register_settings(config_class)
    for name in sorted(set(settings) - valid):
        raise TTRegTypeError(f"{name} not a setting of {config_class.__name__}{closest_name(name, valid)}")
    return config_class.from_parent_config(tower_config, **settings)


def _sub_configs(config: PreTrainedConfig) -> Iterator[tuple[PreTrainedConfig, str]]:
    """``(owner, key)`` for every sub-config below ``config`` (``vision_config``, ``text_config``, ...)."""
    for key in config.sub_configs:
        value = getattr(config, key, None)
        if isinstance(value, PreTrainedConfig):
            yield config, key
            yield from _sub_configs(value)


def _tower_names() -> str:
    return ", ".join(parent.__name__ for parent in _tower_classes())


def _tower_config_slot(config: PreTrainedConfig) -> tuple[PreTrainedConfig, str]:
    """``(owner, key)`` of the one sub-config of a VLM's ``config`` that configures a tower of one of our families."""
    slots = [(owner, key) for owner, key in _sub_configs(config) if type(getattr(owner, key)) in _config_classes()]
    if len(slots) != 1:
        found = ", ".join(f"{key}: {getattr(owner, key).model_type}" for owner, key in _sub_configs(config))
        raise TTRegTypeError(
            f"Test-time registers plug into one vision tower of {_tower_names()}; this {type(config).__name__} has "
            f"{len(slots)} ({found or 'no sub-configs'})."
        )
    return slots[0]


def with_test_time_register_tower(config: PreTrainedConfig, **settings) -> PreTrainedConfig:
    """A copy of a VLM's ``config`` (LLaVA, LLaVA-NeXT, ...) whose vision-tower config is its family's, with the
    register ``settings``: the model built from it builds our tower wherever it builds its tower with `AutoModel`."""
    config = copy.deepcopy(config)
    owner, key = _tower_config_slot(config)
    setattr(owner, key, _with_settings(getattr(owner, key), **settings))
    return config


def _vision_tower(vlm: nn.Module) -> tuple[str, PreTrainedModel]:
    """The path and module of the one submodule of ``vlm`` whose class is the parent of one of our families."""
    upgraded = [path for path, module in vlm.named_modules() if isinstance(module, PreTrainedTestTimeRegisterMixin)]
    if upgraded:
        raise TTRegValueError(
            f"{type(vlm).__name__}.{upgraded[0]} already has test-time registers: change them with "
            "`vision_tower_with_registers(model).set_register_neurons(...)`."
        )
    towers = [(path, module) for path, module in vlm.named_modules() if path and type(module) in _tower_classes()]
    if not towers and type(vlm) in _tower_classes():
        ours = _tower_classes()[type(vlm)]
        raise TTRegTypeError(
            f"to_test_time_registers upgrades the tower inside a model; this {type(vlm).__name__} is itself one: load "
            f"it as {ours.__name__} (`{ours.__name__}.from_pretrained(...)`), which takes its checkpoints."
        )
    if len(towers) != 1:
        found = f"{len(towers)} ({', '.join(path for path, _ in towers)})" if towers else "none"
        several = (
            ": towers with other weights need other indices, so build the model from our configs instead (e.g. a "
            "`Dinov2TTRegConfig` with its `register_neurons` for each)"
            if towers
            else ""
        )
        raise TTRegTypeError(
            f"to_test_time_registers upgrades the one vision tower of a model, a {_tower_names()}; "
            f"{type(vlm).__name__} has {found}{several}."
        )
    path, tower = towers[0]
    if any(hasattr(module, "_hf_hook") for module in tower.modules()):
        raise TTRegValueError(
            f"{type(vlm).__name__}.{path} is dispatched by accelerate (device_map, offloading), whose hooks an upgrade "
            "would drop: upgrade before dispatching, or load with `load_vlm(..., device_map=...)`, which builds the "
            "test-time-register tower from the start."
        )
    return path, tower


def to_test_time_registers(
    vlm: PreTrainedModel, register_neurons: IndexSpec | None = None, *, checkpoint: str = "", **settings
) -> PreTrainedModel:
    """Upgrade the vision tower or backbone inside ``vlm`` (a `CLIPVisionModel`, `SiglipVisionModel`,
    `Dinov2Backbone`, ... submodule) in place to its family's test-time-register class, sharing its weights; returns
    ``vlm``. ``vlm`` is a VLM (LLaVA, ...), a depth or segmentation model built on a backbone (DPT, Depth Anything,
    Mask2Former, ZoeDepth), a classifier (`Dinov2ForImageClassification`, ...), a masked-image model
    (`ViTForMaskedImageModeling`, `DeiTForMaskedImageModeling`) or a `CLIPModel` / `SiglipModel`.

    The index is ``register_neurons`` (dict, file, shipped name), else the one shipped for ``checkpoint`` (default:
    ``vlm.name_or_path``); ``register_neurons={}`` or ``num_test_time_registers=0`` keeps the edit off (the original
    model, bit-identical). The other ``settings`` (``register_scale``, ...) go to the tower's config, which replaces
    the original in ``vlm.config`` (a classifier's whole config, a composite model's ``vision_config``, a depth model's
    ``backbone_config``), so ``save_pretrained`` saves what runs and the Auto classes reload it with the registers; a
    `CLIPConfig` / `SiglipConfig` becomes ours for that (`CLIPTTRegConfig`, ...). ``vlm`` becomes the package's
    subclass of its class in place (`Dinov2TTRegForImageClassification`, `LlavaTTRegForConditionalGeneration`, ...:
    `ttreg_hf.modeling.hosts`), and a host's config its config class (``model_type`` ``llava_tt_reg``, ...), so that
    what it saves also loads with plain `transformers` (``trust_remote_code=True``); a model the package has no class
    for is upgraded as it is, with a `HostNeedsPackageWarning`. The tower is a new module: upgrade
    before wrapping the model (adapters, gradient checkpointing, `torch.compile`); a dispatched tower
    (``device_map``) is refused, `load_vlm` builds one.
    """
    path, tower = _vision_tower(vlm)
    whole = tower.config is vlm.config  # a classifier's tower shares its config
    if whole and isinstance(vlm, PreTrainedModel) and type(vlm) not in _our_classes():  # (a wrapper: its model's)
        supported = ", ".join(sorted(cls.__name__ for cls in _our_classes() if cls.config_class is type(tower.config)))
        raise TTRegTypeError(
            f"A {type(vlm).__name__} with test-time registers would save a config that no Auto class reloads as it "
            f"(ttreg_hf has no test-time-register class of it). Of the models on a {type(tower).__name__}, these have "
            f"one: {supported}; or use the tower alone."
        )
    slots = [(owner, key) for owner, key in _sub_configs(vlm.config) if getattr(owner, key) is tower.config]
    if not slots and not whole:
        raise TTRegValueError(
            f"{type(vlm).__name__}.config does not hold its tower's config, so save_pretrained would save the tower "
            "without its registers: keep the tower's config among the model config's sub-configs."
        )
    # built with the edit off, the index attached once the weights are in place: the edits are built on their device
    upgraded = tower_with_registers(
        _tower_classes()[type(tower)], tower, _with_settings(tower.config, register_neurons={}, **settings)
    )
    upgraded.config.attach_register_neurons(
        register_neurons,
        checkpoint=checkpoint or vlm.name_or_path,
        register_semantics=settings.get("register_semantics"),
    )
    set_tower(vlm, path, upgraded)
    for owner, key in slots:
        setattr(owner, key, upgraded.config)
    if whole:
        vlm.config = upgraded.config
    composite = _composite_config_classes().get(type(vlm.config))
    if composite is not None:  # `CLIPConfig` would reload a plain tower
        vlm.config = composite.from_parent_config(vlm.config)
    if isinstance(vlm, PreTrainedModel):
        _as_our_class(vlm)
    return vlm


def load_vlm(
    pretrained_model_name_or_path: str | Path,
    *,
    register_neurons: IndexSpec | None = None,
    model_class: type = AutoModelForImageTextToText,
    **kwargs,
) -> PreTrainedModel:
    """``model_class.from_pretrained`` of a VLM checkpoint (LLaVA, LLaVA-NeXT, LLaVA-OneVision, ...) with a
    test-time-register vision tower, built as such (no upgrade after the load).

    The index is ``register_neurons``, else the one saved in the checkpoint's config, else the shipped one for this
    checkpoint id, and is resolved before any weights are downloaded. ``num_test_time_registers=0`` gives the
    unmodified model (a baseline, bit-identical); the other register settings (``register_scale``,
    ``pool_registers``, ...) go to the tower, everything else to `from_pretrained`. The model is the package's class
    for the class loaded, as `to_test_time_registers` makes it (e.g. `LlavaTTRegForConditionalGeneration`), so what it
    saves also loads with plain `transformers`; with ``output_loading_info=True``, ``(model, loading info)`` as in the
    parent.
    """
    family_settings = every_family_setting()
    settings = {name: kwargs.pop(name) for name in family_settings if name in kwargs}
    check_close_keywords(kwargs, family_settings, "load_vlm")  # the rest: `from_pretrained` checks them
    config = kwargs.pop("config", None)
    if config is None:  # as in the parent: keyword arguments that name config attributes go to the config
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        for key in [key for key in kwargs if key not in MODEL_KEYWORDS and hasattr(config, key)]:
            set_config_keyword(config, key, kwargs.pop(key))
    config = with_test_time_register_tower(config, **settings)
    getattr(*_tower_config_slot(config)).attach_register_neurons(
        register_neurons,
        checkpoint=str(pretrained_model_name_or_path),
        register_semantics=settings.get("register_semantics"),
    )
    valid = {*config.to_dict(), *from_pretrained_keywords(), *parameter_names(load_vlm), *family_settings}
    with closest_keyword_on_error(kwargs, valid, "load_vlm"):
        loaded = model_class.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True`: (model, info)
    vision_tower_with_registers(model)  # a model that builds its tower without `AutoModel` has the parent's
    _as_our_class(model)
    return loaded
