"""Configuration fields shared by every test-time-register model, and the one place they are validated."""

import contextlib
import copy
import dataclasses
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

from ..errors import TTRegError, TTRegTypeError, TTRegValueError
from ..index import (
    RegisterIndexMismatchWarning,
    RegisterNeuronIndex,
    check_neurons_fit,
    check_provenance,
    load_index,
    normalize_neurons,
    resolve_index,
)
from ..settings import (
    FLOAT32_MAX,
    MAX_TEST_TIME_REGISTERS,
    PATCH_MODES,
    SEMANTICS,
    RegisterPatchMode,
    RegisterSemantics,
)


class _ReadOnly:
    """A register setting's container as the config of a model stores it: editing it in place would change the
    config without the model (the write goes unseen), so it is refused. A deep copy is a plain container (what
    `to_dict` and a copied config hold, which no model follows); a shallow copy or a pickle stays read-only."""

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "A register setting cannot be edited in place: assign a new value (`config.register_neurons = {...}`) or "
            "call `model.set_register_neurons(...)`, so that the model follows the change."
        )


class ReadOnlyList(_ReadOnly, list):
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _ReadOnly._refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _ReadOnly._refuse

    def __reduce_ex__(self, protocol):
        return ReadOnlyList, (list(self),)

    def __deepcopy__(self, memo):
        return copy.deepcopy(list(self), memo)


class ReadOnlyDict(_ReadOnly, dict):
    __setitem__ = __delitem__ = __ior__ = _ReadOnly._refuse
    update = pop = popitem = setdefault = clear = _ReadOnly._refuse

    def __reduce_ex__(self, protocol):
        return ReadOnlyDict, (dict(self),)

    def __deepcopy__(self, memo):
        return copy.deepcopy(dict(self), memo)


def read_only(value):
    """``value`` with every dict and list in it read-only (`ReadOnlyDict`, `ReadOnlyList`)."""
    if isinstance(value, dict):
        return ReadOnlyDict({key: read_only(item) for key, item in value.items()})
    if isinstance(value, list):
        return ReadOnlyList(read_only(item) for item in value)
    return value


# id(config) -> weak references to the functions that apply its register settings (a config is unhashable, so no
# `WeakKeyDictionary`; an entry goes when its config is collected)
_FOLLOWERS: dict[int, list[weakref.WeakMethod]] = {}


@contextlib.contextmanager
def unwrapped_refusals() -> Iterator[None]:
    """Our refusal (a `TTRegError`) raised as itself where a `@strict` constructor's class validation wraps it."""
    try:
        yield
    except StrictDataclassError as error:
        if isinstance(error.__cause__, TTRegError):
            raise error.__cause__ from None
        raise


@dataclass
class RegisterSettingsMixin:
    r"""
    register_neurons (`dict[str, list[int]]`, *optional*):
        The register-neuron index: 0-based block index -> MLP neuron indices. `None` or empty turns the edit off.
        Also given, in the package, as any index `load_index` reads (`TestTimeRegisterConfigMixin`).
    num_test_time_registers (`int`, *optional*, defaults to 1):
        How many zero-initialised tokens to append after the patches. 0 turns the edit off. At most
        `MAX_TEST_TIME_REGISTERS` (64): the paper uses one, models trained with registers use 4 to 16, and every
        register lengthens the sequence attention is quadratic in (a ViT-L/14 at 224 px has 256 patches).
    register_scale (`float` or `list[float]`, *optional*, defaults to 1.0):
        Factor applied to the register value, one for all registers or one per register. Finite in float32
        (|scale| <= 3.4e38); a model run in float16 is refused at its first forward unless |scale| <= 65504.
    register_semantics (`str`, *optional*, defaults to `"paper"`):
        `"paper"` (Algorithm 2 of the paper) or `"reference"` (the authors' released code); see `RegisterNeuronEdit`.
    register_patch_mode (`str`, *optional*, defaults to `"zero"`):
        What reset tokens get: `"zero"`, `"mean"`, `"only_outliers"` or `"same"`.
    register_index_provenance (`dict`, *optional*):
        Where the index in `register_neurons` applies, copied from its file whenever one is attached (`None` for a
        plain dict): `image_size` (pixels) and `checkpoints` (ids) it was found at, and its `weights_fingerprint`.
        Only read to warn (`RegisterIndexMismatchWarning`) when the model runs far from that image size or holds
        other weights; the edit does not depend on it.
    """

    register_neurons: dict | None = None
    num_test_time_registers: int = 1
    register_scale: float | int | list[float | int] = 1.0
    register_semantics: RegisterSemantics = "paper"
    register_patch_mode: RegisterPatchMode = "zero"
    register_index_provenance: dict | None = None

    def __post_init__(self, **kwargs):
        if self.register_neurons is not None:  # normalized, with the provenance given beside it (`__setattr__`)
            super().__setattr__("register_neurons", _neuron_lists(self.register_neurons))
        parent_post_init = getattr(super(), "__post_init__", None)  # absent on plain (non-`transformers`) dataclasses
        if parent_post_init is not None:
            _check_dtype(self.dtype)
            _check_dtype(kwargs.get("torch_dtype"))  # the older name, which the parent reads from ``kwargs``
            parent_post_init(**kwargs)
            _name_our_architectures(self)

    def __setattr__(self, name: str, value) -> None:
        """A register setting written to the config of a model (one that a model follows, `follow_register_settings`)
        is validated and applied at once, or refused with nothing changed. ``register_neurons`` written as a dict to a
        built config is stored normalized, as the constructor stores it, and drops the provenance of the index it
        replaces (on a model's config, ``None`` is ``{}``: the edit off)."""
        followers = self._followers() if name in REGISTER_SETTINGS else None
        updates = {name: value}
        if name == "register_neurons" and _ENDS_INIT in self.__dict__ and (value is not None or followers):
            updates = {name: _neuron_lists(value or {}), "register_index_provenance": None}
        if followers:
            return self._write_register_settings(updates)
        for key, item in updates.items():
            super().__setattr__(key, item)

    def follow_register_settings(self, apply: Callable[[], None]) -> None:
        """Call ``apply()`` (a bound method, held weakly: a model's method that updates its edits) after every write
        of a register setting to this config, once the write is validated."""
        followers = _FOLLOWERS.get(id(self))
        if followers is None:
            followers = _FOLLOWERS[id(self)] = []
            weakref.finalize(self, _FOLLOWERS.pop, id(self), None)
        reference = weakref.WeakMethod(apply)
        followers[:] = [r for r in followers if r() is not None and r != reference] + [reference]
        for name in REGISTER_SETTINGS:  # from now on, an edit in place would go unseen
            super().__setattr__(name, read_only(getattr(self, name)))

    def _followers(self) -> list[Callable[[], None]]:
        alive = (reference() for reference in _FOLLOWERS.get(id(self), ()))
        return [apply for apply in alive if apply is not None]

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        return _relabelled_config_dict(cls, super(), *args, **kwargs)

    @classmethod
    def from_parent_config(cls, config, **settings):
        """``config`` (the parent's config class, e.g. a `Dinov2Config`) as this class: every field and the attention
        implementation kept, the register ``settings`` added."""
        with unwrapped_refusals():
            return cls(**{**_fields(config), **settings}, attn_implementation=config._attn_implementation)

    @classmethod
    def parent_config_class(cls) -> type[PreTrainedConfig]:
        """The config class this one adds the register settings to (e.g. `Dinov2Config`)."""
        return next(base for base in cls.__mro__[1:] if not issubclass(base, RegisterSettingsMixin))

    def as_parent_config(self) -> PreTrainedConfig:
        """This config as its parent's class (e.g. a `Dinov2Config`): every field kept but the register settings and
        the family's own."""
        parent = self.parent_config_class()
        ours = {field.name for field in dataclasses.fields(self)} - {field.name for field in dataclasses.fields(parent)}
        fields = {key: value for key, value in _fields(self).items() if key not in ours}
        return parent(**fields, attn_implementation=self._attn_implementation)

    @property
    def register_config(self) -> "RegisterSettingsMixin":
        """The config that holds the register settings: this one (a composite config's is its ``vision_config``)."""
        return self

    @classmethod
    def register_config_class(cls) -> type:
        return cls

    @property
    def mlp_width(self) -> int:
        """Number of neurons in each MLP hidden layer (after the gating for gated MLPs), the range of a register-neuron
        index: the parent config's ``intermediate_size``; a config that names its width otherwise overrides this."""
        return self.intermediate_size

    @property
    def register_neuron_index(self) -> dict[int, tuple[int, ...]]:
        return normalize_neurons(self.register_neurons or {})

    @property
    def register_index_found_at(self) -> tuple[int, int] | None:
        """``(image size, patch size)`` in pixels that the attached index was found at, when both are known (the
        index records its image size; the config has an int ``patch_size``)."""
        image_size = (self.register_index_provenance or {}).get("image_size")
        patch_size = getattr(self, "patch_size", None)
        both_known = image_size is not None and isinstance(patch_size, int) and patch_size > 0
        return (image_size, patch_size) if both_known else None

    @property
    def register_scales(self) -> tuple[float, ...]:
        if isinstance(self.register_scale, list):
            return tuple(float(s) for s in self.register_scale)
        return (float(self.register_scale),) * self.num_test_time_registers

    def validate_test_time_registers(self):
        """Every register setting, against each other and the model's depth and MLP width."""
        count = self.num_test_time_registers
        if not 0 <= count <= MAX_TEST_TIME_REGISTERS:
            raise TTRegValueError(
                f"num_test_time_registers must be >= 0 (0 turns the edit off) and <= {MAX_TEST_TIME_REGISTERS} (the paper "
                f"uses 1), got {count!r}."
            )
        scales = self.register_scale if isinstance(self.register_scale, list) else [self.register_scale]
        if not all(math.isfinite(scale) and abs(scale) <= FLOAT32_MAX for scale in scales):
            raise TTRegValueError(
                f"register_scale must be finite in float32 (|scale| <= {FLOAT32_MAX:.4g}), got {self.register_scale}; "
                "the paper uses 1.0."
            )
        # with 0 registers (edit off) the scales are unused and stay for later, like the index
        num_registers = self.num_test_time_registers
        if isinstance(self.register_scale, list) and num_registers and len(self.register_scale) != num_registers:
            raise TTRegValueError(
                f"register_scale has {len(self.register_scale)} values for {self.num_test_time_registers} test-time "
                "registers: give one float for all of them or one per register."
            )
        if self.register_semantics not in SEMANTICS:
            raise TTRegValueError(f"register_semantics must be one of {SEMANTICS}, got {self.register_semantics!r}.")
        if self.register_patch_mode not in PATCH_MODES:
            raise TTRegValueError(
                f"register_patch_mode must be one of {PATCH_MODES}, got {self.register_patch_mode!r}."
            )
        check_neurons_fit(self.register_neuron_index, self.num_hidden_layers, self.mlp_width)
        check_provenance(self.register_index_provenance)

    def _write_register_settings(self, updates: dict) -> None:
        """Validate ``updates`` with the other settings, write them (read-only on a model's config) and apply them to
        the models that follow this config; nothing is written when one is invalid."""
        with unwrapped_refusals():
            candidate = dataclasses.replace(self, **updates)
        candidate.validate_test_time_registers()  # a config class without `@strict` runs no validator at init
        followers = self._followers()
        for name in updates:
            value = getattr(candidate, name)
            super().__setattr__(name, read_only(value) if followers else value)
        for apply in followers:
            apply()


@dataclass
class TestTimeRegisterConfigMixin(RegisterSettingsMixin):
    """The test-time-register fields of a config (`RegisterSettingsMixin`), and index files: ``register_neurons`` given
    or written as any index `load_index` reads (an index file, a shipped name, a Hub repo id or a
    `RegisterNeuronIndex`) is read and stored as its dict, with its semantics and provenance, except, in a
    constructor, a `register_semantics` other than the default or a `register_index_provenance` given beside it. (The
    remote code's configs are `RegisterSettingsMixin`s: a saved config holds the index as its dict.)"""

    register_neurons: dict | str | os.PathLike | RegisterNeuronIndex | None = None  # stored as a dict (`__setattr__`)

    def __post_init__(self, **kwargs):
        index = self.__dict__.pop(_INDEX_GIVEN, None)  # an index file given to the constructor
        if index is not None:
            index.check_fits(self.num_hidden_layers, self.mlp_width)
            if self.register_semantics == _DEFAULT_SEMANTICS:
                self.register_semantics = index.semantics
            if self.register_index_provenance is None:
                self.register_index_provenance = index.provenance
        super().__post_init__(**kwargs)

    def __setattr__(self, name: str, value) -> None:
        """``register_neurons`` written as an index file, shipped name, Hub repo id or `RegisterNeuronIndex` is read
        (`load_index`) and written as `update_test_time_registers` writes it to the config of a model; elsewhere
        stored as its dict, with the index's semantics and provenance: at once when written to a built config (after
        checking the index fits it), by `__post_init__` in the constructor."""
        if name != "register_neurons" or value is None or isinstance(value, Mapping):
            return super().__setattr__(name, value)
        index = load_index(value)
        if self._followers():
            return self.update_test_time_registers(index)
        built = _ENDS_INIT in self.__dict__
        if built:
            index.check_fits(self.num_hidden_layers, self.mlp_width)
        else:
            self.__dict__[_INDEX_GIVEN] = index
        super().__setattr__(name, _neuron_lists(index.neurons))  # on a built config, drops the old provenance
        if built:
            super().__setattr__("register_semantics", index.semantics)
            super().__setattr__("register_index_provenance", index.provenance)

    def update_test_time_registers(self, register_neurons=None, **settings) -> None:
        """Write an index (a dict, a file, a shipped name, a Hub repo id or a `RegisterNeuronIndex`; `None` keeps the
        current one) and the settings that are not `None`; an index file's semantics and provenance apply unless
        ``register_semantics`` / ``register_index_provenance`` are given, and a plain dict has no provenance.
        Everything is validated before anything is written."""
        updates = {name: value for name, value in settings.items() if value is not None}
        if register_neurons is not None:
            index = load_index(register_neurons)
            if isinstance(index, RegisterNeuronIndex):
                index.check_fits(self.num_hidden_layers, self.mlp_width)
                updates.setdefault("register_semantics", index.semantics)
                updates.setdefault("register_index_provenance", index.provenance)
                index = index.neurons
            updates.setdefault("register_index_provenance", None)
            updates["register_neurons"] = _neuron_lists(index)
        self._write_register_settings(updates)

    def attach_register_neurons(
        self, register_neurons=None, *, checkpoint: str, register_semantics: str | None = None
    ) -> None:
        """The one path by which every loader attaches an index, before the model is built (so a model without one
        fails before any weights are downloaded): ``register_neurons`` if given, else the index this config holds
        (saved with the checkpoint), else the one shipped for ``checkpoint``; none while registers are on is an
        error that says how to make one. An index file that records other checkpoint ids than ``checkpoint`` warns
        (`RegisterIndexMismatchWarning`), with both."""
        index = resolve_index(
            register_neurons,
            checkpoint=checkpoint,
            saved=bool(self.register_neurons),
            num_registers=self.num_test_time_registers,
        )
        index = None if index is None else load_index(index)
        if isinstance(index, RegisterNeuronIndex) and not index.made_for(checkpoint):
            found_for = ", ".join(dict.fromkeys(index.checkpoints.values()))
            warnings.warn(
                f"This register-neuron index was found for {found_for}, not for {checkpoint!r}: other weights have "
                "other register neurons. Find this checkpoint's with `ttreg find-neurons`, or ignore this warning if "
                "it is the same checkpoint under another name.",
                RegisterIndexMismatchWarning,
                stacklevel=2,
            )
        self.update_test_time_registers(index, register_semantics=register_semantics)


@strict
@dataclass
class TestTimeRegisterConfig(TestTimeRegisterConfigMixin):
    r"""
    The test-time-register settings of a model that has no config of its own (OpenCLIP, timm, your own ViT).

    num_hidden_layers (`int`):
        Number of transformer blocks.
    mlp_width (`int`):
        Number of neurons in each MLP hidden layer (after the gating for gated MLPs).
    patch_size (`int`, *optional*):
        Side of a square patch in pixels, set from the tower (`None` for non-square or unknown patches): with the
        index's image size it gives `register_index_found_at`, the size the index is checked against.
    """

    num_hidden_layers: int = 12
    mlp_width: int = 3072
    patch_size: int | None = None


def _check_dtype(dtype) -> None:
    """Refuse a config ``dtype`` that no model can be built in: a `transformers` config keeps any value, and a model
    built from it (``pretrained=False``) fails deep inside torch, or silently in float32."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if dtype is not None and not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        auto = dtype == "auto"
        raise TTRegValueError(
            f"dtype={dtype!r}: a model is built in a floating-point torch dtype, given as one or by name "
            "(torch.bfloat16, 'float16')"
            + ("; 'auto' means the dtype of a checkpoint's weights, and there are none here." if auto else ".")
        )


def square_patch_size(patch_size) -> int | None:
    """A tower's patch size (an int or a ``(height, width)`` pair) as `TestTimeRegisterConfig.patch_size`: the side
    of a square patch, `None` for a non-square one."""
    height, width = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return int(height) if height == width else None


class SubConfigRegisterSettingsMixin:
    """For a config whose sub-config ``register_config_key`` holds the register settings (a composite model's, a
    host's): a register setting written here, or given to the constructor, is refused with the way to set it, as the
    model reads only the sub-config's (as `transformers` models read a tower's fields only from its sub-config)."""

    register_config_key: str

    def __setattr__(self, name: str, value) -> None:
        if name in REGISTER_SETTINGS:
            key = self.register_config_key
            raise TTRegValueError(
                f"{type(self).__name__} holds no {name}: the {key} does, which the model reads. Set "
                f"config.{key}.{name}, or call model.set_register_neurons(...)."
            )
        super().__setattr__(name, value)

    @property
    def register_config(self) -> RegisterSettingsMixin:
        """The sub-config that holds the register settings."""
        return getattr(self, self.register_config_key)


class TestTimeRegisterCompositeConfigMixin(SubConfigRegisterSettingsMixin):
    """For the config of a composite model (CLIP's, SigLIP's: text and vision towers) whose ``vision_config`` is a
    test-time-register config: that sub-config holds the register settings (``register_config``), and one of the
    parent's vision config class is converted. Mixed in before the parent's config class, which lists ours in
    ``sub_configs_defaults``."""

    register_config_key = "vision_config"

    def __setattr__(self, name: str, value) -> None:
        """A vision config of the parent's class, given or written (as `AutoConfig.from_pretrained` writes a keyword
        argument), is converted (`as_register_config`); a dict is the parent's to build (as our class)."""
        if name == self.register_config_key and isinstance(value, PreTrainedConfig):
            value = self.as_register_config(value)
        super().__setattr__(name, value)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _name_our_architectures(self)

    @classmethod
    def as_register_config(cls, config: PreTrainedConfig) -> RegisterSettingsMixin:
        """``config`` as the sub-config that holds the register settings: ours as it is, one of the parent's vision
        config class converted (every field kept, the register settings at their defaults)."""
        ours = cls.register_config_class()
        if isinstance(config, ours):
            return config
        parent = ours.parent_config_class()
        if not isinstance(config, parent):
            raise TTRegTypeError(
                f"{cls.register_config_key} must be a {parent.__name__} (or a {ours.__name__}), got a "
                f"{type(config).__name__}."
            )
        return ours.from_parent_config(config)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        return _relabelled_config_dict(cls, super(), *args, **kwargs)

    @classmethod
    def from_parent_config(cls, config):
        """``config`` (the parent's, e.g. a `CLIPConfig`) as this class: every field and the attention implementation
        kept, each sub-config the same object except a vision config of the parent's class, converted."""
        sub_configs = {key: getattr(config, key) for key in cls.sub_configs}
        return cls(**{**_fields(config), **sub_configs}, attn_implementation=config._attn_implementation)

    @classmethod
    def register_config_class(cls) -> type:
        return cls.sub_configs[cls.register_config_key]


def subclasses(cls: type) -> list[type]:
    """Every subclass of ``cls``, breadth first: the package's (or the remote code's) before their subclasses."""
    found, pending = [], [cls]
    while pending:
        pending = [sub for base in pending for sub in base.__subclasses__() if sub not in found]
        found += pending
    return found


class TestTimeRegisterHostConfigMixin(SubConfigRegisterSettingsMixin):
    """For the config of a model built around one vision tower or backbone of any of our families (a VLM's
    ``vision_config``, a depth or segmentation model's ``backbone_config``): that sub-config is ours and holds the
    register settings (``register_config``). Mixed in before the host's config class, which it gives no fields: a
    loaded host's config becomes one in place (`ttreg_hf.modeling.registers.adopt`). A sub-config given as a dict is
    built as the config class of ours its ``model_type`` names, so this resolves where the Auto classes do not know
    ours (the remote code)."""

    def __post_init__(self, **kwargs):
        ours = {}
        for config_class in subclasses(RegisterSettingsMixin):
            if getattr(config_class, "model_type", None):
                ours.setdefault(config_class.model_type, config_class)
        for key in self.sub_configs:
            value = getattr(self, key, None)
            if isinstance(value, dict) and value.get("model_type") in ours:
                setattr(self, key, ours[value["model_type"]](**value))
        super().__post_init__(**kwargs)
        _name_our_architectures(self)

    @property
    def register_config_key(self) -> str:
        """The key of the one sub-config that is ours."""
        # a tower's config holds its own settings (in the remote code, it may be of the modeling file's copy of ours)
        keys = [
            key for key in self.sub_configs if getattr(getattr(self, key, None), "register_config", None) is not None
        ]
        if len(keys) != 1:
            raise TTRegTypeError(
                f"A {type(self).__name__} has one sub-config of a test-time-register config class, the tower's; this "
                f"one has {len(keys)}: build the model with `load_vlm`, or upgrade a loaded one with "
                "`to_test_time_registers`."
            )
        return keys[0]


# parent class name -> ours ("DeiTForImageClassificationWithTeacher" -> "DeiTTTRegForImageClassificationWithTeacher"),
# filled by `ttreg_hf.family.register_auto_classes`: a parent model upgraded in place (`to_test_time_registers`) saves our
# config with its own class name in ``architectures``, by which an Auto class with several classes for one config
# (DeiT's two classifiers) picks one
ARCHITECTURES: dict[str, str] = {}


def _name_our_architectures(config) -> None:
    """``config.architectures`` with our class for each parent class."""
    if config.architectures:
        config.architectures = [ARCHITECTURES.get(name, name) for name in config.architectures]


def _neuron_lists(neurons: Mapping) -> dict[str, list[int]]:
    """A register-neuron index as a config stores it (JSON's form): ``{"layer": [neuron, ...]}``, normalized."""
    return {str(layer): list(ids) for layer, ids in normalize_neurons(neurons).items()}


def _fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}


def _relabelled_config_dict(cls, parent, *args, **kwargs):
    """The parent's config dict (``parent``: ``super()`` of ``cls``), its ``model_type`` (or its ``base_config_key``
    part's) relabelled as ours: loading a parent checkpoint is what these classes are for, not a mismatch to warn
    about."""
    config_dict, kwargs = parent.get_config_dict(*args, **kwargs)
    parent_type = parent.model_type
    for part in (config_dict, config_dict.get(cls.base_config_key or "") or {}):
        if part.get("model_type") == parent_type:
            part["model_type"] = cls.model_type
    return config_dict, kwargs


REGISTER_SETTINGS = tuple(field.name for field in dataclasses.fields(RegisterSettingsMixin))
_ENDS_INIT = REGISTER_SETTINGS[-1]  # the constructor writes the register settings in order: this one last
_INDEX_GIVEN = "_register_index_given"  # an index file given to the constructor, until `__post_init__` reads it
_DEFAULT_SEMANTICS = next(
    f.default for f in dataclasses.fields(RegisterSettingsMixin) if f.name == "register_semantics"
)


def pop_register_settings(kwargs: dict) -> dict:
    """The test-time-register fields (`REGISTER_SETTINGS`) among ``kwargs``, removed from it."""
    return {name: kwargs.pop(name) for name in REGISTER_SETTINGS if name in kwargs}
