"""Register-neuron indices: JSON in the ``__metadata__`` header of a safetensors file (no tensors needed, no code run)."""

import json
import numbers
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from os import PathLike
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .settings import SEMANTICS

SCHEMA_VERSION = 1
METADATA_KEY = "ttreg_index"
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
    "Pass `register_neurons={layer: [neuron, ...]}` or the path of an index file (a `.safetensors` written by "
    "`ttreg find-neurons`), find one with `ttreg find-neurons MODEL IMAGE_DIR --out index.safetensors`, or pass "
    "`num_test_time_registers=0` to run the model without test-time registers."
)
REWRITE_HINT = "Write the index again with `ttreg find-neurons` or `RegisterNeuronIndex(...).save(path)`."
MAX_KEY_DIGITS = 6  # no model has a million blocks; and `int` refuses strings over 4300 digits with a plain ValueError
MAX_INDEX_CHARS = 1_000_000  # the JSON of an index is a few kB; a bigger header was not written as one
MAX_DETAILS_DEPTH = 32  # `details` holds flat facts and score lists; deep nesting would only defeat recursion limits


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, with the permissions of any file the user writes (it creates files 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class RegisterNeuronIndexError(ValueError):
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

    def to_json(self) -> dict:
        data = asdict(self)
        data["neurons"] = {str(layer): list(ids) for layer, ids in self.neurons.items()}
        return {"schema_version": SCHEMA_VERSION, **data}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors({}, path, {"format": "pt", METADATA_KEY: json.dumps(self.to_json())})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RegisterNeuronIndex":
        """Read an index file; anything but a valid index is a `RegisterNeuronIndexError` naming the problem."""
        path = Path(path)
        if not _is_file(path):
            raise RegisterNeuronIndexError(f"No register-neuron index at {path}. {FIND_NEURONS_HINT}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise RegisterNeuronIndexError(
                f"{path} is not a readable safetensors file ({error}). {FIND_NEURONS_HINT}"
            ) from error
        if METADATA_KEY not in metadata:
            raise RegisterNeuronIndexError(f"{path} holds no register-neuron index (no {METADATA_KEY!r} metadata).")
        try:
            return cls._from_json(metadata[METADATA_KEY])
        except RegisterNeuronIndexError as error:
            raise RegisterNeuronIndexError(
                f"The register-neuron index in {path} is corrupt. {error} {REWRITE_HINT}"
            ) from error

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
    """An index from a shipped name (``"dinov2_vitl14"``), a file path, or a plain ``{layer: [neuron, ...]}`` dict."""
    if isinstance(spec, RegisterNeuronIndex):
        return spec
    if isinstance(spec, Mapping):
        return normalize_neurons(spec)
    if not isinstance(spec, (str, PathLike)):
        raise TypeError(
            f"register_neurons must be a dict {{layer: [neuron, ...]}}, an index file, a shipped index name or a "
            f"RegisterNeuronIndex, got {_describe(spec)}."
        )
    if _is_file(Path(spec)):
        return RegisterNeuronIndex.load(spec)
    shipped = shipped_indices()
    if str(spec) not in shipped:
        raise RegisterNeuronIndexError(
            f"{spec!r} is neither a file nor a shipped index ({', '.join(shipped) or 'none'}). {FIND_NEURONS_HINT}"
        )
    return RegisterNeuronIndex.load(shipped[str(spec)])
