"""Register settings take effect when they are written, to the config or through `set_register_neurons`; a forward
only reads what the write set up: it replaces no module and writes no attribute, so hooks and compiled graphs stay."""

import copy

import pytest
import torch
from transformers import PreTrainedModel

from ttreg_hf import CLIPTTRegModel, Dinov2TTRegBackbone, Dinov2TTRegModel, vision_tower_with_registers
from ttreg_hf.configs.registers import REGISTER_SETTINGS
from ttreg_hf.errors import TTRegValueError

from family_models import LAYER, NEURONS, SIZE, TINY, tiny_model
from support import tiny_dinov2_config

NAFLEX_SIDE = 8  # the tiny SigLIP2's images: 8 x 8 patches of 12 px


def family_inputs(name: str) -> dict[str, torch.Tensor]:
    """Two random images as the tiny model of ``name`` takes them (SigLIP2: unpadded NaFlex patches)."""
    if name != "siglip2":
        return {"pixel_values": torch.randn(2, 3, SIZE, SIZE)}
    return {
        "pixel_values": torch.randn(2, NAFLEX_SIDE**2, 3 * 12 * 12),
        "pixel_attention_mask": torch.ones(2, NAFLEX_SIDE**2, dtype=torch.long),
        "spatial_shapes": torch.tensor([[NAFLEX_SIDE, NAFLEX_SIDE]] * 2),
    }


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's final tokens, registers included when it returns them (OpenCLIP and timm towers: their output)."""
    with torch.no_grad():
        if not isinstance(getattr(model, "_orig_mod", model), PreTrainedModel):  # `_orig_mod`: under torch.compile
            return model(inputs["pixel_values"])
        outputs = model(**inputs)
    if outputs.test_time_registers is None:
        return outputs.last_hidden_state
    return torch.cat((outputs.last_hidden_state, outputs.test_time_registers), dim=1)


def snapshot(model: torch.nn.Module) -> dict:
    """Every module by name with its identity, class and the identity of each attribute, parameter, buffer and child;
    the state-dict keys; the identity of each config attribute."""
    modules = {
        name: (
            id(module),
            type(module),
            {key: id(value) for key, value in vars(module).items()},
            {key: id(value) for key, value in [*module._parameters.items(), *module._buffers.items()]},
            {key: id(value) for key, value in module._modules.items()},
        )
        for name, module in model.named_modules(remove_duplicate=False)
    }
    config = {key: id(value) for key, value in vars(model.config).items()}
    return {"modules": modules, "state_dict": list(model.state_dict()), "config": config}


def settings(model) -> dict:
    return {name: copy.deepcopy(getattr(model.config, name)) for name in REGISTER_SETTINGS}


def edit_state(model) -> list[tuple]:
    """Per layer, what its edit does."""
    return [(site.register_edit.neuron_ids, site.register_edit.scale_values) for site in model.register_edit_sites]


@pytest.mark.parametrize("name", TINY)
def test_a_forward_after_a_settings_write_changes_nothing(name):
    model = TINY[name]().eval()
    inputs = family_inputs(name)
    model.config.register_neurons = {LAYER: list(NEURONS)}  # written, not yet run
    model.config.num_test_time_registers = 2
    before = snapshot(model)
    run(model, inputs)
    assert snapshot(model) == before


@pytest.mark.parametrize("name", TINY)
def test_a_config_write_takes_effect_at_once_or_is_refused(name):
    model = TINY[name]().eval()
    model.config.register_neurons = {LAYER: list(NEURONS)}
    model.config.num_test_time_registers = 2
    assert model.token_layout.num_registers == 2
    assert edit_state(model)[LAYER] == (NEURONS, (1.0, 1.0))
    model.set_register_neurons(None, register_scale=[0.5, 2.0])
    assert edit_state(model)[LAYER] == (NEURONS, (0.5, 2.0))
    written, state = settings(model), edit_state(model)
    with pytest.raises(TTRegValueError, match="register_scale has 2 values for 3 test-time"):
        model.config.num_test_time_registers = 3
    with pytest.raises(TTRegValueError, match="out of range"):
        model.config.register_neurons = {LAYER: [10_000]}
    with pytest.raises(TypeError, match="cannot be edited in place: assign a new value"):
        model.config.register_neurons[str(LAYER)].append(0)
    with pytest.raises(TypeError, match="cannot be edited in place"):
        model.config.register_scale[0] = 1.0
    assert settings(model) == written and edit_state(model) == state and model.token_layout.num_registers == 2
    model.config.register_neurons = None  # the edit off
    assert model.token_layout.num_registers == 0 and all(neurons == () for neurons, _ in edit_state(model))


def test_what_a_write_runs_is_what_a_model_built_with_it_runs(images):
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    model.config.num_test_time_registers = 2
    model.config.register_neurons = {"2": [9]}
    model.config.register_patch_mode = "mean"
    built = Dinov2TTRegModel(copy.deepcopy(model.config)).eval()
    built.load_state_dict(model.state_dict())
    assert torch.equal(run(model, {"pixel_values": images}), run(built, {"pixel_values": images}))


def test_a_hook_on_an_edit_survives_every_settings_change(images):
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    edit = model.encoder.layer[2].mlp.register_edit
    seen = []
    edit.register_forward_hook(lambda module, args, output: seen.append(output.shape[1]))
    changes = [
        lambda: model.set_register_neurons({2: [4, 8]}),
        lambda: setattr(model.config, "num_test_time_registers", 3),
        lambda: setattr(model.config, "register_neurons", {}),  # off: the edit passes the activations on
        lambda: setattr(model.config, "register_neurons", {"1": [2]}),  # on, another layer: this edit off
        lambda: model.set_register_neurons({2: [1]}, num_test_time_registers=1),
    ]
    for change in changes:
        change()
        run(model, {"pixel_values": images})
        assert model.encoder.layer[2].mlp.register_edit is edit
    assert seen == [17 + 1, 17 + 3, 17, 17 + 3, 17 + 1]  # one call per forward, with that forward's registers


def test_a_copy_follows_its_own_config(images):
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    twin = copy.deepcopy(model)
    twin.config.num_test_time_registers = 2
    with pytest.raises(TypeError, match="cannot be edited in place"):
        twin.config.register_neurons["1"].append(0)
    assert (model.token_layout.num_registers, twin.token_layout.num_registers) == (1, 2)
    model.config.register_neurons = {}
    assert (model.token_layout.num_registers, twin.token_layout.num_registers) == (0, 2)


def test_composite_models_and_backbones_follow_the_same_rule():
    model = tiny_model("clip", CLIPTTRegModel)
    tower = vision_tower_with_registers(model)
    assert tower.config is model.config.vision_config
    model.config.vision_config.register_neurons = {LAYER: list(NEURONS)}
    assert edit_state(tower)[LAYER][0] == NEURONS and tower.token_layout.num_registers == 1
    with pytest.raises(ValueError, match="holds no num_test_time_registers: the vision_config does"):
        model.config.num_test_time_registers = 0
    assert tower.token_layout.num_registers == 1
    backbone = Dinov2TTRegBackbone(tiny_dinov2_config(out_indices=[1, 2]))
    backbone.config.num_test_time_registers = 0
    assert backbone.token_layout.num_registers == 0
    assert backbone.encoder.token_layout.num_registers == 0  # a layout reader


def test_a_compiled_model_follows_every_settings_change(images):
    """A forward reads the edits' settings, which dynamo guards: a change recompiles, even under ``fullgraph=True``."""
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    changes = [
        lambda: None,
        lambda: setattr(model.config, "register_neurons", {"1": [3, 70, 6], "2": [7, 100]}),  # same sizes
        lambda: setattr(model.config, "num_test_time_registers", 2),
        lambda: model.set_register_neurons({2: [9]}, register_semantics="reference"),
        lambda: setattr(model.config, "register_neurons", {}),
    ]
    for change in changes:
        change()
        inputs = {"pixel_values": images}
        torch.testing.assert_close(run(compiled, inputs), run(model, inputs), atol=1e-6, rtol=0)
