"""Register-neuron indices: JSON in the ``__metadata__`` header of a safetensors file (no tensors needed, no code run).

An index spec (``register_neurons=`` of every loader, ``model.set_register_neurons``, the CLI's ``--index``) is
resolved by `load_index`, in this order:

1. a ``{layer: [neuron, ...]}`` mapping or a `RegisterNeuronIndex`: as it is;
2. an existing local path: a file is the index, a folder must hold `INDEX_FILENAME`; a `Path` is always local;
3. the name of a shipped index (`shipped_indices`, e.g. ``"dinov2_vitl14"``);
4. a Hugging Face Hub location, as `huggingface_hub.parse_hf_uri` reads it: ``owner/name[@revision][/path]``, also
   with ``hf://`` in front or as a huggingface.co URL. A ``path`` ending in ``.safetensors`` names the file; any
   other path is a folder holding `INDEX_FILENAME`; no path is `INDEX_FILENAME` at the root. The file comes through
   `huggingface_hub.hf_hub_download` (its cache, ``HF_HUB_OFFLINE``, ``HF_TOKEN``, ``HF_ENDPOINT`` mirrors).

Anything else is one `RegisterNeuronIndexError` that names the three string forms. A local path that could also be
read as a repo id (a folder ``owner/name`` in the working directory) wins; ``hf://owner/name`` always means the Hub,
as does `RegisterNeuronIndex.from_pretrained`. However it arrives, a file is only ever read as JSON in the
safetensors header and checked field by field; the model's depth and width are checked when it is attached.
"""

import hashlib
import importlib
import json
import numbers
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from os import PathLike
from pathlib import Path, PurePosixPath

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub import hf_hub_download, parse_hf_uri
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from .errors import TTRegTypeError, TTRegValueError
from .settings import SEMANTICS

SCHEMA_VERSION = 1
METADATA_KEY = "ttreg_index"
INDEX_FILENAME = "register_neurons.safetensors"  # the index file of a Hub repository (`ttreg push-index` writes it)
MAX_INDEX_FILE_BYTES = 16 * 2**20  # an index is a few kB; a Hub file over this is something else (a model's weights)
HUB_FORM = "owner/name[@revision][/path/to/index.safetensors]"
# a checkout (torch.hub, editable install) has `precomputed/` beside the package; a wheel installs it inside
PRECOMPUTED_DIR = next(
    (
        path
        for path in (Path(__file__).resolve().parent / d for d in ("../precomputed", "precomputed"))
        if path.is_dir()
    ),
    None,
)
FIND_NEURONS_HINT = (
    "Pass `register_neurons={layer: [neuron, ...]}`, the path of an index file (a `.safetensors` written by "
    "`ttreg find-neurons`) or a Hub repo id holding one (owner/name), find one with `ttreg find-neurons MODEL IMAGE_DIR --out index.safetensors`, or pass "
    "`num_test_time_registers=0` to run the model without test-time registers."
)
REWRITE_HINT = "Write the index again with `ttreg find-neurons` or `RegisterNeuronIndex(...).save(path)`."
MAX_KEY_DIGITS = 6  # no model has a million blocks; and `int` refuses strings over 4300 digits with a plain ValueError
MAX_INDEX_CHARS = 1_000_000  # the JSON of an index is a few kB; a bigger header was not written as one
MAX_DETAILS_DEPTH = 32  # `details` holds flat facts and score lists; deep nesting would only defeat recursion limits


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, the same bytes for the same tensors and metadata (`_sort_metadata`: an upload of
    an unchanged export stores nothing new), with the permissions of any file the user writes (it creates files
    0600)."""
    save_file(tensors, str(path), metadata=metadata)
    _sort_metadata(Path(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sort_metadata(path: Path) -> None:
    """Rewrite the JSON header of the safetensors file ``path`` in place with its ``__metadata__`` sorted by key:
    safetensors writes that map in an order that changes from process to process. The same entries in another
    order have the same length, so the tensors' bytes do not move."""
    with open(path, "r+b") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # safetensors pads its header with spaces too
            file.seek(8)
            file.write(text.ljust(length))


class RegisterIndexMismatchWarning(UserWarning):
    """A register-neuron index used outside where it was found: another checkpoint, other weights, or an image size
    far from its own (an index found at 518 px misses outliers at 224 px on DINOv2-S/B)."""


class RegisterNeuronIndexError(TTRegValueError):
    """A register-neuron index that is missing, corrupt, or made for another checkpoint."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_size(value) -> bool:
    return _is_int(value) and value >= 1


def _describe(value) -> str:
    """``value`` for an error message: its type and a repr short enough for one line."""
    text = repr(value)
    return (
        f"{text[:60]}... ({type(value).__name__}, {len(text)} characters)"
        if len(text) > 80
        else f"{text} ({type(value).__name__})"
    )


def _layer_id(layer) -> int | None:
    """A layer key as an int: ints >= 0 and strings of ASCII digits (JSON's keys); `None` for anything else."""
    if _is_int(layer):
        return int(layer) if layer >= 0 else None
    if isinstance(layer, str) and layer.isascii() and layer.isdigit() and len(layer) <= MAX_KEY_DIGITS:
        return int(layer)  # `isascii`: `int` also reads other scripts' digits ("١"), and `isdigit` passes "²"
    return None


def normalize_neurons(neurons: Mapping) -> dict[int, tuple[int, ...]]:
    """``{layer: [neuron, ...]}`` with int keys (JSON's str keys of digits too), sorted by layer, neuron order kept.

    A layer given twice under keys that name the same block (``1`` and ``"1"``, ``"1"`` and ``"01"``) is an error,
    not a merge: one list would silently replace the other."""
    if not isinstance(neurons, Mapping):
        raise RegisterNeuronIndexError(
            f"Register neurons must be a mapping {{layer: [neuron, ...]}}, e.g. {{17: [884, 133]}}; got {_describe(neurons)}."
        )
    normalized, keys = {}, {}
    for layer, ids in neurons.items():
        layer_id = _layer_id(layer)
        if layer_id is None or not isinstance(ids, (list, tuple)) or not all(_is_int(n) and n >= 0 for n in ids):
            raise RegisterNeuronIndexError(
                "Register neurons must map int layers (>= 0) to lists of int neurons (>= 0), e.g. {17: [884, 133]}; "
                f"got {_describe(layer)}: {_describe(ids)}."
            )
        if layer_id in keys:
            raise RegisterNeuronIndexError(
                f"Register-neuron layer {layer_id} is given twice (as {keys[layer_id]!r} and {layer!r}): give each layer "
                "once, with all of its neurons in one list."
            )
        keys[layer_id] = layer
        id_list = [int(n) for n in ids]
        if len(set(id_list)) != len(id_list):
            raise RegisterNeuronIndexError(f"Layer {layer_id} lists a neuron twice: {id_list}.")
        if id_list:
            normalized[layer_id] = tuple(id_list)
    return dict(sorted(normalized.items()))


def _check_field(name: str, value, valid: bool, expected: str) -> None:
    if not valid:
        raise RegisterNeuronIndexError(f"Index field {name!r} must be {expected}, got {_describe(value)}.")


def _depth(value) -> int:
    """How deeply JSON-like containers nest in ``value`` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else None
        if children is not None:
            deepest = max(deepest, depth)
            if deepest > MAX_DETAILS_DEPTH:
                break
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _dict_without_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict; a key given twice is an error (`json` would keep the last one silently)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise RegisterNeuronIndexError(f"The JSON object keys {repeated} are given twice.")
    return data


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def fingerprinted_weight(model: torch.nn.Module) -> torch.Tensor:
    """The weight `weights_fingerprint` hashes: the patch embedding's, the first `Conv2d`'s (the first `Linear`'s for a
    tower without one: SigLIP2's NaFlex patches). Every library holds it in the same layout under its own name (timm's
    ``patch_embed.proj``, `transformers`' ``patch_embeddings.projection``), and heads and pruning (timm's
    ``features_only``) leave it alone; fine-tuning the backbone changes it."""
    for kind in (torch.nn.Conv2d, torch.nn.Linear):
        module = next((module for module in model.modules() if isinstance(module, kind)), None)
        if module is not None:
            return module.weight
    raise TTRegTypeError(f"A {type(model).__name__} has no patch embedding (no Conv2d or Linear) to fingerprint.")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the checkpoint's patch embedding (`fingerprinted_weight`: its shape and a strided sample of its
    values): which checkpoint an index is for, whatever the library, the parameter names or the heads."""
    weight = fingerprinted_weight(model).detach()
    sample = weight.flatten()[:: max(1, weight.numel() // 4096)].float().cpu()
    digest = hashlib.sha256(f"{tuple(weight.shape)}".encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_neurons_fit(neurons: Mapping[int, Sequence[int]], num_layers: int, mlp_width: int, what: str = "") -> None:
    """Raise a clear error when a layer or neuron is outside a model of this depth and MLP width."""
    for layer, ids in neurons.items():
        if not 0 <= layer < num_layers:
            raise RegisterNeuronIndexError(
                f"Register-neuron layer {layer}{what} is out of range: the model has {num_layers} layers (0-based). "
                "Is this index made for another checkpoint?"
            )
        bad = [n for n in ids if not 0 <= n < mlp_width]
        if bad:
            raise RegisterNeuronIndexError(
                f"Register neurons {bad} in layer {layer}{what} are out of range: the MLP has {mlp_width} neurons. "
                "Is this index made for another checkpoint?"
            )


@dataclass(frozen=True)
class RegisterNeuronIndex:
    """Which MLP neurons of which layers write the high-norm outliers of one checkpoint, and where that came from."""

    neurons: dict[int, tuple[int, ...]]
    num_layers: int
    mlp_width: int
    semantics: str = "paper"
    checkpoints: dict[str, str] = field(default_factory=dict)
    image_size: int | None = None
    source: str = ""
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        """Check every field's type and range: the one validation of an index, whether built or loaded."""
        _check_field(
            "num_layers", self.num_layers, _is_size(self.num_layers), "an int >= 1, the model's number of blocks"
        )
        _check_field("mlp_width", self.mlp_width, _is_size(self.mlp_width), "an int >= 1, the neurons per MLP")
        _check_field(
            "semantics",
            self.semantics,
            isinstance(self.semantics, str) and self.semantics in SEMANTICS,
            f"one of {SEMANTICS}",
        )
        _check_field(
            "checkpoints",
            self.checkpoints,
            isinstance(self.checkpoints, dict)
            and all(isinstance(v, str) for v in [*self.checkpoints, *self.checkpoints.values()]),
            'a mapping of strings, e.g. {"hf": "facebook/dinov2-large"}',
        )
        _check_field(
            "image_size", self.image_size, self.image_size is None or _is_size(self.image_size), "null or an int >= 1"
        )
        _check_field("source", self.source, isinstance(self.source, str), "a string")
        _check_field(
            "details",
            self.details,
            isinstance(self.details, dict) and _depth(self.details) <= MAX_DETAILS_DEPTH,
            f"a mapping nested at most {MAX_DETAILS_DEPTH} levels deep",
        )
        object.__setattr__(self, "neurons", normalize_neurons(self.neurons))
        check_neurons_fit(self.neurons, self.num_layers, self.mlp_width)

    @property
    def num_neurons(self) -> int:
        return sum(len(ids) for ids in self.neurons.values())

    @property
    def provenance(self) -> dict:
        """Where the index applies, as a model's config keeps it (``register_index_provenance``): the image size and
        checkpoint ids it was found at, and the weights fingerprint `ttreg find-neurons` records (or `None`)."""
        fingerprint = self.details.get("weights_fingerprint")
        return {
            "image_size": self.image_size,
            "checkpoints": dict(self.checkpoints),
            "weights_fingerprint": fingerprint if isinstance(fingerprint, str) else None,
        }

    def made_for(self, checkpoint: str) -> bool:
        """Whether ``checkpoint`` (a Hub id, a model name, or a local folder) is one the index records; an index that
        records none applies anywhere. A local folder matches an id that ends with its name (``.../dinov2-large``
        for ``facebook/dinov2-large``); a snapshot folder of the Hub cache (``models--facebook--dinov2-large/
        snapshots/<commit>``, as `snapshot_download` gives it) is its repo id."""
        ids = set(self.checkpoints.values())
        if not ids or checkpoint in ids:
            return True
        folder = Path(checkpoint)
        if not _is_dir(folder):
            return False
        cache_entry = folder.parent.parent.name
        if folder.parent.name == "snapshots" and cache_entry.startswith("models--"):
            return cache_entry.removeprefix("models--").replace("--", "/") in ids
        return folder.name in {PurePosixPath(i).name for i in ids}

    def to_json(self) -> dict:
        data = asdict(self)
        data["neurons"] = {str(layer): list(ids) for layer, ids in self.neurons.items()}
        return {"schema_version": SCHEMA_VERSION, **data}

    def _metadata(self) -> dict[str, str]:
        return {"format": "pt", METADATA_KEY: json.dumps(self.to_json())}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors({}, path, self._metadata())
        return path

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None) -> "RegisterNeuronIndex":
        """Read an index file; anything but a valid index is a `RegisterNeuronIndexError` naming the problem (and the
        file as ``name``, when given, e.g. its place on the Hub rather than in the cache)."""
        path = Path(path)
        name = name or str(path)
        if not _is_file(path):
            raise RegisterNeuronIndexError(f"No register-neuron index at {name}. {FIND_NEURONS_HINT}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise RegisterNeuronIndexError(
                f"{name} is not a readable safetensors file ({error}). {FIND_NEURONS_HINT}"
            ) from error
        if METADATA_KEY not in metadata:
            raise RegisterNeuronIndexError(f"{name} holds no register-neuron index (no {METADATA_KEY!r} metadata).")
        try:
            return cls._from_json(metadata[METADATA_KEY])
        except RegisterNeuronIndexError as error:
            raise RegisterNeuronIndexError(
                f"The register-neuron index in {name} is corrupt. {error} {REWRITE_HINT}"
            ) from error

    @classmethod
    def from_pretrained(
        cls,
        pretrained_index_name_or_path: str | PathLike,
        *,
        filename: str = INDEX_FILENAME,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: bool | str | None = None,
    ) -> "RegisterNeuronIndex":
        """The index ``filename`` (default `INDEX_FILENAME`; a path inside the repository) of a Hub repository
        ``owner/name`` at ``revision`` (a branch, tag or commit; default ``main``), or of a local folder, as
        ``transformers``' ``from_pretrained`` reads a model. Downloads go through `huggingface_hub.hf_hub_download`
        (its cache, ``HF_HUB_OFFLINE``, tokens, ``HF_ENDPOINT``); a file over `MAX_INDEX_FILE_BYTES` is refused
        before it is downloaded. Every failure is one `RegisterNeuronIndexError` that says what to do."""
        source = pretrained_index_name_or_path
        _check_repo_filename(filename, str(source))
        if isinstance(source, PathLike) or _is_dir(Path(source)):
            return _load_from_folder(Path(source), filename)
        if not isinstance(source, str):
            raise TTRegTypeError(f"from_pretrained takes a Hub repo id or a folder, got {_describe(source)}.")
        try:
            validate_repo_id(source)
        except hub_errors.HFValidationError as error:
            raise RegisterNeuronIndexError(
                f"{source!r} is neither a folder nor a Hub repo id 'owner/name' ({_first_line(error)})."
            ) from None
        if "/" not in source:
            raise RegisterNeuronIndexError(f"{source!r} is neither a folder nor a Hub repo id 'owner/name'.")
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            raise RegisterNeuronIndexError(f"revision must be a branch, tag or commit, got {_describe(revision)}.")
        hub_kwargs = dict(
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        path = _download_index(source, filename, **hub_kwargs)
        return cls.load(path, name=_hub_name(source, filename, revision))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ):
        """Upload the index alone, as `INDEX_FILENAME`, with a model card generated from its provenance, to the Hub
        model repository ``repo_id`` (created if missing, as ``huggingface_hub``'s ``push_to_hub`` does), in one
        commit on ``revision`` (a branch, created from ``main`` if missing; default ``main``). The weights it is for
        stay where they are: load it with ``register_neurons="owner/name"``. Returns the `CommitInfo`."""
        from huggingface_hub import CommitOperationAdd, HfApi

        # by name: `transformers` reads every `from .x import` of an exported model's remote code (this module is part
        # of it) as a file that must sit beside it, and the card is the package's business, not the remote code's
        render_index_card = importlib.import_module(f"{__name__.rpartition('.')[0]}.model_card").render_index_card
        api = HfApi(token=token, library_name="ttreg_hf")
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        files = {INDEX_FILENAME: save({}, metadata=self._metadata()), "README.md": render_index_card(self, repo_id)}
        return api.create_commit(
            repo_id,
            [
                CommitOperationAdd(path, content if isinstance(content, bytes) else content.encode())
                for path, content in files.items()
            ],
            commit_message=commit_message
            or f"Upload a register-neuron index ({self.num_neurons} neurons) with ttreg_hf",
            revision=revision,
            create_pr=create_pr,
        )

    @classmethod
    def _from_json(cls, text: str) -> "RegisterNeuronIndex":
        if len(text) > MAX_INDEX_CHARS:
            raise RegisterNeuronIndexError(
                f"Its JSON has {len(text)} characters, over the {MAX_INDEX_CHARS} an index may have."
            )
        try:
            data = json.loads(text, object_pairs_hook=_dict_without_repeated_keys)
        except RegisterNeuronIndexError:
            raise
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError; so are over-long int literals
            raise RegisterNeuronIndexError(f"It is not valid JSON ({str(error)[:200]}).") from error
        if not isinstance(data, dict):
            raise RegisterNeuronIndexError(f"It must be a JSON object of index fields, got {_describe(data)}.")
        version = data.pop("schema_version", None)
        if not _is_int(version) or version != SCHEMA_VERSION:
            raise RegisterNeuronIndexError(
                f"Index field 'schema_version' is {_describe(version)}; this ttreg_hf reads schema version {SCHEMA_VERSION} "
                "(an int): a newer version needs a newer ttreg_hf."
            )
        names = {f.name for f in fields(cls)}
        missing = sorted({"neurons", "num_layers", "mlp_width"} - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise RegisterNeuronIndexError(
                f"Index fields {missing or unknown} are {'missing' if missing else 'unknown'}; an index has the fields "
                f"{sorted(names)}."
            )
        return cls(**data)

    def check_fits(self, num_layers: int, mlp_width: int) -> None:
        """Raise unless this index was made for a model of this depth and MLP width."""
        if (self.num_layers, self.mlp_width) != (num_layers, mlp_width):
            made_for = self.checkpoints.get("hf") or self.checkpoints.get("hub") or "another checkpoint"
            raise RegisterNeuronIndexError(
                f"This register-neuron index was made for {made_for} ({self.num_layers} layers, MLP width "
                f"{self.mlp_width}), not for a model with {num_layers} layers and MLP width {mlp_width}."
            )


def shipped_indices() -> dict[str, Path]:
    """The indices in ``precomputed/``, by file stem (e.g. ``"dinov2_vitl14"``)."""
    if PRECOMPUTED_DIR is None:
        return {}
    return {path.stem: path for path in sorted(PRECOMPUTED_DIR.glob("*.safetensors"))}


def find_shipped_index(checkpoint: str) -> RegisterNeuronIndex | None:
    """The shipped index whose checkpoint ids (HF id, hub name) include ``checkpoint``, if any."""
    for path in shipped_indices().values():
        index = RegisterNeuronIndex.load(path)
        if checkpoint in index.checkpoints.values():
            return index
    return None


def resolve_index(register_neurons, *, checkpoint: str, saved: bool, num_registers: int):
    """The index to attach to a model of ``checkpoint``, in order: ``register_neurons`` if given; ``None`` (keep it)
    when the model's config already holds one (``saved``); the shipped index for ``checkpoint``. Finding none while
    test-time registers are on (``num_registers > 0``) is an error that says how to make one."""
    if register_neurons is not None or saved:
        return register_neurons
    shipped = find_shipped_index(checkpoint)
    if shipped is None and num_registers > 0:
        raise RegisterNeuronIndexError(f"No register-neuron index is known for {checkpoint!r}. {FIND_NEURONS_HINT}")
    return shipped


def load_index(spec: "str | Path | Mapping | RegisterNeuronIndex") -> RegisterNeuronIndex | dict[int, tuple[int, ...]]:
    """An index from a mapping, a local file or folder, a shipped name or a Hub location, resolved by the rule in
    this module's docstring; a plain ``{layer: [neuron, ...]}`` dict comes back normalized."""
    if isinstance(spec, RegisterNeuronIndex):
        return spec
    if isinstance(spec, Mapping):
        return normalize_neurons(spec)
    if not isinstance(spec, (str, PathLike)):
        raise TTRegTypeError(
            f"register_neurons must be a dict {{layer: [neuron, ...]}}, an index file, a shipped index name, a Hub "
            f"repo id or a RegisterNeuronIndex, got {_describe(spec)}."
        )
    text = os.fspath(spec) if isinstance(spec, PathLike) else spec
    if not isinstance(text, str):  # a PathLike of bytes
        raise TTRegTypeError(f"register_neurons must be a str path, got {_describe(spec)}.")
    hub_only = text.startswith(hub_constants.HF_PROTOCOL)
    if not hub_only and _is_file(Path(text)):
        return RegisterNeuronIndex.load(text)
    if not hub_only and _is_dir(Path(text)):
        return _load_from_folder(Path(text), INDEX_FILENAME)
    if isinstance(spec, PathLike):
        raise RegisterNeuronIndexError(
            f"No register-neuron index at {text}: no such file or folder. {FIND_NEURONS_HINT}"
        )
    shipped = shipped_indices()
    if text in shipped:
        return RegisterNeuronIndex.load(shipped[text])
    repo_id, revision, filename = _hub_location(text, shipped)
    path = _download_index(repo_id, filename, revision=revision)
    return RegisterNeuronIndex.load(path, name=_hub_name(repo_id, filename, revision))


def _hub_location(spec: str, shipped: Mapping[str, Path]) -> tuple[str, str | None, str]:
    """``(repo id, revision or None, file in the repo)`` of a Hub location string, or the error naming every form."""
    neither = (
        f"{spec!r} is not a register-neuron index: not an existing file or folder, not a shipped index "
        f"({', '.join(shipped) or 'none'}), and not a Hub repo id {HUB_FORM}"
    )
    if spec.startswith(("/", "./", "../", "~")) or "\\" in spec or "\0" in spec:  # a path, never a repo id
        raise RegisterNeuronIndexError(
            f"No register-neuron index at {spec}: no such file or folder. {FIND_NEURONS_HINT}"
        )
    if "/" not in spec:
        raise RegisterNeuronIndexError(f"{neither}. {FIND_NEURONS_HINT}")
    looks_like_a_file = spec.count("/") == 1 and spec.endswith(".safetensors") and "@" not in spec
    if looks_like_a_file:  # "folder/index.safetensors" is a missing file, not a repository named "index.safetensors"
        raise RegisterNeuronIndexError(
            f"{neither}: there is no file {spec}; a Hub file is named owner/name/path/to/index.safetensors."
        )
    uri = spec if spec.startswith(hub_constants.HF_PROTOCOL) or "://" in spec else hub_constants.HF_PROTOCOL + spec
    try:
        location = parse_hf_uri(uri, endpoint=hub_constants.ENDPOINT)
    except ValueError as error:  # HfUriError
        raise RegisterNeuronIndexError(f"{neither}: {_first_line(getattr(error, 'msg', error))}") from None
    if location.type != "model":
        raise RegisterNeuronIndexError(f"{spec!r} names a {location.type}; an index lives in a model repository.")
    path = location.path_in_repo
    if "@" in path:
        raise RegisterNeuronIndexError(
            f"{spec!r}: the revision goes right after the repo id, {HUB_FORM} (e.g. owner/name@v1/index.safetensors)."
        )
    filename = path if path.endswith(".safetensors") else f"{path}/{INDEX_FILENAME}" if path else INDEX_FILENAME
    _check_repo_filename(filename, spec)
    return location.id, location.revision, filename


def _check_repo_filename(filename: str, spec: str) -> None:
    """Refuse a file name in a repository that is empty, absolute, or steps out of it (``..``)."""
    if not isinstance(filename, str):
        raise TTRegTypeError(f"filename must be a str, a path inside the repository; got {_describe(filename)}.")
    if filename.startswith("/") or any(p in ("", ".", "..") for p in filename.split("/")) or "\\" in filename:
        raise RegisterNeuronIndexError(
            f"{spec!r}: {filename!r} is not a file name inside a repository (no empty, '.' or '..' parts)."
        )


def _hub_name(repo_id: str, filename: str, revision: str | None) -> str:
    return f"{repo_id}/{filename}" + (f" (revision {revision})" if revision else "") + " on the Hub"


def _load_from_folder(folder: Path, filename: str) -> RegisterNeuronIndex:
    path = folder / filename
    if not _is_file(path):
        what = "no such folder" if not _is_dir(folder) else f"it holds no {filename}"
        raise RegisterNeuronIndexError(
            f"No register-neuron index in {folder}: {what} (an index folder or repository holds {INDEX_FILENAME}). "
            f"{FIND_NEURONS_HINT}"
        )
    return RegisterNeuronIndex.load(path)


def _download_index(repo_id: str, filename: str, **hub_kwargs) -> Path:
    """The cached path of ``filename`` in Hub repository ``repo_id``, downloaded if needed; every failure is one
    `RegisterNeuronIndexError` that names the file and the fix (no traceback of `huggingface_hub`'s)."""
    revision = hub_kwargs.get("revision")
    where = f"{filename} of Hub repository {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        preview = hf_hub_download(repo_id, filename, dry_run=True, library_name="ttreg_hf", **hub_kwargs)
        if preview.will_download and (preview.file_size or 0) > MAX_INDEX_FILE_BYTES:
            raise RegisterNeuronIndexError(
                f"The {where} has {preview.file_size} bytes: an index file has a few kB (at most "
                f"{MAX_INDEX_FILE_BYTES}), so this is not one (a model's weights?). Name the index file of the repo."
            )
        return Path(hf_hub_download(repo_id, filename, library_name="ttreg_hf", **hub_kwargs))
    except hub_errors.LocalEntryNotFoundError:
        if hub_constants.is_offline_mode() or hub_kwargs.get("local_files_only"):
            fix = "HF_HUB_OFFLINE is set" if hub_constants.is_offline_mode() else "local_files_only=True"
            raise RegisterNeuronIndexError(
                f"The {where} is not in the Hugging Face cache and {fix}: download it once online (`hf download "
                f"{repo_id} {filename}{f' --revision {revision}' if revision else ''}`), or pass a local index file."
            ) from None
        raise RegisterNeuronIndexError(
            f"Could not reach {hub_constants.ENDPOINT} for the {where}, and it is not in the Hugging Face cache: "
            "check the connection (or HF_ENDPOINT), or pass a local index file."
        ) from None
    except hub_errors.GatedRepoError:
        raise RegisterNeuronIndexError(
            f"Hub repository {repo_id!r} is gated: accept its conditions on its page, then log in (`hf auth login` "
            "or HF_TOKEN)."
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise RegisterNeuronIndexError(
            f"No Hub repository {repo_id!r} at {hub_constants.ENDPOINT} (if it is private, log in with `hf auth "
            "login` or set HF_TOKEN)."
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise RegisterNeuronIndexError(
            f"Hub repository {repo_id!r} has no revision {revision!r} (a branch, tag or commit)."
        ) from None
    except hub_errors.RemoteEntryNotFoundError:
        raise RegisterNeuronIndexError(
            f"Hub repository {repo_id!r}{f' at revision {revision!r}' if revision else ''} has no {filename}: an "
            f"index repository holds {INDEX_FILENAME} (`ttreg push-index` writes it); name another file as "
            f"{repo_id}/path/to/index.safetensors."
        ) from None
    except (OSError, ValueError) as error:  # other HTTP errors (HfHubHTTPError is an OSError), invalid arguments
        if isinstance(error, RegisterNeuronIndexError):
            raise
        raise RegisterNeuronIndexError(f"Could not download the {where}: {_first_line(error)}") from None


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(error).__name__


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


PROVENANCE_FIELDS = ("image_size", "checkpoints", "weights_fingerprint")


def check_provenance(provenance) -> None:
    """Raise unless ``provenance`` is `None` or what `RegisterNeuronIndex.provenance` gives (a config may be hostile)."""
    if provenance is None:
        return
    name = "register_index_provenance"
    valid = isinstance(provenance, Mapping) and set(provenance) <= set(PROVENANCE_FIELDS)
    if valid:
        image_size, checkpoints = provenance.get("image_size"), provenance.get("checkpoints", {})
        fingerprint = provenance.get("weights_fingerprint")
        valid = (
            (image_size is None or _is_size(image_size))
            and isinstance(checkpoints, Mapping)
            and all(isinstance(v, str) for v in [*checkpoints, *checkpoints.values()])
            and (fingerprint is None or isinstance(fingerprint, str))
        )
    if not valid:
        raise RegisterNeuronIndexError(
            f"{name} must be null or a mapping of {list(PROVENANCE_FIELDS)} (an int image size or null, a mapping of "
            f"strings, a string or null), as an index file gives it; got {_describe(provenance)}."
        )
