"""Read a model's internals during its forward: MLP activations, block outputs and attention maps, per layer.

Works through the public seams of `TestTimeRegisterMixin`, so every model family is covered, on the one
test-time-register tower of whatever model is given (`register_tower`: a tower, a classifier, a VLM, ...): the MLP activations are
the output of each MLP's ``register_edit`` slot (what the output projection receives, after the edit if one is
attached), the block outputs are the residual stream after each of `transformer_blocks`, and the attention maps are
recomputed from each block's input (see `attention.py`). Hooks exist only inside the ``with`` block.

What is read is what each forward runs: a settings change inside the block is followed, because it updates each
MLP's edit in place (the hooks stay on it), and the layout is read from the register appender during the forward.
"""

import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TTRegTypeError, TTRegValueError
from ..modeling.layout import TokenLayout
from ..modeling.registers import check_pixel_values
from .attention import attention_reader
from .towers import register_tower

Layers = Iterable[int] | int | str | None
Observer = Callable[[torch.Tensor], None]
SlotFunction = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None]  # (activations, token mask)


def resolve_layer(layer: object, num_layers: int) -> int:
    """One layer number (negative ones count from the end) as a 0-based layer, or a clear `ValueError`."""
    try:
        index = operator.index(layer)
    except TypeError:
        index = None
    if index is None or isinstance(layer, bool):
        raise TTRegValueError(f"Layers must be 'all', None or layer numbers (ints), got {layer!r}.")
    if not -num_layers <= index < num_layers:
        raise TTRegValueError(
            f"Layer {index} is out of range: the model has {num_layers} layers (0-based, or negative)."
        )
    return index % num_layers


def resolve_layers(layers: Layers, num_layers: int) -> list[int]:
    """``"all"``, ``None`` (none), a layer number or layer numbers (negative ones count from the end) as sorted
    0-based layers."""
    if layers is None:
        return []
    if isinstance(layers, str) and layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        layers = [layers]
    return sorted({resolve_layer(layer, num_layers) for layer in layers})


def resolve_layer_map(mapping: Mapping, num_layers: int, what: str) -> dict[int, object]:
    """``{layer: value}`` with 0-based layers; a layer named twice (``3`` and ``-1`` of 4) is an error."""
    if not isinstance(mapping, Mapping):
        raise TTRegTypeError(f"{what} must be a mapping {{layer: ...}}, got {type(mapping).__name__}.")
    resolved, keys = {}, {}
    for key, value in mapping.items():
        layer = resolve_layer(key, num_layers)
        if layer in keys:
            raise TTRegValueError(f"Layer {layer} is given twice in {what} (as {keys[layer]!r} and {key!r}).")
        resolved[layer], keys[layer] = value, key
    return resolved


def _first_output(output):
    return output[0] if isinstance(output, tuple) else output


def _block_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The hidden states a block is called with, and its other keyword arguments."""
    if args:
        return args[0], kwargs
    name = next(key for key, value in kwargs.items() if isinstance(value, torch.Tensor))
    return kwargs[name], {key: value for key, value in kwargs.items() if key != name}


@contextmanager
def hook_edit_slot(mlp: nn.Module, function: SlotFunction) -> Iterator[None]:
    """Inside the ``with`` block, every call of ``mlp``'s edit slot passes its output and the token mask it got
    (``(batch, tokens)``, true on real tokens and registers; `None` unless the batch is padded) to ``function``; a
    tensor it returns replaces the output. The one hook point of the analysis tools."""

    def hook(edit: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        return function(output, kwargs.get("token_mask", args[1] if len(args) > 1 else None))

    handle = mlp.register_edit.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def observe(
    model: nn.Module,
    *,
    mlp: Mapping[int, Observer] = {},
    blocks: Mapping[int, Observer] = {},
    attentions: Mapping[int, Observer] = {},
    keys: Mapping[int, Observer] = {},
    attention_rows: int | None = None,
    detach: bool = True,
) -> Iterator[None]:
    """Call each observer with its layer's tensor during every forward inside the ``with`` block.

    ``mlp[layer]`` gets ``(batch, tokens, mlp_width)``, ``blocks[layer]`` ``(batch, tokens, width)`` and
    ``attentions[layer]`` ``(batch, heads, tokens, tokens)``, or only the rows of the first ``attention_rows`` query
    tokens ``(batch, heads, attention_rows, tokens)`` (the CLS token's: ``attention_rows=1``, far cheaper than every
    row), ``keys[layer]`` the attention's keys ``(batch, tokens,
    heads * head_dim)`` (recomputed by the family's attention reader, as the maps are); tokens include the test-time registers, if any, and a
    padded batch's padding. Layers may be negative. ``detach=False`` hands over the MLP activations and block
    outputs still attached to the autograd graph. ``model`` is any model that holds one test-time-register tower
    (`register_tower`), whose layers these are; a forward of ``model`` (a VLM's ``generate``) runs them.
    """
    model = register_tower(model)
    sites, block_list = model.register_edit_sites, model.transformer_blocks
    mlp, blocks, attentions, keys = (
        resolve_layer_map(observers, len(block_list), name)
        for observers, name in ((mlp, "mlp"), (blocks, "blocks"), (attentions, "attentions"), (keys, "keys"))
    )

    def hand_over(observer: Observer, output) -> None:
        tensor = _first_output(output)
        observer(tensor.detach() if detach else tensor)

    read_attention = attention_reader(model) if attentions or keys else None

    def on_attention(observer: Observer, keys_only: bool = False):
        rows = {} if keys_only or attention_rows is None else {"num_queries": attention_rows}

        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            with torch.no_grad():
                hidden_states, block_kwargs = _block_input(args, kwargs)
                observer(read_attention(block, hidden_states, **block_kwargs, keys_only=keys_only, **rows))

        return hook

    with ExitStack() as stack:
        for layer, observer in mlp.items():
            stack.enter_context(hook_edit_slot(sites[layer], lambda output, _, o=observer: hand_over(o, output)))
        for layer, observer in blocks.items():
            hook = block_list[layer].register_forward_hook(lambda _, args, output, o=observer: hand_over(o, output))
            stack.callback(hook.remove)
        for layer, observer in attentions.items():
            hook = on_attention(observer)
            stack.callback(block_list[layer].register_forward_pre_hook(hook, with_kwargs=True).remove)
        for layer, observer in keys.items():
            hook = on_attention(observer, keys_only=True)
            stack.callback(block_list[layer].register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield


@dataclass
class ActivationCache:
    """Tensors of the last forward, by 0-based layer; tokens are laid out as `layout` says (the layout that forward
    ran with). ``token_mask`` (``(batch, tokens)``, true on real tokens and registers) marks a padded batch's padding
    (SigLIP2 NaFlex); `None` when every token is real."""

    layout: TokenLayout
    mlp_activations: dict[int, torch.Tensor] = field(default_factory=dict)
    block_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None


@contextmanager
def capture(
    model: nn.Module,
    *,
    mlp: Layers = None,
    blocks: Layers = None,
    attentions: Layers = None,
    keys: Layers = None,
    detach: bool = True,
) -> Iterator[ActivationCache]:
    """Keep the chosen layers' tensors of the latest forward in an `ActivationCache` (see `observe` for ``detach``),
    with the layout and the padding mask that forward ran with; ``model`` as in `observe`."""
    model = register_tower(model)
    num_layers = len(model.transformer_blocks)
    cache = ActivationCache(model.token_layout)

    def keep(store: dict, layers: Layers) -> dict[int, Observer]:
        return {
            layer: (lambda tensor, layer=layer: store.__setitem__(layer, tensor))
            for layer in resolve_layers(layers, num_layers)
        }

    def read_layout(appender: nn.Module, args: tuple, output) -> None:
        cache.layout = appender.token_layout

    def read_mask(activations: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        cache.token_mask = None if token_mask is None else token_mask.bool()

    observers = dict(mlp=keep(cache.mlp_activations, mlp), blocks=keep(cache.block_outputs, blocks))
    observers["attentions"] = keep(cache.attentions, attentions)
    observers["keys"] = keep(cache.keys, keys)
    with ExitStack() as stack:
        stack.callback(model.register_appender.register_forward_hook(read_layout).remove)
        stack.enter_context(hook_edit_slot(model.register_edit_sites[0], read_mask))
        stack.enter_context(observe(model, **observers, detach=detach))
        yield cache


def run_with_cache(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    mlp: Layers = None,
    blocks: Layers = "all",
    attentions: Layers = None,
    keys: Layers = None,
    keep_grad: bool = False,
    **forward_kwargs,
) -> tuple[object, ActivationCache]:
    """One forward of ``model``'s test-time-register tower (`register_tower`: ``model`` itself, or the one inside a
    classifier, a VLM, ...) on ``pixel_values`` (moved to the model's device, floating-point images cast to its dtype; integer
    images are refused, as the model refuses them): ``(output, cache)``, as TransformerLens' ``run_with_cache``.
    Tensors among ``forward_kwargs`` (SigLIP2's ``pixel_attention_mask``, ``spatial_shapes``) move to the device too.
    ``keep_grad=True`` runs with autograd and keeps the cached MLP activations and block outputs in the graph;
    otherwise nothing is recorded for autograd."""
    model = register_tower(model)
    if not isinstance(pixel_values, torch.Tensor):
        raise TTRegTypeError(
            f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}: run the images through the "
            "model's image processor and pass its outputs (`run_with_cache(model, **inputs)`)."
        )
    check_pixel_values(pixel_values, patch_size=1)  # the model's own dtype check: only the dtype is checked here
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(parameter.device, parameter.dtype)
    forward_kwargs = {
        key: value.to(parameter.device) if isinstance(value, torch.Tensor) else value
        for key, value in forward_kwargs.items()
    }
    with (
        torch.set_grad_enabled(keep_grad),
        capture(model, mlp=mlp, blocks=blocks, attentions=attentions, keys=keys, detach=not keep_grad) as cache,
    ):
        output = model(pixel_values, **forward_kwargs)
    return output, cache
