"""Research interventions at the MLP activation slot: move the outliers to any patch, ablate neurons, swap indices.

Each is a context manager; the model is as before once the ``with`` block ends.
"""

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch

from ..configs.registers import REGISTER_SETTINGS
from ..modeling.edit import RegisterNeuronEdit
from ..modeling.layout import TokenLayout
from ..modeling.registers import IndexSpec, TestTimeRegisterMixin

Neurons = Mapping[int, Sequence[int]]


Rewrite = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def rewrite_activations(model: TestTimeRegisterMixin, rewrites: Mapping[int, Rewrite]) -> Iterator[None]:
    """Inside the ``with`` block, every forward passes layer ``layer``'s MLP activations (``(batch, tokens,
    mlp_width)``, at the edit slot: after the activation and after the model's own edit, if any) through
    ``rewrites[layer]`` before the MLP's output projection. The building block of every intervention here."""
    sites = model.register_edit_sites
    with ExitStack() as stack:
        for layer, rewrite in rewrites.items():
            hook = sites[layer].register_edit.register_forward_hook(
                lambda module, args, output, rewrite=rewrite: rewrite(output)
            )
            stack.callback(hook.remove)
        yield


@contextmanager
def with_register_neurons(
    model: TestTimeRegisterMixin, register_neurons: IndexSpec, **settings
) -> Iterator[TestTimeRegisterMixin]:
    """Attach ``register_neurons`` (``{}``: edit off) with `set_register_neurons`; every previous setting comes back
    after."""
    saved = {name: copy.deepcopy(getattr(model.config, name)) for name in REGISTER_SETTINGS}
    model.set_register_neurons(register_neurons, **settings)
    try:
        yield model
    finally:
        model.set_register_neurons(saved.pop("register_neurons") or {}, **saved)


@contextmanager
def shift_outliers(model: TestTimeRegisterMixin, neurons: Neurons, position: int) -> Iterator[None]:
    """Move the register neurons' activations to patch ``position`` (row-major) instead of a register.

    The paper's "Shifted" experiment: the same `RegisterNeuronEdit`, with the chosen patch in the register's place.
    Needs the model's own edit off (``with_register_neurons(model, {})``).
    """
    layout = model.token_layout
    if layout.num_registers:
        raise ValueError(
            "shift_outliers needs the test-time-register edit off: run it inside with_register_neurons(model, {})."
        )
    target = layout.num_prefix_tokens + position
    shifted_layout = TokenLayout(layout.num_prefix_tokens, 1)

    def shift(edit: RegisterNeuronEdit):
        def rewrite(activations: torch.Tensor) -> torch.Tensor:
            if not layout.num_prefix_tokens <= target < activations.shape[1]:
                raise ValueError(
                    f"Patch position {position} is out of range: the image has {activations.shape[1] - layout.num_prefix_tokens} patches."
                )
            moved = torch.cat(
                (activations[:, :target], activations[:, target + 1 :], activations[:, target : target + 1]), dim=1
            )
            edited = edit(moved)
            return torch.cat((edited[:, :target], edited[:, -1:], edited[:, target:-1]), dim=1)

        return rewrite

    device = next(model.parameters()).device
    edits = {layer: RegisterNeuronEdit(ids, shifted_layout, (1.0,)).to(device) for layer, ids in neurons.items()}
    with rewrite_activations(model, {layer: shift(edit) for layer, edit in edits.items()}):
        yield


@contextmanager
def ablate_neurons(model: TestTimeRegisterMixin, neurons: Neurons, value: float = 0.0) -> Iterator[None]:
    """Set the listed neurons' activations to ``value`` at every token."""

    def ablate(ids: Sequence[int]):
        index = torch.tensor(list(ids))
        return lambda activations: activations.index_fill(-1, index.to(activations.device), value)

    with rewrite_activations(model, {layer: ablate(ids) for layer, ids in neurons.items()}):
        yield
