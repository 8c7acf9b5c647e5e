"""Research interventions at the MLP activation slot: move the outliers to any patch, ablate neurons, swap indices.

Each is a context manager; the model is as before once the ``with`` block ends. Each takes any model that holds
one test-time-register tower (`register_tower`: a tower, a classifier, a VLM, ...) and acts on that tower. Layers and neurons are checked as
the model checks an index, before anything is hooked; every forward inside the block is intervened on as it runs,
whatever settings it runs with (see `capture.hook_edit_slot`).
"""

import copy
import math
import numbers
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch

from ..configs.registers import REGISTER_SETTINGS
from ..errors import TTRegTypeError, TTRegValueError
from ..index import RegisterNeuronIndex, check_neurons_fit, normalize_neurons
from ..modeling.edit import RegisterNeuronEdit
from ..modeling.layout import TokenLayout
from ..modeling.registers import IndexSpec
from .capture import hook_edit_slot, resolve_layer_map
from .towers import register_tower

Neurons = Mapping[int, Sequence[int]] | RegisterNeuronIndex
Rewrite = Callable[[torch.Tensor], torch.Tensor]


def checked_neurons(model: torch.nn.Module, neurons: Neurons) -> dict[int, tuple[int, ...]]:
    """``neurons`` (``{layer: [neuron, ...]}`` or an index) checked as the model checks an index — neurons within its
    MLP width, each once, with the same messages — and its layers as `run_with_cache` reads them (negative ones count
    from the end); empty lists are dropped."""
    model = register_tower(model)
    if isinstance(neurons, RegisterNeuronIndex):
        neurons = neurons.neurons
    if not isinstance(neurons, Mapping):
        normalize_neurons(neurons)  # the index's message for a non-mapping
    normalized = normalize_neurons(resolve_layer_map(neurons, len(model.transformer_blocks), "the neurons"))
    check_neurons_fit(normalized, len(model.transformer_blocks), model.config.mlp_width)
    return normalized


@contextmanager
def _rewrite_slots(model: torch.nn.Module, functions: Mapping[int, Callable]) -> Iterator[None]:
    """``functions[layer](activations, token_mask)`` replaces layer ``layer``'s activations at every forward."""
    sites = register_tower(model).register_edit_sites
    with ExitStack() as stack:
        for layer, function in functions.items():
            stack.enter_context(hook_edit_slot(sites[layer], function))
        yield


@contextmanager
def rewrite_activations(model: torch.nn.Module, rewrites: Mapping[int, Rewrite]) -> Iterator[None]:
    """Inside the ``with`` block, every forward passes layer ``layer``'s MLP activations (``(batch, tokens,
    mlp_width)``, at the edit slot: after the activation and after the model's own edit, if any) through
    ``rewrites[layer]``, which returns the activations to use (same shape), before the MLP's output projection.
    Layers may be negative. The building block of every intervention here."""
    rewrites = resolve_layer_map(rewrites, len(register_tower(model).transformer_blocks), "rewrites")
    for layer, rewrite in rewrites.items():
        if not callable(rewrite):
            raise TTRegTypeError(
                f"The rewrite of layer {layer} must be a function of the activations, got {rewrite!r}."
            )

    def checked(layer: int, rewrite: Rewrite):
        def function(activations: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
            rewritten = rewrite(activations)
            if not isinstance(rewritten, torch.Tensor) or rewritten.shape != activations.shape:
                got = tuple(rewritten.shape) if isinstance(rewritten, torch.Tensor) else type(rewritten).__name__
                raise TTRegValueError(
                    f"The rewrite of layer {layer} returned {got}; it must return the activations to use, a tensor "
                    f"of their shape {tuple(activations.shape)} (e.g. `return activations` after editing in place)."
                )
            return rewritten

        return function

    with _rewrite_slots(model, {layer: checked(layer, rewrite) for layer, rewrite in rewrites.items()}):
        yield


@contextmanager
def with_register_neurons(model: torch.nn.Module, register_neurons: IndexSpec, **settings) -> Iterator[torch.nn.Module]:
    """Attach ``register_neurons`` (``{}``: edit off) to ``model``'s tower with `set_register_neurons`; every previous
    setting comes back after. Yields ``model``."""
    tower = register_tower(model)
    saved = {name: copy.deepcopy(getattr(tower.config, name)) for name in REGISTER_SETTINGS}
    tower.set_register_neurons(register_neurons, **settings)
    try:
        yield model
    finally:
        tower.set_register_neurons(saved.pop("register_neurons") or {}, **saved)


def _check_position(position: object) -> int:
    try:
        index = operator.index(position)
    except TypeError:
        index = None
    if index is None or isinstance(position, bool) or index < 0:
        raise TTRegValueError(
            f"The patch position must be an int >= 0 (row-major, 0 is the first patch), got {position!r}."
        )
    return index


@contextmanager
def shift_outliers(model: torch.nn.Module, neurons: Neurons, position: int) -> Iterator[None]:
    """Move the register neurons' activations to patch ``position`` (row-major) instead of a register.

    The paper's "Shifted" experiment: the same `RegisterNeuronEdit`, with the chosen patch in the register's place;
    in a padded batch, over each image's real tokens. Needs the model's own edit off (``with_register_neurons(model,
    {})``) at every forward; the position must be a real patch of every image.
    """
    model = register_tower(model)
    neurons = checked_neurons(model, neurons)
    position = _check_position(position)
    if model.token_layout.num_registers:
        raise TTRegValueError(
            "shift_outliers needs the test-time-register edit off: run it inside with_register_neurons(model, {})."
        )
    num_prefix = model.token_layout.num_prefix_tokens
    target = num_prefix + position
    device = next(model.parameters()).device
    edits = {
        layer: RegisterNeuronEdit(ids, TokenLayout(num_prefix, 1), (1.0,)).to(device) for layer, ids in neurons.items()
    }

    def last(tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (``(batch, tokens, ...)``) with the target patch moved to the end, where the edit's register is."""
        return torch.cat((tokens[:, :target], tokens[:, target + 1 :], tokens[:, target : target + 1]), dim=1)

    def check(activations: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        if model.token_layout.num_registers:  # the layout this forward runs with
            raise TTRegValueError(
                "shift_outliers needs the test-time-register edit off, and the settings changed inside it: turn the "
                "edit off with with_register_neurons(model, {}) around the whole experiment."
            )
        num_patches = activations.shape[1] - num_prefix
        if target >= activations.shape[1]:
            raise TTRegValueError(f"Patch position {position} is out of range: the image has {num_patches} patches.")
        if token_mask is not None and not bool(token_mask[:, target].all()):
            padded = [int(i) for i in (~token_mask[:, target].bool()).nonzero()[:, 0]]
            raise TTRegValueError(
                f"Patch position {position} is padding in image(s) {padded} of this padded batch: choose a position "
                "every image has (below its rows x columns), or shift those images separately."
            )

    def shift(edit: RegisterNeuronEdit):
        def function(activations: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
            check(activations, token_mask)
            edited = edit(last(activations), None if token_mask is None else last(token_mask))
            return torch.cat((edited[:, :target], edited[:, -1:], edited[:, target:-1]), dim=1)

        return function

    with _rewrite_slots(model, {layer: shift(edit) for layer, edit in edits.items()}):
        yield


@contextmanager
def ablate_neurons(model: torch.nn.Module, neurons: Neurons, value: float = 0.0) -> Iterator[None]:
    """Set the listed neurons' activations to ``value`` (a finite number) at every token; an empty list ablates
    nothing."""
    neurons = checked_neurons(model, neurons)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise TTRegValueError(f"The ablation value must be a finite number, got {value!r}.")

    def ablate(ids: Sequence[int]):
        index = torch.tensor(ids)

        def function(activations: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
            if abs(value) > torch.finfo(activations.dtype).max:
                raise TTRegValueError(f"The ablation value {value:g} overflows {activations.dtype}: use a smaller one.")
            return activations.index_fill(-1, index.to(activations.device), value)

        return function

    with _rewrite_slots(model, {layer: ablate(ids) for layer, ids in neurons.items()}):
        yield
