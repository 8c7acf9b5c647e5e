"""Named checkpoints: `load_tt_model` names and the torch.hub entries (``hubconf.py`` re-exports them).

Both are derived from the families' `Checkpoint` declarations (`ttreg_hf.family`): the entry ``{name}_tt_reg`` is a
thin factory over the checkpoint's loader, as each of facebookresearch/dinov2's ``hub/backbones.py`` entries is over
one builder. The register-neuron index is ``register_neurons`` (a dict, an index file or a shipped index name) if
given, else the shipped one for that checkpoint, else an error that says how to make one. Unknown keyword arguments
are a `TypeError` that names the closest valid one, as in upstream's entries.
"""

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from . import planted  # noqa: F401  (registers the planted checkpoint, a name like the families')
from .errors import TTRegTypeError, TTRegValueError
from .family import Checkpoint
from .images import PREPROCESSOR_FILE, Preprocessor
from .registry import checkpoints, closest_checkpoint, families, family_of

ENTRY_SUFFIX = "_tt_reg"


def load_tt_model(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    register_neurons=None,
    **settings,
) -> nn.Module:
    """The test-time-register model of the checkpoint called ``name`` (see `model_names`), in eval mode.

    ``pretrained=False`` gives random weights (offline); ``weights`` is a local checkpoint in the upstream layout;
    ``settings`` are config fields such as ``num_test_time_registers`` or ``register_semantics``; the DINOv2 models
    compute upstream DINOv2's numerics unless ``position_interpolation="transformers"`` (see `Dinov2TTRegConfig`).
    """
    checkpoint = _checkpoint(name)
    loaded = _load(checkpoint, pretrained, weights=weights, register_neurons=register_neurons, **settings)
    return checkpoint.tower(loaded)


def _load(checkpoint: Checkpoint, pretrained, **kwargs) -> nn.Module:
    """What the torch.hub entry of ``checkpoint`` returns, in eval mode: the one call behind both ways in."""
    if not isinstance(pretrained, bool):  # "False" is true
        raise TTRegTypeError(f"pretrained must be True or False, got {pretrained!r}.")
    weights = kwargs.get("weights")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TTRegTypeError(f"weights must be the path of a local checkpoint (a str or a Path), got {weights!r}.")
    if weights is not None and Path(weights).is_dir():
        _check_same_family(weights, checkpoint)
    return checkpoint.load(pretrained=pretrained, **{"weights": None, "register_neurons": None, **kwargs}).eval()


def _check_same_family(weights: str | Path, checkpoint: Checkpoint) -> None:
    """Refuse a ``weights`` folder without a ``config.json``, or whose config names a model type of another family:
    `from_pretrained` would load none of its weights and return a random model."""
    from transformers import CONFIG_NAME, PreTrainedConfig

    family = next((family for family in families() if checkpoint in family.checkpoints), None)
    if family is None:  # a registered checkpoint: its loader takes the weights it can
        return
    if not (Path(weights) / CONFIG_NAME).is_file():
        raise TTRegValueError(
            f"weights {weights} is a folder without a {CONFIG_NAME}, so no checkpoint: give the folder "
            "`save_pretrained` wrote, or the checkpoint's file."
        )
    model_type = PreTrainedConfig.get_config_dict(str(weights))[0].get("model_type")
    known = family.model_types
    if model_type not in known:
        raise TTRegValueError(
            f"weights {weights} hold a {model_type!r} checkpoint, and {checkpoint.name} loads {', '.join(known)} "
            "checkpoints: none of its weights would load. Give weights of this model, or load that folder as a model "
            "of its own (its family's `from_pretrained`, or the folder as MODEL on the command line)."
        )


def _checkpoint(name: str) -> Checkpoint:
    known = checkpoints()
    if name not in known:
        raise TTRegValueError(f"Unknown model {name!r}{closest_checkpoint(name)}; the names: {', '.join(known)}.")
    return known[name]


def model_names() -> tuple[str, ...]:
    """The names `load_tt_model` (and the CLI) know: every family's checkpoints, and the planted test bench's."""
    return tuple(checkpoints())


def checkpoint_preprocessor(
    name: str, model: nn.Module, image_size: int | None = None, weights: str | Path | None = None
) -> Preprocessor:
    """How images become the inputs of ``model``, loaded as the checkpoint called ``name`` (from ``weights``, if
    given): its own preprocessing, else its family's from the image processor saved beside ``weights`` or else the
    checkpoint's; ``image_size`` overrides the size."""
    checkpoint = _checkpoint(name)
    if checkpoint.preprocessing is not None:
        return checkpoint.preprocessing(image_size)
    saved = weights is not None and (Path(weights) / PREPROCESSOR_FILE).is_file()
    return family_of(model).preprocessor(model, weights if saved else checkpoint.image_processor, image_size)


def _entry(checkpoint: Checkpoint) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = True, **kwargs) -> nn.Module:
        return _load(checkpoint, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = checkpoint.entry_name
    entry.__doc__ = (
        f"{checkpoint.summary}\n\n``pretrained=False``: random weights (offline); ``weights``: a local checkpoint; "
        "``register_neurons``: a dict, an index file or a shipped index name; other keywords: config fields such as "
        "``num_test_time_registers`` (0 turns the edit off)."
    )
    return entry


def entry_points() -> dict[str, Callable[..., nn.Module]]:
    """``{"<name>_tt_reg": the torch.hub entry}`` for every named checkpoint."""
    return {checkpoint.entry_name: _entry(checkpoint) for checkpoint in checkpoints().values()}


def __getattr__(name: str):
    """The entries and `MODEL_NAMES`, built on first use (they import every family)."""
    if name == "MODEL_NAMES":
        return model_names()
    if ENTRY_SUFFIX in name and name in (entries := entry_points()):
        return entries[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
