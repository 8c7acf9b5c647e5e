"""Register-neuron indices: JSON in the ``__metadata__`` header of a safetensors file (no tensors needed, no code run)."""

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .modeling.edit import SEMANTICS

SCHEMA_VERSION = 1
METADATA_KEY = "ttreg_index"
# a checkout (torch.hub, editable install) has `precomputed/` beside the package; a wheel installs it inside
PRECOMPUTED_DIR = next(
    (path for path in (Path(__file__).resolve().parent / d for d in ("../precomputed", "precomputed")) if path.is_dir()),
    None,
)
FIND_NEURONS_HINT = (
    "Pass `register_neurons={layer: [neuron, ...]}` or the path of an index file (a `.safetensors` written by "
    "`ttreg find-neurons`), find one with `ttreg find-neurons MODEL IMAGE_DIR --out index.safetensors`, or pass "
    "`num_test_time_registers=0` to run the model without test-time registers."
)


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, with the permissions of any file the user writes (it creates files 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class RegisterNeuronIndexError(ValueError):
    """A register-neuron index that is missing, corrupt, or made for another checkpoint."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_neurons(neurons: Mapping) -> dict[int, tuple[int, ...]]:
    """``{layer: [neuron, ...]}`` with int keys (JSON's str keys of digits too), sorted by layer, neuron order kept."""
    normalized = {}
    for layer, ids in neurons.items():
        layer_ok = _is_int(layer) or (isinstance(layer, str) and layer.isdigit())
        if not layer_ok or isinstance(ids, (str, bytes)) or not all(_is_int(n) for n in ids):
            raise RegisterNeuronIndexError(
                f"Register neurons must map int layers to lists of int neurons, got {layer!r}: {ids!r}."
            )
        layer_id, id_list = int(layer), list(ids)
        if len(set(id_list)) != len(id_list):
            raise RegisterNeuronIndexError(f"Layer {layer_id} lists a neuron twice: {id_list}.")
        if id_list:
            normalized[layer_id] = tuple(id_list)
    return dict(sorted(normalized.items()))


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
        object.__setattr__(self, "neurons", normalize_neurons(self.neurons))
        if self.semantics not in SEMANTICS:
            raise RegisterNeuronIndexError(f"Unknown semantics {self.semantics!r} in index; expected one of {SEMANTICS}.")
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
        path = Path(path)
        if not path.is_file():
            raise RegisterNeuronIndexError(f"No register-neuron index at {path}. {FIND_NEURONS_HINT}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise RegisterNeuronIndexError(f"{path} is not a readable safetensors file ({error}). {FIND_NEURONS_HINT}") from error
        if METADATA_KEY not in metadata:
            raise RegisterNeuronIndexError(f"{path} holds no register-neuron index (no {METADATA_KEY!r} metadata).")
        try:
            data = json.loads(metadata[METADATA_KEY])
            version = data.pop("schema_version")
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise RegisterNeuronIndexError(f"The register-neuron index in {path} is corrupt: {error}.") from error
        if version != SCHEMA_VERSION:
            raise RegisterNeuronIndexError(
                f"{path} has index schema version {version}; this ttreg_hf reads version {SCHEMA_VERSION}."
            )
        try:
            return cls(**data)
        except TypeError as error:
            raise RegisterNeuronIndexError(f"The register-neuron index in {path} is corrupt: {error}.") from error
        except RegisterNeuronIndexError as error:
            raise RegisterNeuronIndexError(f"{path}: {error}") from error

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
    if Path(spec).exists():
        return RegisterNeuronIndex.load(spec)
    shipped = shipped_indices()
    if str(spec) not in shipped:
        raise RegisterNeuronIndexError(
            f"{spec!r} is neither a file nor a shipped index ({', '.join(shipped) or 'none'}). {FIND_NEURONS_HINT}"
        )
    return RegisterNeuronIndex.load(shipped[str(spec)])
