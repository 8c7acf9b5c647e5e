"""Model families: what ttreg_hf knows about each, declared once in the family's own module.

A family module (``ttreg_hf/modeling/<family>.py``) ends with ``FAMILIES = (Family(...), ...)``: its model classes,
the parent checkpoints' ``model_type``s, its attention reader, its planting sites, where its images' preprocessing
comes from and its named checkpoints. Every table of the package — the Auto-class registrations, the CLI's folder
loading, export, the analysis tools' attention maps, planting, the torch.hub entries, the benchmarks — is derived
from these declarations (`families`, `family_of`), so a new family is its module, a line in `FAMILY_MODULES`, its
public names in ``ttreg_hf/__init__.py`` and its tiny model in ``tests/family_models.py`` (which puts it through every
contract test). A family of your own, outside the package, is added with `register_family`.
"""

import contextlib
import difflib
import functools
import importlib
import inspect
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .errors import TTRegError, TTRegTypeError, TTRegValueError

# the package's family modules, under ``ttreg_hf.modeling``, each with the library whose models it subclasses
FAMILY_MODULES = {
    "dinov2": "transformers",
    "clip": "transformers",
    "siglip": "transformers",
    "vit": "transformers",
    "dinov3": "transformers",
    "open_clip": "open_clip",  # optional dependencies: their families are there when they are installed
    "timm": "timm",
}


@dataclass(frozen=True)
class Checkpoint:
    """A named pretrained model: a `load_tt_model` name and a torch.hub entry (``{name}_tt_reg`` unless ``entry``).

    load: ``load(pretrained=..., weights=..., register_neurons=..., **settings)`` -> what the torch.hub entry returns.
    tower: what `load_tt_model` returns of that object: the test-time-register model (by default, the object).
    image_processor: where the checkpoint's preprocessing comes from: a Hugging Face id whose image processor it is,
        or a function returning the processor the checkpoint's authors document (`None`: the family's).
    """

    name: str
    summary: str
    load: Callable
    tower: Callable = lambda model: model
    image_processor: str | Callable | None = None
    entry: str | None = None

    @property
    def entry_name(self) -> str:
        return self.entry or f"{self.name}_tt_reg"


@dataclass(frozen=True)
class Family:
    """Everything the package knows about one model family.

    name: a short name (``"dinov2"``).
    model_classes: the family's classes; the first is the base model (`AutoModel`'s, the one the CLI loads folders
        as). Each subclasses its parent class (`parent_class`): the towers (base model, backbone) declare their
        ``register_seams``, the others (classifiers, `CLIPModel`) hold one (`WithRegisterTowerMixin`).
    checkpoint_model_types: the ``model_type``s of ``config.json`` files whose checkpoints load as this family
        (the parent's, and composite models' such as ``"clip"``); ours (the config classes') are added.
    attention_reader: ``reader(block, hidden_states, **block_kwargs)`` -> the block's attention probabilities
        ``(batch, heads, tokens, tokens)``, recomputed from its input for the analysis tools (`None`: no maps).
    planting_sites: ``planting_sites(model)`` -> the `ttreg_hf.planted.PlantingSites` of a model of the family or
        of its parent (`None`: no planting).
    preprocessing: ``preprocessing(model, source)`` -> the `ttreg_hf.images.Preprocessor` that turns images into
        the model's inputs, from ``source`` (a folder, a Hub id, a `Checkpoint`, or `None`).
    checkpoints: the named checkpoints, each a torch.hub entry.
    default_image_processor: for `transformers` families, ``default_image_processor(config)`` -> the processor the
        parent's checkpoints ship, for a folder without one (a fallback that warns) and for exports.
    padding_mask: the forward argument that marks the real patches of a padded batch (SigLIP2's NaFlex), if any.
    """

    name: str
    model_classes: tuple[type, ...]
    checkpoint_model_types: tuple[str, ...] = ()
    attention_reader: Callable | None = None
    planting_sites: Callable | None = None
    preprocessing: Callable | None = None
    checkpoints: tuple[Checkpoint, ...] = ()
    default_image_processor: Callable | None = None
    padding_mask: str | None = None
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


def parent_class(cls: type) -> type:
    """The class a test-time-register class subclasses: the first class of its MRO not defined in ttreg_hf (the
    package's mixins and classes are skipped, so a subclass of one of ours has the same parent)."""
    return next(base for base in cls.__mro__[1:] if not base.__module__.startswith(f"{__package__}."))


_REGISTERED: list[Family] = []


def register_family(family: Family) -> Family:
    """Add a family of your own (one not in `FAMILY_MODULES`): the analysis tools and planting then know it.
    Registering a name again replaces that family (a re-run notebook cell, a re-imported module); the package's own
    names are taken."""
    if any(
        known.name == family.name for library in set(FAMILY_MODULES.values()) for known in _package_families(library)
    ):
        raise TTRegValueError(f"{family.name!r} is the name of one of the package's families: choose another.")
    _REGISTERED[:] = [known for known in _REGISTERED if known.name != family.name] + [family]
    return family


@functools.cache
def _package_families(library: str) -> tuple[Family, ...]:
    declared = []
    for name in (name for name, subclassed in FAMILY_MODULES.items() if subclassed == library):
        try:
            module = importlib.import_module(f"{__package__}.modeling.{name}")
        except ModuleNotFoundError as error:  # an optional dependency that is not installed
            if error.name != library or library == "transformers":
                raise
            continue
        if not hasattr(module, "FAMILIES"):  # imported from within its own import
            raise ImportError(f"cannot read FAMILIES from partially initialized module {module.__name__!r}")
        declared.extend(module.FAMILIES)
    return tuple(declared)


def families() -> tuple[Family, ...]:
    """Every family: the package's (those whose library is installed) and those registered."""
    return (
        *(f for library in dict.fromkeys(FAMILY_MODULES.values()) for f in _package_families(library)),
        *_REGISTERED,
    )


def transformers_families() -> tuple[Family, ...]:
    """The families whose model classes are `transformers` models (imports no other library's families)."""
    from transformers import PreTrainedModel

    candidates = (*_package_families("transformers"), *_REGISTERED)
    return tuple(family for family in candidates if issubclass(family.model_class, PreTrainedModel))


def family_of(model_or_class: object) -> Family | None:
    """The family of a model (or class) of the package, or of its parent class: the nearest class in its MRO."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    by_class = {}
    for family in reversed(families()):  # the first declaration wins
        by_class.update(dict.fromkeys((*family.model_classes, *family.parents), family))
    return next((by_class[base] for base in cls.__mro__ if base in by_class), None)


def family_of_model_type(model_type: str) -> Family | None:
    """The family whose checkpoints have this ``config.json`` ``model_type`` (the parent's or ours)."""
    return next((family for family in transformers_families() if model_type in family.model_types), None)


def checkpoints() -> dict[str, Checkpoint]:
    """Every named checkpoint of every family, by name."""
    return {checkpoint.name: checkpoint for family in families() for checkpoint in family.checkpoints}


LOADER_ARGUMENTS = ("pretrained", "weights", "register_neurons")  # what every checkpoint loader takes besides settings


def check_keywords(given: Iterable[str], valid: Collection[str], callee: str) -> None:
    """Raise `TypeError`, as Python does for an unexpected keyword argument, naming the closest valid one."""
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, sorted(valid), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid ones: {', '.join(sorted(valid))}."
            raise TTRegTypeError(f"{callee}() got an unexpected keyword argument {name!r}{hint}")


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
