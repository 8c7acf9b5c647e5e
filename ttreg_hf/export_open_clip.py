"""OpenCLIP exports in open_clip's own Hub layout, with the register-neuron index beside the weights.

The folder holds what `open_clip.push_to_hf_hub.save_for_hf` writes for a model (``open_clip_config.json`` from its
own `save_config_for_hf`: the model config and the preprocessing; ``open_clip_model.safetensors``: the whole CLIP
model's weights, unchanged), the index alone (`INDEX_FILENAME`: the repository is also an index repo id) and a model
card. `ttreg_hf.modeling.open_clip.create_model_and_transforms("hf-hub:owner/name")` (or ``"local-dir:folder"``)
loads it with its index; `open_clip.create_model_and_transforms` loads the same model without registers. The folder
rules are `ttreg_hf.export.export_model`'s: staged beside ``out``, moved in only when complete.
"""

import contextlib
import json
import logging
from functools import partial
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.factory import parse_model_name
from open_clip.pretrained import get_pretrained_cfg
from open_clip.push_to_hf_hub import save_config_for_hf
from open_clip.transformer import LayerNorm, LayerNormFp32
from torch import nn

from .export import ExportError, check_export_folder, published_index, write_staged
from .index import INDEX_FILENAME, RegisterNeuronIndex, write_safetensors
from .model_card import render_open_clip_card
from .modeling.open_clip import (
    OpenCLIPTTRegVisionTransformer,
    checkpoint_uses_quick_gelu,
    create_model_and_transforms,
    open_clip_model_config,
)
from .modeling.registers import IndexSpec, RegisterAppender

OPEN_CLIP_EXPORTED_FILES = frozenset({HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, INDEX_FILENAME, "README.md"})
SCALARS = (bool, int, float, str, type(None))
# the layer norms open_clip picks by its `precision=` argument (a load option, not the config): one architecture
PRECISION_VARIANTS = (LayerNorm, LayerNormFp32)
NOT_PLAIN = object()  # an attribute `_check_rebuilds` does not compare (a tensor, a module, a dict)


def export_open_clip(
    model: str | nn.Module,
    index: IndexSpec,
    out: str | Path,
    *,
    pretrained: str | None = None,
    model_config: str | dict | None = None,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out``, ready for `huggingface_hub.upload_folder`, in open_clip's layout (see the module docstring).

    ``model`` is an open_clip model name as open_clip takes it (``"ViT-B-16"`` with ``pretrained`` a tag or a local
    checkpoint file, ``"hf-hub:owner/name"``, ``"local-dir:folder"``), loaded here with ``index``; or a loaded open_clip
    model whose vision tower holds ``index``'s neurons, with ``model_config``: the config it was built from, a dict or
    an open_clip model name (with ``pretrained``). A name's config gets ``quick_gelu`` for weights open_clip marks so
    (OpenAI's), as this package's loader builds them; before anything is moved into ``out``, open_clip builds a model
    from the written config, which must be the model's architecture exactly. ``index`` is an index file, shipped name
    or Hub repo id (not a plain dict); ``base_model`` (default: the Hub repository of the pretrained weights, else the
    index's HF checkpoint) picks the default ``license``; ``repo_id`` goes into the card's usage examples.

    ``out`` must be new or empty; with ``overwrite``, a folder holding only files this export writes
    (`OPEN_CLIP_EXPORTED_FILES`) is rewritten, any other file is refused and never touched. The folder of the weights
    (``local-dir:``, a ``pretrained`` file's) is always refused.
    """
    out = Path(out)
    check_export_folder(out, overwrite, source=_source_folder(model, pretrained), exported=OPEN_CLIP_EXPORTED_FILES)
    index = published_index(index)
    if isinstance(model, str):
        if model_config is not None:
            raise ExportError("model_config is for a loaded model; a model name brings its own config.")
        name, config = model, _named_config(model, pretrained)
        model = _load(model, pretrained, index)
    else:
        name = model_config if isinstance(model_config, str) else None
        config = _config_of_loaded(model, index, model_config, pretrained)
    if base_model is None:
        base_model = _weights_repo(name, pretrained) or index.checkpoints.get("hf")
    write = partial(_write, model, config, index, base_model=base_model, license=license, repo_id=repo_id)
    return write_staged(out, write)


def _write(model: nn.Module, model_config: dict, index: RegisterNeuronIndex, folder: Path, **card) -> None:
    save_config_for_hf(model, folder / HF_CONFIG_NAME, model_config=model_config)
    _check_rebuilds(model, folder)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    write_safetensors(weights, folder / HF_SAFE_WEIGHTS_NAME, {"format": "pt"})
    index.save(folder / INDEX_FILENAME)
    card["repo_id"] = card["repo_id"] or "<user>/<repo>"
    text = render_open_clip_card(
        model.visual.config, index, config_file=HF_CONFIG_NAME, weights_file=HF_SAFE_WEIGHTS_NAME, **card
    )
    (folder / "README.md").write_text(text)


def _source_folder(model, pretrained) -> Path | None:
    """The local folder the weights come from, which an export must never write into."""
    if isinstance(model, str):
        schema, source = parse_model_name(model)
        if schema == "local-dir":
            return Path(source)
    return Path(pretrained).parent if pretrained and Path(pretrained).is_file() else None


def _named_config(model_name: str, pretrained: str | None) -> dict:
    """open_clip's model config of ``model_name``, with ``quick_gelu`` where the ``pretrained`` weights need it."""
    config = open_clip_model_config(model_name)
    if checkpoint_uses_quick_gelu(model_name, pretrained):
        config["quick_gelu"] = True
    return config


def _load(model_name: str, pretrained: str | None, index: RegisterNeuronIndex) -> nn.Module:
    """The open_clip model ``model_name`` with ``pretrained`` weights, loaded with ``index``; a tag open_clip does
    not know is refused before anything is downloaded."""
    schema, _ = parse_model_name(model_name)
    if pretrained and (schema or not (get_pretrained_cfg(model_name, pretrained) or Path(pretrained).is_file())):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ExportError(
            f"{pretrained!r} is not a pretrained tag of {model_name!r} (tags: {tags}) nor a checkpoint file"
            + (f"; a {schema}: model brings its own weights." if schema else ".")
        )
    try:
        model, _, _ = create_model_and_transforms(model_name, pretrained, register_neurons=index)
    except RuntimeError as error:  # open_clip's failures to download or load the weights
        raise ExportError(f"open_clip could not load {model_name!r} ({pretrained}): {error}") from error
    return model


def _config_of_loaded(model: nn.Module, index: RegisterNeuronIndex, model_config, pretrained) -> dict:
    """The model config of a loaded model, once its tower is checked to be ours with ``index``'s neurons."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, OpenCLIPTTRegVisionTransformer):
        raise ExportError(
            f"Cannot export a {type(model).__name__}: pass an open_clip model name, or an open_clip model whose "
            "`visual` is ttreg_hf's (`ttreg_hf.modeling.open_clip.to_test_time_registers(model, index)`)."
        )
    if not getattr(visual, "preprocess_cfg", None):
        raise ExportError(
            "The model has no preprocessing config (it was not built by open_clip.create_model): set the one of its "
            "weights with `open_clip.model.set_model_preprocess_cfg(model, {...})`."
        )
    index.check_fits(visual.config.num_hidden_layers, visual.config.mlp_width)
    if visual.config.register_neuron_index != index.neurons:
        raise ExportError(
            "The model's register neurons are not the index's: call `model.visual.set_register_neurons(index)`."
        )
    if isinstance(model_config, str):
        return _named_config(model_config, pretrained)
    if not isinstance(model_config, dict):
        raise ExportError(
            "A loaded model needs model_config=: the open_clip config it was built from (a dict, or its model name, "
            'e.g. "ViT-B-16" with pretrained="openai"); open_clip rebuilds the model from it.'
        )
    try:
        return json.loads(json.dumps(model_config))  # what open_clip will read back
    except (TypeError, ValueError) as error:
        raise ExportError(f"model_config must be JSON (it is written as {HF_CONFIG_NAME}): {error}") from error


def _weights_repo(model_name: str | None, pretrained: str | None) -> str | None:
    """The Hub repository of open_clip weights: the ``hf-hub:`` one, or the pretrained tag's ``hf_hub``."""
    if model_name is None:
        return None
    schema, source = parse_model_name(model_name)
    if schema == "hf-hub":
        return source
    hub_location = get_pretrained_cfg(model_name, pretrained).get("hf_hub", "") if pretrained and not schema else ""
    return "/".join(hub_location.split("/")[:2]) or None


def _check_rebuilds(model: nn.Module, folder: Path) -> None:
    """Raise unless open_clip, from ``folder``'s ``open_clip_config.json``, builds ``model``'s architecture: the same
    state-dict keys and shapes, and module by module the same class (ours subclass open_clip's), ``extra_repr`` and
    plain attributes (pooling, image size, activation, preprocessing...). Built on the meta device: no weights."""
    try:
        with _quiet_open_clip(), torch.device("meta"):
            rebuilt = open_clip.create_model(
                f"local-dir:{folder}", load_weights=False, pretrained_text=False, device="meta"
            )
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as error:
        raise ExportError(f"open_clip cannot build a model from this model_config: {error}") from error
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    expected = {name: tuple(tensor.shape) for name, tensor in rebuilt.state_dict().items()}
    if shapes != expected:
        differing = sorted(set(shapes.items()) ^ set(expected.items()))[:3]
        raise ExportError(
            f"The model_config builds other weights than the model's (e.g. {differing}): pass the config the model "
            "was built from."
        )
    modules = dict(model.named_modules())
    for name, theirs in rebuilt.named_modules():
        ours = modules.get(name)
        ours = ours.module if isinstance(ours, RegisterAppender) else ours  # our wrapper of open_clip's module
        difference = _difference(ours, theirs)
        if difference:
            hint = ' (OpenAI weights need "quick_gelu": true)' if "GELU" in difference else ""
            raise ExportError(
                f"open_clip would build {name or 'the model'} from this model_config with {difference}: pass the "
                f"config the model was built from{hint}."
            )


def _difference(ours: nn.Module | None, theirs: nn.Module) -> str | None:
    same_but_precision = isinstance(ours, PRECISION_VARIANTS) and isinstance(theirs, PRECISION_VARIANTS)
    if not (isinstance(ours, type(theirs)) or same_but_precision):
        return f"a {type(theirs).__name__}, not the model's {type(ours).__name__}"
    if ours.extra_repr() != theirs.extra_repr():
        return f"({theirs.extra_repr()}), not the model's ({ours.extra_repr()})"
    for key, value in vars(theirs).items():
        if key.startswith("_") or key == "training" or _plain(value) is NOT_PLAIN:
            continue
        if _plain(getattr(ours, key, NOT_PLAIN)) != _plain(value):
            return f"{key}={value!r}, not the model's {getattr(ours, key, None)!r}"
    return None


def _plain(value):
    """A scalar, or a list or tuple of them as a tuple (JSON gives lists where the model has tuples); else
    `NOT_PLAIN`."""
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(item, SCALARS) for item in value):
        return tuple(value)
    return NOT_PLAIN


class _NoRandomInitMessage(logging.Filter):
    """Drops open_clip's message (root logger) that a model built without weights is "initialized randomly": true,
    and beside the point of a meta-device build. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip's model building without its "initialized randomly" message (and nothing else silenced)."""
    quiet = _NoRandomInitMessage()
    logging.root.addFilter(quiet)
    try:
        yield
    finally:
        logging.root.removeFilter(quiet)
