"""Hub-ready exports: a folder that loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` alone.

The remote code is generated from the package's own modules, never written twice: the modules a model class needs
(found by following its relative imports) are concatenated into ``configuration_ttreg.py`` and ``modeling_ttreg.py``,
their intra-package imports dropped or rewritten to ``from .configuration_ttreg import ...``.
"""

import ast
import copy
import importlib
import inspect
import json
import re
import warnings
from importlib.util import resolve_name
from pathlib import Path

from transformers import AutoConfig, BitImageProcessor, CLIPImageProcessor, PreTrainedModel
from transformers.utils import cached_file

from . import __version__, register_auto_classes
from .configs.clip import CLIPVisionTTRegConfig
from .configs.dinov2 import Dinov2TTRegConfig
from .index import METADATA_KEY, RegisterNeuronIndex, RegisterNeuronIndexError, load_index, write_safetensors
from .model_card import render_model_card
from .modeling.clip import CLIPVisionTTRegModel
from .modeling.dinov2 import Dinov2TTRegModel
from .modeling.registers import IndexSpec, PreTrainedTestTimeRegisterMixin

PACKAGE = __name__.rpartition(".")[0]
CONFIG_FILE, MODELING_FILE = "configuration_ttreg", "modeling_ttreg"
PREPROCESSOR_FILE = "preprocessor_config.json"
EXPORTED_FILES = frozenset(
    {f"{CONFIG_FILE}.py", f"{MODELING_FILE}.py", "config.json", "model.safetensors", PREPROCESSOR_FILE, "README.md"}
)
# package-only definitions, replaced in the remote code: it has no `precomputed/` folder beside it
REMOTE_REPLACEMENTS = {
    f"{PACKAGE}.index": {
        "PRECOMPUTED_DIR": "",
        "shipped_indices": (
            "def shipped_indices() -> dict[str, Path]:\n"
            '    """None in remote code: the index is in the config, or pass `register_neurons`."""\n'
            "    return {}"
        ),
    }
}
# parent (and our own) `model_type` -> the class a checkpoint id or folder is exported as
MODEL_CLASSES = {
    "dinov2": Dinov2TTRegModel,
    Dinov2TTRegConfig.model_type: Dinov2TTRegModel,
    "clip": CLIPVisionTTRegModel,
    "clip_vision_model": CLIPVisionTTRegModel,
    CLIPVisionTTRegConfig.model_type: CLIPVisionTTRegModel,
}


class ExportError(ValueError):
    """A model or index that cannot be exported."""


def export_model(
    model: str | Path | PreTrainedTestTimeRegisterMixin,
    index: IndexSpec,
    out: str | Path,
    *,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out``, ready for `huggingface_hub.upload_folder`: config, remote code, weights, preprocessor, card.

    ``model`` is a checkpoint id or folder (DINOv2 or CLIP, the parent's or ours) or a loaded model of this package
    whose register neurons are ``index``'s. ``index`` is an index file or shipped name (a plain dict has no
    provenance to publish). ``base_model`` (default: ``model`` when an id, else the index's HF checkpoint) names the
    base checkpoint and picks the default ``license``; ``repo_id`` goes into the card's usage examples.

    ``out`` must be new or empty: an upload publishes everything in it. With ``overwrite``, a folder that holds only
    files an export writes (`EXPORTED_FILES`, e.g. an earlier export) is rewritten; any other file is refused, never
    touched. The parent checkpoint's own folder is always refused. The parent's ``preprocessor_config.json`` is
    copied unchanged; a parent without one (random weights) gets the family's default, with a warning that says so.
    """
    out = Path(out)
    _check_export_folder(out, overwrite, source=model)
    index = _published_index(index)
    model = _model_with_index(model, index)
    _check_export_folder(out, overwrite, source=model.config.name_or_path)
    if base_model is None:
        base_model = _checkpoint_id(model) or index.checkpoints.get("hf")
    out.mkdir(parents=True, exist_ok=True)
    for name, source in remote_code(type(model)).items():
        (out / f"{name}.py").write_text(source)
    _config_for_remote_code(model).save_pretrained(out)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(index.to_json())}
    write_safetensors(weights, out / "model.safetensors", metadata)
    _write_preprocessor_config(model, out)
    (out / "README.md").write_text(
        render_model_card(model, index, base_model=base_model, license=license, repo_id=repo_id or "<user>/<repo>")
    )
    return out


def _check_export_folder(out: Path, overwrite: bool, source) -> None:
    """Refuse a file, the parent checkpoint's folder, and a non-empty folder (but with ``overwrite`` one that holds
    only exported files), before anything is loaded or written."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: export writes a folder.")
    parent_folder = Path(source) if isinstance(source, (str, Path)) and str(source) else None
    if parent_folder and parent_folder.is_dir() and parent_folder.resolve() == out.resolve():
        raise ExportError(f"{out} is the parent checkpoint's own folder: export into a new folder.")
    present = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        raise ExportError(
            f"{out} is not empty ({', '.join(present)}): export into a new folder, or pass overwrite=True (--overwrite)."
        )
    foreign = [name for name in present if name not in EXPORTED_FILES]
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
    processor = image_processor(model.config)
    processor.save_pretrained(out)
    crop = processor.to_dict()["crop_size"]
    warnings.warn(
        f"{source or 'The model'} has no {PREPROCESSOR_FILE}: wrote the default {type(processor).__name__} "
        f"(crop {crop['height']}x{crop['width']}, mean {list(processor.image_mean)}, std {list(processor.image_std)}); "
        "check that it fits the weights before uploading.",
        stacklevel=3,
    )


def _published_index(index: IndexSpec) -> RegisterNeuronIndex:
    loaded = load_index(index)
    if not isinstance(loaded, RegisterNeuronIndex):
        raise RegisterNeuronIndexError(
            "An export publishes the index with its provenance: pass an index file (`ttreg find-neurons ... --out "
            "index.safetensors`) or a shipped index name, not a plain {layer: [neuron, ...]} dict."
        )
    return loaded


def _model_with_index(model, index: RegisterNeuronIndex) -> PreTrainedTestTimeRegisterMixin:
    """The model to export: loaded with ``index``, or the given one once its neurons are checked against ``index``."""
    if isinstance(model, (str, Path)):
        register_auto_classes()  # AutoConfig must know our own model types
        model_type = AutoConfig.from_pretrained(model).model_type
        if model_type not in MODEL_CLASSES:
            raise ExportError(
                f"Cannot export {str(model)!r}: its model type {model_type!r} is none of {', '.join(MODEL_CLASSES)}."
            )
        return MODEL_CLASSES[model_type].from_pretrained(model, register_neurons=index).eval()
    if not (isinstance(model, PreTrainedTestTimeRegisterMixin) and isinstance(model, PreTrainedModel)):
        raise ExportError(
            f"Cannot export a {type(model).__name__}: pass a checkpoint or a ttreg_hf `transformers` model."
        )
    index.check_fits(model.config.num_hidden_layers, model.config.mlp_width)
    if model.config.register_neuron_index != index.neurons:
        raise ExportError("The model's register neurons are not the index's: call `model.set_register_neurons(index)`.")
    return model


def _checkpoint_id(model: PreTrainedModel) -> str | None:
    """The Hub id the model was loaded from, if any (not a local folder)."""
    source = model.config.name_or_path
    return source if source and not Path(source).exists() else None


def _config_for_remote_code(model: PreTrainedModel):
    config = copy.deepcopy(model.config)
    config.auto_map = {
        "AutoConfig": f"{CONFIG_FILE}.{type(config).__name__}",
        "AutoModel": f"{MODELING_FILE}.{type(model).__name__}",
    }
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")
    return config


def image_processor(config) -> BitImageProcessor | CLIPImageProcessor:
    """The parent checkpoints' image processor: facebook/dinov2-*'s, or the CLIP one at the tower's image size."""
    if isinstance(config, Dinov2TTRegConfig):
        return BitImageProcessor(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            do_center_crop=True,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
            do_convert_rgb=True,
        )
    if isinstance(config, CLIPVisionTTRegConfig):
        size = config.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    raise ExportError(f"No image processor is known for {type(config).__name__}.")


def remote_code(model_class: type) -> dict[str, str]:
    """``{file stem: source}`` of the self-contained configuration and modeling files for ``model_class``."""
    config_modules = _dependency_order([model_class.config_class.__module__])
    modeling_modules = [m for m in _dependency_order([model_class.__module__]) if m not in config_modules]
    from_config_file = dict.fromkeys(config_modules, CONFIG_FILE)
    return {
        CONFIG_FILE: _assemble(config_modules, local=config_modules, imported={}),
        MODELING_FILE: _assemble(modeling_modules, local=modeling_modules, imported=from_config_file),
    }


def _package_source(node: ast.stmt, module_name: str) -> str | None:
    """The absolute name of the package module ``node`` imports from, if it is a relative import."""
    if not (isinstance(node, ast.ImportFrom) and node.level):
        return None
    if not node.module:
        raise ExportError(f"{module_name} imports from a package root; import from the defining module.")
    return resolve_name("." * node.level + node.module, module_name.rpartition(".")[0])


def _dependency_order(roots: list[str]) -> list[str]:
    """``roots`` and the package modules they import, each after its dependencies."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for node in _parse(name).body:
                if source := _package_source(node, name):
                    visit(source)
            order.append(name)

    for root in roots:
        visit(root)
    return order


def _parse(module_name: str) -> ast.Module:
    return ast.parse(_source(module_name))


def _source(module_name: str) -> str:
    return inspect.getsource(importlib.import_module(module_name))


def _assemble(modules: list[str], local: list[str], imported: dict[str, str]) -> str:
    """One file from ``modules``: their code verbatim, one merged import block, package imports resolved."""
    external: dict[tuple[str, str], str | None] = {}  # (module or "", name) -> alias
    from_sibling: dict[str, set[str]] = {}
    sections, seen = [], set()
    for module_name in modules:
        tree = _parse(module_name)
        defined = {name for node in tree.body for name in _defined_names(node)}
        if defined & seen:
            raise ExportError(f"{module_name} redefines {sorted(defined & seen)}: one file cannot hold both.")
        seen |= defined
        for node in tree.body:
            if isinstance(node, ast.Import):
                external.update({("", alias.name): alias.asname for alias in node.names})
            elif source := _package_source(node, module_name):
                _check_local_import(node, source, module_name, local, imported, from_sibling)
            elif isinstance(node, ast.ImportFrom):
                external.update({(node.module, alias.name): alias.asname for alias in node.names})
        sections.append(_section(module_name, tree, defined))
    header = (
        f'"""Remote code for test-time-register models, generated by ttreg_hf {__version__} from its modules (named '
        'below); do not edit.\n\nSee "Vision Transformers Don\'t Need Trained Registers" '
        '(https://arxiv.org/abs/2506.08010)."""'
    )
    text = "\n\n".join([header, _import_block(external, from_sibling), *sections]) + "\n"
    compile(text, f"{modules[-1]} (generated)", "exec")
    return text


def _section(module_name: str, tree: ast.Module, defined: set[str]) -> str:
    """The module's source without its docstring and imports, package-only definitions replaced."""
    replacements = REMOTE_REPLACEMENTS.get(module_name, {})
    if replacements.keys() - defined:
        raise ExportError(f"{module_name} no longer defines {sorted(replacements.keys() - defined)}.")
    lines = _source(module_name).splitlines()
    for node in reversed(tree.body):
        names = _defined_names(node) & replacements.keys()
        if names or isinstance(node, (ast.Import, ast.ImportFrom)) or _is_docstring(node, tree):
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
            while start and lines[start - 1].lstrip().startswith("#"):  # the comments about it go too
                start -= 1
            lines[start : node.end_lineno] = [replacements[name] for name in names if replacements[name]]
    body = re.sub(r"\n{3,}", "\n\n\n", "\n".join(lines).strip())
    summary = (ast.get_docstring(tree) or "").partition("\n")[0]
    return f"# ---- {module_name.replace('.', '/')}.py: {summary}\n\n{body}"


def _is_docstring(node: ast.stmt, tree: ast.Module) -> bool:
    return node is tree.body[0] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {t.id for t in targets if isinstance(t, ast.Name)}
    return set()


def _check_local_import(node, source, module_name, local, imported, from_sibling) -> None:
    """Drop an import of a module in the same file; rewrite one of the configuration file as a sibling import."""
    if any(alias.asname for alias in node.names):
        raise ExportError(f"{module_name}: aliased package imports cannot be flattened into one file.")
    if source in imported:
        from_sibling.setdefault(imported[source], set()).update(alias.name for alias in node.names)
    elif source not in local:
        raise ExportError(f"{module_name} imports {source}, which the remote code does not hold.")


def _import_block(external: dict[tuple[str, str], str | None], from_sibling: dict[str, set[str]]) -> str:
    by_module: dict[str, list[str]] = {}
    for (module, name), alias in sorted(external.items()):
        by_module.setdefault(module, []).append(f"{name} as {alias}" if alias else name)
    lines = [f"import {name}" for name in by_module.pop("", [])]
    lines += [f"from {module} import {', '.join(names)}" for module, names in by_module.items()]
    lines += [f"from .{stem} import ({', '.join(sorted(names))})" for stem, names in from_sibling.items()]
    return "\n".join(lines)
