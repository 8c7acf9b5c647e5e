"""Helpers shared by the test modules: tiny configs, a model's parent on its weights, and the hook-based reference
edit run on that parent. Test modules import from here (and from `family_models`, `reference_edit`), never from one
another."""

from pathlib import Path

import torch
from torch import nn

from ttreg_hf import Dinov2TTRegConfig
from ttreg_hf.family import parent_class
from ttreg_hf.modeling.registers import register_settings

from reference_edit import hooked_register_edit

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # real weights, beside the development checkout


def tiny_dinov2_config(**overrides) -> Dinov2TTRegConfig:
    """A 3-layer, 32-wide DINOv2 config with test-time-register fields (eager attention, so maps can be returned)."""
    settings = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        register_neurons={1: [3, 70, 5], 2: [7, 100]},
    )
    config = Dinov2TTRegConfig(**{**settings, **overrides})
    config._attn_implementation = "eager"
    return config


def parent_of(model: nn.Module, **model_kwargs) -> nn.Module:
    """``model``'s parent class (`Dinov2Model` for `Dinov2TTRegModel`, ...) on its config and weights, in eval mode:
    the computation with no edit."""
    parent = parent_class(type(model))(model.config, **model_kwargs).eval()
    parent.load_state_dict(model.state_dict())
    return parent


def with_registers(outputs) -> torch.Tensor:
    """``last_hidden_state`` with the ``test_time_registers`` appended: the tokens as the reference edit leaves them."""
    return torch.cat([outputs.last_hidden_state, outputs.test_time_registers], dim=1)


def down_projection(mlp: nn.Module) -> nn.Module:
    """The MLP's output projection, whose input the reference edit rewrites (``fc2``, or ``down_proj`` when gated)."""
    return mlp.fc2 if hasattr(mlp, "fc2") else mlp.down_proj


def hooked_register_edit_of(model: nn.Module, parent: nn.Module, **settings):
    """`hooked_register_edit` on ``parent`` at ``model``'s declared seams, with ``model.config``'s register settings
    (``settings`` override them, e.g. ``num_prefix``)."""
    config, seams = model.config, model.register_seams
    blocks = parent.get_submodule(seams.blocks)
    neurons = config.register_neuron_index
    arguments = dict(
        num_registers=config.num_test_time_registers,
        num_prefix=model.num_prefix_tokens,
        scale=config.register_scale,
        semantics=config.register_semantics,
        patch_mode=config.register_patch_mode,
    )
    projections = {layer: down_projection(blocks[layer].get_submodule(seams.mlp)) for layer in neurons}
    return hooked_register_edit(parent.get_submodule(seams.appender), projections, neurons, **{**arguments, **settings})


def hooked_output(model: nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """The reference edit on ``model``'s parent (its weights, its settings): ``last_hidden_state`` with the registers
    last, to compare with `with_registers` of ``model``'s output. ``kwargs`` go to the parent's forward."""
    parent = parent_of(model)
    with hooked_register_edit_of(model, parent):
        return parent(pixel_values, **kwargs).last_hidden_state


def save_as_parent_checkpoint(model: nn.Module, folder) -> nn.Module:
    """``model`` saved to ``folder`` as a plain `transformers` checkpoint of its parent class (the parent's config,
    without the register settings, and ``model``'s weights); returns that parent model."""
    parent = parent_class(type(model))
    ours = set(register_settings(type(model.config))) | {"model_type"}
    fields = {key: value for key, value in model.config.to_dict().items() if key not in ours}
    parent_model = parent(parent.config_class(**fields))
    parent_model.load_state_dict(model.state_dict())
    parent_model.save_pretrained(folder)
    return parent_model


class ForwardCounter:
    """Counts the images ``model`` runs, without and with register neurons attached, and records the number of
    neurons attached at each edited forward (``ks``, once per change: the k values a search tried, in order)."""

    def __init__(self, model: nn.Module):
        self.unedited = self.edited = 0
        self.ks: list[int] = []
        self.model = model

    def __enter__(self) -> "ForwardCounter":
        def count(module, args, kwargs):
            pixel_values = args[0] if args else kwargs["pixel_values"]
            neurons = self.model.config.register_neuron_index
            if not neurons:
                self.unedited += len(pixel_values)
                return
            self.edited += len(pixel_values)
            k = sum(map(len, neurons.values()))
            if not self.ks or self.ks[-1] != k:
                self.ks.append(k)

        self.handle = self.model.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
