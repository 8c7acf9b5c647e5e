"""The registry: every family the package knows, read from the declarations of its family modules.

`families`, `family_of` and `checkpoints` are what the applications (the CLI, discovery, export, the analysis tools,
the torch.hub entries) read; a family of your own, outside the package, joins with `register_family`, and a named
checkpoint of your own (or of an application: the planted test bench) with `register_checkpoint`.
"""

import difflib
import functools
import importlib

from .errors import TTRegValueError
from .family import Checkpoint, Family, register_auto_classes

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

_REGISTERED: list[Family] = []
_CHECKPOINTS: dict[str, Checkpoint] = {}  # registered beside the families' (`register_checkpoint`)


def register_family(family: Family) -> Family:
    """Add a family of your own (one not in `FAMILY_MODULES`): the analysis tools, planting and, for `transformers`
    classes with declared ``auto_classes``, the Auto classes then know it. Registering a name again replaces that
    family (a re-run notebook cell, a re-imported module); the package's own names are taken."""
    if any(
        known.name == family.name for library in set(FAMILY_MODULES.values()) for known in _package_families(library)
    ):
        raise TTRegValueError(f"{family.name!r} is the name of one of the package's families: choose another.")
    register_auto_classes(family)
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


def register_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    """Add a named checkpoint beside the families' (a `load_tt_model` name, a CLI MODEL and a torch.hub entry), one
    whose loader lives above the families: the planted test bench's (`ttreg_hf.planted`), a model of your own.
    Registering a name again replaces that checkpoint; the families' names are taken."""
    if any(checkpoint.name == known.name for family in families() for known in family.checkpoints):
        raise TTRegValueError(f"{checkpoint.name!r} names a checkpoint of a family: choose another name.")
    _CHECKPOINTS[checkpoint.name] = checkpoint
    return checkpoint


def checkpoints() -> dict[str, Checkpoint]:
    """Every named checkpoint, by name: every family's, then those registered (`register_checkpoint`)."""
    declared = {checkpoint.name: checkpoint for family in families() for checkpoint in family.checkpoints}
    return {**declared, **_CHECKPOINTS}


def closest_checkpoint(name: str) -> str:
    """A hint for an unknown checkpoint name: the name whose torch.hub entry ``name`` is, or the closest name."""
    known = checkpoints()
    entries = {checkpoint.entry_name: checkpoint.name for checkpoint in known.values()}
    if name in entries:
        return f"; {name!r} is the torch.hub entry of {entries[name]!r}, the name to give here"
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def licence_of(checkpoint_id: str) -> str | None:
    """The licence a family declares for the published weights ``checkpoint_id`` (a Hub id), if any."""
    return next(
        (licence for f in families() for prefix, licence in f.licences.items() if checkpoint_id.startswith(prefix)),
        None,
    )
