"""What a model family declares: `Family`, its `Checkpoint`s, and its registration with `transformers`.

A family module (``ttreg_hf/modeling/<family>.py``) ends with its declaration, ``FAMILIES = (Family(...), ...)``, and,
for `transformers` families, ``register_auto_classes(*FAMILIES)``: importing the module is what makes the Auto classes
build its classes and lets them load their parents' checkpoints, whatever was imported before. Every table of the
package (the CLI's folder loading, export, the analysis tools, planting, the torch.hub entries) is derived from the
declarations by `ttreg_hf.registry`. This module is the core the families build on: it imports no family.
"""

import contextlib
import dataclasses
import difflib
import inspect
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from torch import nn

from .errors import TTRegError, TTRegTypeError, TTRegValueError
from .images import Preprocessor, transformers_preprocessing


@dataclass(frozen=True)
class Checkpoint:
    """A named pretrained model: a `load_tt_model` name and a torch.hub entry (``{name}_tt_reg`` unless ``entry``).

    load: ``load(pretrained=..., weights=..., register_neurons=..., **settings)`` -> what the torch.hub entry returns.
    tower: what `load_tt_model` returns of that object: the test-time-register model (by default, the object).
    image_processor: where the checkpoint's preprocessing comes from: a Hugging Face id whose image processor it is,
        or a function returning the processor the checkpoint's authors document (`None`: the family's).
    preprocessing: ``preprocessing(image_size)`` -> the `ttreg_hf.images.Preprocessor` of a checkpoint whose images
        are prepared by hand (the planted model's), instead of its family's from ``image_processor``.
    aliases: other libraries' names of the same weights (timm's ``vit_large_patch14_dinov2``), whose shipped index
        is this checkpoint's.
    """

    name: str
    summary: str
    load: Callable
    tower: Callable = lambda model: model
    image_processor: str | Callable | None = None
    entry: str | None = None
    preprocessing: Callable[[int | None], Preprocessor] | None = None
    aliases: tuple[str, ...] = ()

    @property
    def entry_name(self) -> str:
        return self.entry or f"{self.name}_tt_reg"


AutoClassDeclaration = tuple[str, type | tuple[type, ...]]  # ("AutoModelForImageClassification", the class(es))
# class -> the names of the Auto classes that build it, in declaration order: filled by `register_auto_classes`
AUTO_CLASS_NAMES: dict[type, dict[str, None]] = {}


@dataclass(frozen=True)
class Family:
    """Everything the package knows about one model family.

    name: a short name (``"dinov2"``).
    model_classes: the family's classes; the first is the base model (`AutoModel`'s, the one the CLI loads folders
        as). Each subclasses its parent class (`parent_class`): the towers (base model, backbone) declare their
        ``register_seams``, the others (classifiers, `CLIPModel`) hold one (`WithRegisterTowerMixin`).
    auto_classes: for `transformers` families, ``(auto class name, class)`` pairs: where each class stands in the
        Auto classes, as its parent does (`register_auto_classes`); DeiT's two classifiers stand there as a pair.
    checkpoint_model_types: the ``model_type``s of ``config.json`` files whose checkpoints load as this family
        (the parent's, and composite models' such as ``"clip"``); ours (the config classes') are added.
    attention_reader: ``reader(block, hidden_states, **block_kwargs)`` -> the block's attention probabilities
        ``(batch, heads, tokens, tokens)``, recomputed from its input for the analysis tools (`None`: no maps); with
        ``num_queries=n``, only the rows of the first ``n`` query tokens ``(batch, heads, n, tokens)`` (the CLS row's
        is all some measures need); with ``keys_only=True``, the attention's keys ``(batch, tokens, heads *
        head_dim)`` instead.
    planting_sites: ``planting_sites(model)`` -> the `ttreg_hf.modeling.sites.PlantingSites` of a model of the
        family or of its parent (`None`: no planting).
    preprocessing: ``preprocessing(model, source, image_size)`` -> the `ttreg_hf.images.Preprocessor` that turns
        images into the model's inputs, from ``source`` (a folder, a Hub id, a `Checkpoint`'s processor, or `None`).
        `transformers` families declare ``default_image_processor`` instead (see `preprocessor`).
    checkpoints: the named checkpoints, each a torch.hub entry.
    default_image_processor: for `transformers` families, ``default_image_processor(config)`` -> the processor the
        parent's checkpoints ship, for a folder without one (a fallback that warns) and for exports.
    padding_mask: the forward argument that marks the real patches of a padded batch (SigLIP2's NaFlex), if any.
    licences: ``{Hub id prefix: licence}`` of the family's published weights, for the model cards of exports.
    """

    name: str
    model_classes: tuple[type, ...]
    auto_classes: tuple[AutoClassDeclaration, ...] = ()
    checkpoint_model_types: tuple[str, ...] = ()
    attention_reader: Callable | None = None
    planting_sites: Callable | None = None
    preprocessing: Callable | None = None
    checkpoints: tuple[Checkpoint, ...] = ()
    default_image_processor: Callable | None = None
    padding_mask: str | None = None
    licences: Mapping[str, str] = field(default_factory=dict)
    parents: tuple[type, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "parents", tuple(parent_class(cls) for cls in self.model_classes))

    @property
    def model_class(self) -> type:
        return self.model_classes[0]

    @property
    def config_class(self) -> type | None:
        """The `transformers` config class (`None` for towers without one: OpenCLIP, timm)."""
        return getattr(self.model_class, "config_class", None)

    @property
    def model_types(self) -> tuple[str, ...]:
        """The ``model_type``s of the checkpoints that load as this family: the parents' and ours."""
        configs = (getattr(cls, "config_class", None) for cls in self.model_classes)
        own = dict.fromkeys(config.model_type for config in configs if config is not None)
        return (*self.checkpoint_model_types, *own)

    def preprocessor(self, model: nn.Module, source=None, image_size: int | None = None) -> Preprocessor:
        """How images become ``model``'s inputs, from ``source`` (see ``preprocessing``); ``image_size`` overrides
        the size. A `transformers` family reads the image processor of ``source``, else falls back, with a warning,
        to its ``default_image_processor``."""
        if self.default_image_processor is not None:
            return transformers_preprocessing(model, source, image_size, self.default_image_processor, self.name)
        if self.preprocessing is None:
            raise NotImplementedError(f"The {self.name} family declares no preprocessing.")
        return self.preprocessing(model, source, image_size)


def parent_class(cls: type) -> type:
    """The class a test-time-register class subclasses: the first class of its MRO not defined in ttreg_hf (the
    package's mixins and classes are skipped, so a subclass of one of ours has the same parent)."""
    return next(base for base in cls.__mro__[1:] if not base.__module__.startswith(f"{__package__}."))


def register_auto_classes(*families: Family) -> None:
    """Make `transformers` build each family's classes wherever its declaration puts them, and load their parents'
    checkpoints into them.

    Through `transformers`' public API: `AutoConfig.register` for each config class's ``model_type``, each declared
    Auto class's ``register``, and `register_checkpoint_conversion_mapping` with the parent's key conversions (by
    class name, and by ``model_type``), so a checkpoint saved in an older key layout loads every weight. Idempotent.
    """
    import transformers
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    from .configs.registers import ARCHITECTURES

    for family in families:
        if not issubclass(family.model_class, transformers.PreTrainedModel):
            continue
        for model_class, parent in zip(family.model_classes, family.parents):
            ARCHITECTURES[parent.__name__] = model_class.__name__
            config_class = model_class.config_class
            transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            own_keys = (model_class.__name__, config_class.model_type)
            for own, parents in zip(own_keys, (parent.__name__, parent.config_class.model_type)):
                conversions = get_checkpoint_conversion_mapping(parents)
                if conversions is not None:
                    register_checkpoint_conversion_mapping(own, conversions, overwrite=True)
        for auto_name, classes in family.auto_classes:
            model_classes = classes if isinstance(classes, tuple) else (classes,)
            auto_class = getattr(transformers, auto_name)
            auto_class.register(model_classes[0].config_class, classes, exist_ok=True)
            for model_class in model_classes:
                AUTO_CLASS_NAMES.setdefault(model_class, {})[auto_name] = None


def transformers_checkpoint(name: str, summary: str, model_class: type, hub_id: str, arch: dict, **model_kwargs):
    """A `Checkpoint` of a `transformers` family: ``hub_id`` (or the local folder ``weights``) through
    ``model_class.from_pretrained``, or with ``pretrained=False`` the architecture ``arch`` with random weights;
    ``model_kwargs`` go to the model (e.g. ``add_pooling_layer=False``). Its preprocessing is ``hub_id``'s processor."""
    load = partial(_load_transformers, name, model_class, hub_id, arch, model_kwargs)
    return Checkpoint(name, summary, load, image_processor=hub_id)


def _load_transformers(
    name, model_class, hub_id, arch, model_kwargs, *, pretrained, weights, register_neurons, **settings
) -> nn.Module:
    if weights is not None and Path(weights).is_file():  # `from_pretrained` would read it as a config.json
        raise TTRegValueError(
            f"weights {weights} is a file, and {name} loads a Hugging Face checkpoint folder (config.json and "
            "model.safetensors, as `save_pretrained` writes them): give that folder."
        )
    if pretrained or weights:  # `from_pretrained` checks its keyword arguments itself
        source = weights or hub_id
        return model_class.from_pretrained(source, register_neurons=register_neurons, **model_kwargs, **settings)
    config_class = model_class.config_class
    fields = {field.name for field in dataclasses.fields(config_class)}
    check_keywords(settings, {*fields, *CONFIG_KEYWORDS, *LOADER_ARGUMENTS}, f"{name}_tt_reg")
    config = config_class(**{**arch, **settings})  # a field given overrides the architecture's, as in `from_pretrained`
    config.attach_register_neurons(
        register_neurons, checkpoint=name, register_semantics=settings.get("register_semantics")
    )
    return model_class._from_config(config, **model_kwargs)  # built in ``config.dtype``, as `from_config` builds


LOADER_ARGUMENTS = ("pretrained", "weights", "register_neurons")  # what every checkpoint loader takes besides settings
# what a `transformers` config takes besides its fields, as `from_pretrained` and `from_config` take them: the attention,
# and the older name of ``dtype``
CONFIG_KEYWORDS = ("attn_implementation", "torch_dtype")


def check_keywords(given: Iterable[str], valid: Collection[str], callee: str) -> None:
    """Raise `TypeError`, as Python does for an unexpected keyword argument, naming the closest valid one."""
    for name in given:
        if name not in valid:
            raise TTRegTypeError(f"{callee}() got an unexpected keyword argument {name!r}{closest_name(name, valid)}")


MOST_NAMES_LISTED = 30  # a refusal of an unknown keyword lists the valid ones up to this many


def closest_name(name: str, valid: Collection[str]) -> str:
    """The end of a message refusing ``name``: "; did you mean 'x'?" with the closest of ``valid``, else the list (a
    long one, such as a config's fields and `from_pretrained`'s keywords, only counted)."""
    close = difflib.get_close_matches(name, sorted(valid), n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    if len(valid) > MOST_NAMES_LISTED:
        return f"; none of the {len(valid)} it takes is close to it (its documentation lists them)."
    return f"; valid ones: {', '.join(sorted(valid))}."


def check_close_keywords(given: Mapping | Iterable[str], known: Collection[str], callee: str) -> None:
    """Raise `TypeError` for a keyword argument that is not in ``known`` but close to one of them (a typo of a
    setting): for loaders that pass the other keyword arguments on to a library that checks them itself."""
    for name in given:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.85)
        if name not in known and close:
            raise TTRegTypeError(f"{callee}() got an unexpected keyword argument {name!r}; did you mean {close[0]!r}?")


@contextlib.contextmanager
def closest_keyword_on_error(given: Collection[str], valid: Collection[str], callee: str) -> Iterator[None]:
    """Around a call that passes the keyword arguments ``given`` on to a library that refuses an unknown one with a
    plain `TypeError` ("... got an unexpected keyword argument 'x'"): that refusal, for one of ``given``, becomes
    `check_keywords`'s, which names the closest of ``valid``."""
    try:
        yield
    except TypeError as error:
        unexpected = re.search(r"unexpected keyword argument '([^']+)'", str(error))
        if isinstance(error, TTRegError) or unexpected is None or unexpected[1] not in given:
            raise
        check_keywords([unexpected[1]], set(valid) - {unexpected[1]}, callee)


def parameter_names(*functions: Callable) -> set[str]:
    """The named parameters of ``functions`` (no ``*args`` / ``**kwargs``): the keywords a library call takes."""
    return {
        name
        for function in functions
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }
