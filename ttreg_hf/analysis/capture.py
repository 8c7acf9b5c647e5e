"""Read a model's internals during its forward: MLP activations, block outputs and attention maps, per layer.

Works through the public seams of `TestTimeRegisterMixin`, so every model family is covered: the MLP activations are
the output of each MLP's ``register_edit`` slot (what the output projection receives, after the edit if one is
attached), the block outputs are the residual stream after each of `transformer_blocks`, and the attention maps are
recomputed from each block's input (see `attention.py`). Hooks exist only inside the ``with`` block.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling.layout import TokenLayout
from ..modeling.registers import TestTimeRegisterMixin
from .attention import attention_reader

Layers = Iterable[int] | str | None
Observer = Callable[[torch.Tensor], None]


def resolve_layers(layers: Layers, num_layers: int) -> list[int]:
    """``"all"``, ``None`` (none) or layer numbers (negative ones count from the end) as sorted 0-based layers."""
    if layers is None:
        return []
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        raise ValueError(f"Layers must be 'all', None or layer numbers, got {layers!r}.")
    resolved = set()
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"Layer {layer} is out of range: the model has {num_layers} layers (0-based, or negative)."
            )
        resolved.add(layer % num_layers)
    return sorted(resolved)


def _first_output(output):
    return output[0] if isinstance(output, tuple) else output


def _block_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The hidden states a block is called with, and its other keyword arguments."""
    if args:
        return args[0], kwargs
    name = next(key for key, value in kwargs.items() if isinstance(value, torch.Tensor))
    return kwargs[name], {key: value for key, value in kwargs.items() if key != name}


@contextmanager
def observe(
    model: TestTimeRegisterMixin,
    *,
    mlp: Mapping[int, Observer] = {},
    blocks: Mapping[int, Observer] = {},
    attentions: Mapping[int, Observer] = {},
    detach: bool = True,
) -> Iterator[None]:
    """Call each observer with its layer's tensor during every forward inside the ``with`` block.

    ``mlp[layer]`` gets ``(batch, tokens, mlp_width)``, ``blocks[layer]`` ``(batch, tokens, width)`` and
    ``attentions[layer]`` ``(batch, heads, tokens, tokens)``; tokens include the test-time registers, if any.
    ``detach=False`` hands over the MLP activations and block outputs still attached to the autograd graph.
    """
    sites, block_list = model.register_edit_sites, model.transformer_blocks

    def on_output(observer: Observer):
        def hook(module: nn.Module, args: tuple, output) -> None:
            tensor = _first_output(output)
            observer(tensor.detach() if detach else tensor)

        return hook

    read_attention = attention_reader(model) if attentions else None

    def on_attention(observer: Observer):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            with torch.no_grad():
                hidden_states, block_kwargs = _block_input(args, kwargs)
                observer(read_attention(block, hidden_states, **block_kwargs))

        return hook

    with ExitStack() as stack:
        for layer, observer in mlp.items():
            stack.callback(sites[layer].register_edit.register_forward_hook(on_output(observer)).remove)
        for layer, observer in blocks.items():
            stack.callback(block_list[layer].register_forward_hook(on_output(observer)).remove)
        for layer, observer in attentions.items():
            hook = on_attention(observer)
            stack.callback(block_list[layer].register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield


@dataclass
class ActivationCache:
    """Tensors of the last forward, by 0-based layer; tokens are laid out as `layout` says."""

    layout: TokenLayout
    mlp_activations: dict[int, torch.Tensor] = field(default_factory=dict)
    block_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)


@contextmanager
def capture(
    model: TestTimeRegisterMixin,
    *,
    mlp: Layers = None,
    blocks: Layers = None,
    attentions: Layers = None,
    detach: bool = True,
) -> Iterator[ActivationCache]:
    """Keep the chosen layers' tensors of the latest forward in an `ActivationCache` (see `observe` for ``detach``)."""
    num_layers = len(model.transformer_blocks)
    cache = ActivationCache(model.token_layout)

    def keep(store: dict, layers: Layers) -> dict[int, Observer]:
        return {
            layer: (lambda tensor, layer=layer: store.__setitem__(layer, tensor))
            for layer in resolve_layers(layers, num_layers)
        }

    with observe(
        model,
        mlp=keep(cache.mlp_activations, mlp),
        blocks=keep(cache.block_outputs, blocks),
        attentions=keep(cache.attentions, attentions),
        detach=detach,
    ):
        yield cache


def run_with_cache(
    model: TestTimeRegisterMixin,
    pixel_values: torch.Tensor,
    *,
    mlp: Layers = None,
    blocks: Layers = "all",
    attentions: Layers = None,
    keep_grad: bool = False,
    **forward_kwargs,
) -> tuple[object, ActivationCache]:
    """One forward of ``pixel_values`` (moved to the model's device and dtype): ``(output, cache)``, as
    TransformerLens' ``run_with_cache``. ``keep_grad=True`` runs with autograd and keeps the cached MLP activations
    and block outputs in the graph; otherwise nothing is recorded for autograd."""
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(parameter.device, parameter.dtype)
    with (
        torch.set_grad_enabled(keep_grad),
        capture(model, mlp=mlp, blocks=blocks, attentions=attentions, detach=not keep_grad) as cache,
    ):
        output = model(pixel_values, **forward_kwargs)
    return output, cache
