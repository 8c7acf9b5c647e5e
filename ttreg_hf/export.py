"""Hub-ready exports: a folder that loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` alone.

The remote code is the family's, generated once from the package's own modules (`ttreg_hf.remote_code`). Every
`transformers` family exports; what a family's checkpoints are loaded as, and the image processor a checkpoint
without one gets, come from its declaration (`ttreg_hf.family`). Everything is written into a staging folder beside
``out`` first and moved in only when all of it was made: a refused or failed export leaves ``out`` as it was.
"""

import copy
import errno
import glob
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

from huggingface_hub import constants as hub_constants
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import cached_file

from .errors import TTRegValueError
from .images import PREPROCESSOR_FILE
from .index import (
    INDEX_FILENAME,
    METADATA_KEY,
    RegisterNeuronIndex,
    RegisterNeuronIndexError,
    load_index,
    write_safetensors,
)
from .model_card import render_model_card
from .modeling.registers import IndexSpec
from .registry import family_of, family_of_model_type, transformers_families
from .remote_code import REMOTE_CODE_FILES, remote_auto_map, write_remote_code

EXPORTED_FILES = frozenset(
    {
        *REMOTE_CODE_FILES,
        "config.json",
        "model.safetensors",
        PREPROCESSOR_FILE,
        INDEX_FILENAME,
        "README.md",
    }
)


STAGING_MARK = ".ttreg-staging-"  # in the name of the hidden folder an export is written into before it moves


class ExportError(TTRegValueError):
    """A model or index that cannot be exported."""


def export_model(
    model: str | Path | PreTrainedModel,
    index: IndexSpec,
    out: str | Path,
    *,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out``, ready for `huggingface_hub.upload_folder`: config, remote code, weights, preprocessor, the
    index alone (`INDEX_FILENAME`: the repository is also an index repo id), card.

    ``model`` is a checkpoint id or folder of a `transformers` family (the parent's or ours), exported as the class it
    was saved as (a classifier keeps its head, a `CLIPModel` its text tower), or a loaded model of one of the
    package's `transformers` classes whose register neurons are ``index``'s. ``index`` is an index file or shipped name (a plain dict has no
    provenance to publish). ``base_model`` (default: ``model`` when an id, else the index's HF checkpoint) names the
    base checkpoint and picks the default ``license``; ``repo_id`` goes into the card's usage examples.

    ``out`` must be new or empty: an upload publishes everything in it. With ``overwrite``, a folder that holds only
    files an export writes (`EXPORTED_FILES`, e.g. an earlier export) is rewritten; any other file is refused, never
    touched. The parent checkpoint's own folder is always refused. The parent's ``preprocessor_config.json`` is
    copied unchanged; a parent without one (random weights) gets the family's default, with a warning that says so.
    """
    out = Path(out)
    check_export_folder(out, overwrite, source=model)
    index = published_index(index)
    model = _model_with_index(model, index)
    check_export_folder(out, overwrite, source=model.config.name_or_path)
    if base_model is None:
        base_model = _checkpoint_id(model) or index.checkpoints.get("hf")
    return write_staged(
        out, partial(_write_export, model, index, base_model=base_model, license=license, repo_id=repo_id)
    )


def write_staged(out: Path, write: Callable[[Path], None]) -> Path:
    """``write(staging)`` into a new hidden folder beside ``out`` (``.OUT.ttreg-staging-*``), then everything it wrote
    moved into ``out`` (`_move_in`): an export that fails while writing leaves ``out`` as it was (a file system's
    refusal is an `ExportError`). A staging folder that a killed export left beside or in ``out`` is removed first.
    Returns ``out``."""
    prefix = f".{out.name}{STAGING_MARK}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in [*out.parent.glob(f"{glob.escape(prefix)}*"), *out.glob(f"{glob.escape(STAGING_MARK)}*")]:
            shutil.rmtree(stale)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=prefix) as staging:
            write(Path(staging))
            out.mkdir(exist_ok=True)
            _move_in(Path(staging), out)
    except OSError as error:  # a full disk, a file system that refuses: the export's, not the model's
        raise ExportError(f"Could not write {out}: {error}.") from error
    return out


def _move_in(staging: Path, out: Path) -> None:
    """Rename every file of ``staging`` into ``out``. Where a rename would cross file systems (``out`` a mount point,
    a link to another disk), they are copied into a hidden folder in ``out`` first and renamed from there: a copy
    that fails (a full disk) leaves ``out``'s files as they were."""
    try:
        for path in sorted(staging.iterdir()):
            os.replace(path, out / path.name)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        with tempfile.TemporaryDirectory(dir=out, prefix=STAGING_MARK) as near:
            for path in staging.iterdir():
                shutil.copy2(path, Path(near) / path.name)
            _move_in(Path(near), out)


def _write_export(model, index: RegisterNeuronIndex, folder: Path, *, base_model, license, repo_id) -> None:
    write_remote_code(type(model), folder)
    _config_for_remote_code(model).save_pretrained(folder)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(index.to_json())}
    write_safetensors(weights, folder / "model.safetensors", metadata)
    _write_preprocessor_config(model, folder)
    index.save(folder / INDEX_FILENAME)
    (folder / "README.md").write_text(
        render_model_card(model, index, base_model=base_model, license=license, repo_id=repo_id or "<user>/<repo>")
    )


def check_export_folder(out: Path, overwrite: bool, source, exported: frozenset[str] = EXPORTED_FILES) -> None:
    """Refuse a file, a link to nothing, the parent checkpoint's folder ``source``, a folder in the Hub cache, and a
    non-empty folder (but with ``overwrite`` one that holds only files of ``exported``, an earlier export's), before
    anything is loaded or written. What a killed export left in ``out`` (`STAGING_MARK`) is not counted: it is
    removed."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: export writes a folder.")
    if out.is_symlink() and not out.exists():  # creating its target could write where a disk should be mounted
        raise ExportError(
            f"{out} is a link to {out.readlink()}, which does not exist (a disk not mounted?): create that folder, "
            "or export into another folder."
        )
    parent_folder = Path(source) if isinstance(source, (str, Path)) and str(source) else None
    if parent_folder and parent_folder.is_dir() and parent_folder.resolve() == out.resolve():
        raise ExportError(f"{out} is the parent checkpoint's own folder: export into a new folder.")
    cache = Path(hub_constants.HF_HUB_CACHE).resolve()
    if out.resolve().is_relative_to(cache):  # a Hub id's checkpoint folder is a snapshot there
        raise ExportError(
            f"{out} is in the Hugging Face cache ({cache}), where downloaded checkpoints (the parent's, maybe) live: "
            "export into a folder of your own."
        )
    present = (
        sorted(path.name for path in out.iterdir() if not path.name.startswith(STAGING_MARK)) if out.is_dir() else []
    )
    if present and not overwrite:
        raise ExportError(
            f"{out} is not empty ({', '.join(present)}): export into a new folder, or pass overwrite=True (--overwrite)."
        )
    foreign = [name for name in present if name not in exported]
    if foreign:
        raise ExportError(
            f"{out} holds files an export does not write ({', '.join(foreign)}); an upload would publish them. "
            "Export into a new folder."
        )


def _write_preprocessor_config(model: PreTrainedModel, out: Path) -> None:
    """The parent's ``preprocessor_config.json`` verbatim, else the family's default, with a warning."""
    source = model.config.name_or_path
    found = source and cached_file(
        source,
        PREPROCESSOR_FILE,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if found:
        (out / PREPROCESSOR_FILE).write_bytes(Path(found).read_bytes())
        return
    processor = family_of(model).default_image_processor(model.config.register_config)
    processor.save_pretrained(out)
    warnings.warn(
        f"{source or 'The model'} has no {PREPROCESSOR_FILE}: wrote the {family_of(model).name} default "
        f"{type(processor).__name__} (mean {list(processor.image_mean)}, std {list(processor.image_std)}); check that "
        "it fits the weights before uploading.",
        stacklevel=4,
    )


def published_index(index: IndexSpec) -> RegisterNeuronIndex:
    """``index`` loaded as a `RegisterNeuronIndex`; a plain dict is refused: an export publishes the provenance."""
    loaded = load_index(index)
    if not isinstance(loaded, RegisterNeuronIndex):
        raise RegisterNeuronIndexError(
            "An export publishes the index with its provenance: pass an index file (`ttreg find-neurons ... --out "
            "index.safetensors`) or a shipped index name, not a plain {layer: [neuron, ...]} dict."
        )
    return loaded


def _model_with_index(model, index: RegisterNeuronIndex) -> PreTrainedModel:
    """The model to export: loaded with ``index`` as the class the checkpoint saved (`_saved_class`), or the given one
    once its neurons are checked against ``index``."""
    if isinstance(model, (str, Path)):
        config = AutoConfig.from_pretrained(model)
        family = family_of_model_type(config.model_type)
        _refuse_a_host(config, repr(str(model)))
        if family is None:
            known = ", ".join(t for family in transformers_families() for t in family.model_types)
            raise ExportError(f"Cannot export {str(model)!r}: its model type {config.model_type!r} is none of {known}.")
        return _saved_class(family, config.architectures).from_pretrained(model, register_neurons=index).eval()
    family = family_of(model) if isinstance(model, PreTrainedModel) else None
    if isinstance(model, PreTrainedModel):
        _refuse_a_host(model.config, f"a {type(model).__name__}")
    if family is None or type(model) not in family.model_classes:
        raise ExportError(
            f"Cannot export a {type(model).__name__}: pass a checkpoint or a model of one of ttreg_hf's `transformers` "
            "classes."
        )
    config = model.config.register_config
    index.check_fits(config.num_hidden_layers, config.mlp_width)
    if config.register_neuron_index != index.neurons:
        raise ExportError("The model's register neurons are not the index's: call `model.set_register_neurons(index)`.")
    return model


def _refuse_a_host(config, what: str) -> None:
    """Refuse a model built around a tower of one of the families (a VLM, a depth or segmentation model), whose
    ``vision_config`` / ``backbone_config`` an export would write alone, dropping the rest."""
    towers = [
        (key, sub.model_type)
        for key in config.sub_configs
        if family_of_model_type(getattr(sub := getattr(config, key, None), "model_type", None)) is not None
    ]
    if towers and family_of_model_type(config.model_type) is None:
        key, tower_type = towers[0]
        raise ExportError(
            f"Cannot export {what}: a {config.model_type} model built around a {tower_type} tower ({key}). An export "
            "writes one family's tower, classifier or dual encoder, and would drop the rest of this model. Give it "
            "test-time registers with `load_vlm(...)` or `to_test_time_registers(model, ...)`, then "
            "`model.save_pretrained(folder)` or `model.push_to_hub(repo_id)`: that folder loads with plain "
            "transformers (trust_remote_code=True) and the index is in its config."
        )


def _saved_class(family, architectures: list[str] | None) -> type:
    """The family's class that a checkpoint saved as ``architectures`` (ours or the parent's, e.g. a fine-tuned
    `Dinov2ForImageClassification`) loads as, its head and text tower kept; the base model for none of them."""
    by_name = {cls.__name__: cls for cls in family.model_classes}
    by_name |= {parent.__name__: cls for parent, cls in zip(family.parents, family.model_classes)}
    return next((by_name[name] for name in architectures or () if name in by_name), family.model_class)


def _checkpoint_id(model: PreTrainedModel) -> str | None:
    """The Hub id the model was loaded from, if any (not a local folder)."""
    source = model.config.name_or_path
    return source if source and not Path(source).exists() else None


def _config_for_remote_code(model: PreTrainedModel):
    config = copy.deepcopy(model.config)
    config.auto_map = remote_auto_map(type(model))
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")
    return config
