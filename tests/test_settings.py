"""Register settings a user can get wrong: every one is refused or warned about, never a silent wrong answer."""

import warnings

import pytest
import torch
from transformers import CLIPVisionConfig, Dinov2Config, Dinov2Model

from ttreg_hf import (
    CLIPVisionTTRegConfig,
    CLIPVisionTTRegModel,
    CLIPVisionTTRegModelWithProjection,
    Dinov2TTRegConfig,
    Dinov2TTRegModel,
)
from ttreg_hf.configs.registers import MAX_TEST_TIME_REGISTERS
from ttreg_hf.modeling.registers import RegisterEditOffWarning

from support import tiny_dinov2_config

DINOV2 = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)
CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14
)


@pytest.mark.parametrize("scale", [1e308, -1e39, [1.0, 1e308]])
def test_a_scale_past_float32_is_refused_at_config_time(scale):
    registers = len(scale) if isinstance(scale, list) else 1
    with pytest.raises(Exception, match=r"register_scale must be finite in float32 \(\|scale\| <= 3.403e\+38\)"):
        tiny_dinov2_config(register_scale=scale, num_test_time_registers=registers)


def test_the_largest_float32_scale_is_accepted():
    assert tiny_dinov2_config(register_scale=3e38).register_scales == (3e38,)


@pytest.mark.parametrize("count", [MAX_TEST_TIME_REGISTERS + 1, 10**6, -1])
def test_num_test_time_registers_is_bounded(count):
    with pytest.raises(Exception, match=f"must be >= 0 .* and <= {MAX_TEST_TIME_REGISTERS} .*got {count!r}"):
        tiny_dinov2_config(num_test_time_registers=count)


def test_the_most_registers_allowed_run(images):
    model = Dinov2TTRegModel(tiny_dinov2_config(num_test_time_registers=MAX_TEST_TIME_REGISTERS)).eval()
    with torch.no_grad():
        outputs = model(images)
    assert outputs.test_time_registers.shape == (4, MAX_TEST_TIME_REGISTERS, 32)
    assert outputs.last_hidden_state.shape == (4, 17, 32)


@pytest.mark.parametrize(
    "neurons, keys",
    [({1: [3], "1": [5]}, "1 and '1'"), ({"1": [3], "01": [5]}, "'1' and '01'"), ({1: [3], "001": []}, "1 and '001'")],
)
def test_a_layer_given_twice_is_refused_not_merged(neurons, keys):
    with pytest.raises(ValueError, match=f"layer 1 is given twice \\(as {keys}\\)"):
        tiny_dinov2_config(register_neurons=neurons)
    model = Dinov2TTRegModel(tiny_dinov2_config())
    with pytest.raises(ValueError, match="given twice"):
        model.set_register_neurons(neurons)
    assert model.config.register_neurons == {"1": [3, 70, 5], "2": [7, 100]}


def quiet(build):
    """``build()``, failing on any `RegisterEditOffWarning`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegisterEditOffWarning)
        return build()


def test_a_parent_dinov2_config_is_converted_with_every_field(images):
    parent_config = Dinov2Config(**DINOV2, layerscale_value=0.5, drop_path_rate=0.1, attn_implementation="eager")
    with pytest.warns(RegisterEditOffWarning):
        model = Dinov2TTRegModel(parent_config).eval()
    assert type(model.config) is Dinov2TTRegConfig and model.config._attn_implementation == "eager"
    ours = model.config.to_dict()
    assert {k: v for k, v in parent_config.to_dict().items() if k != "model_type"}.items() <= ours.items()
    parent = Dinov2Model(parent_config).eval()
    parent.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(images).last_hidden_state, parent(images).last_hidden_state)  # the edit is off
        model.set_register_neurons({1: [3]})
        assert model(images).test_time_registers.shape == (4, 1, 32)


@pytest.mark.parametrize("model_class", [CLIPVisionTTRegModel, CLIPVisionTTRegModelWithProjection])
def test_a_parent_clip_vision_config_is_converted(model_class):
    parent_config = CLIPVisionConfig(**CLIP, projection_dim=16, hidden_act="gelu", num_test_time_registers=0)
    model = quiet(lambda: model_class(parent_config))  # a parent config may carry our settings as extra attributes
    assert type(model.config) is CLIPVisionTTRegConfig and model.config.num_test_time_registers == 0
    assert (model.config.hidden_act, model.config.projection_dim, model.config.image_size) == ("gelu", 16, 28)
    with pytest.warns(RegisterEditOffWarning):
        model_class(CLIPVisionConfig(**CLIP))


def test_from_pretrained_converts_a_parent_config(tmp_path):
    Dinov2Model(Dinov2Config(**DINOV2)).save_pretrained(tmp_path)
    config = Dinov2Config.from_pretrained(tmp_path, layer_norm_eps=1e-5)
    model = quiet(lambda: Dinov2TTRegModel.from_pretrained(tmp_path, config=config, register_neurons={2: [5]}))
    assert model.config.layer_norm_eps == 1e-5 and model.config.register_neuron_index == {2: (5,)}


@pytest.mark.parametrize(
    "model_class, config, names",
    [
        (
            Dinov2TTRegModel,
            CLIPVisionConfig(**CLIP),
            "needs a Dinov2TTRegConfig \\(or a Dinov2Config.*got a CLIPVisionConfig",
        ),
        (CLIPVisionTTRegModel, Dinov2TTRegConfig(**DINOV2), "needs a CLIPVisionTTRegConfig.*got a Dinov2TTRegConfig"),
    ],
)
def test_a_config_of_another_family_is_a_type_error(model_class, config, names):
    with pytest.raises(TypeError, match=names):
        model_class(config)


def test_registers_without_neurons_warn_that_the_edit_is_off():
    with pytest.warns(RegisterEditOffWarning, match="no register_neurons, so the edit is off.*set_register_neurons"):
        model = Dinov2TTRegModel(Dinov2TTRegConfig(**DINOV2))
    assert model.token_layout.num_registers == 0  # what the warning says: the parent's computation
    for settings in ({"register_neurons": {}}, {"num_test_time_registers": 0}, {"register_neurons": {1: [3]}}):
        quiet(
            lambda settings=settings: Dinov2TTRegModel(Dinov2TTRegConfig(**DINOV2, **settings))
        )  # off on purpose, or on


def test_loaders_that_attach_the_index_do_not_warn(tmp_path):
    from hubconf import clip_vitl14_336_tt_reg, dinov2_vits14_tt_reg

    Dinov2Model(Dinov2Config(**DINOV2)).save_pretrained(tmp_path)
    model = quiet(lambda: Dinov2TTRegModel.from_pretrained(tmp_path, register_neurons={1: [3]}))
    assert model.token_layout.num_registers == 1
    with torch.device("meta"):
        quiet(lambda: dinov2_vits14_tt_reg(pretrained=False, register_neurons={1: [3]}))
        quiet(lambda: clip_vitl14_336_tt_reg(pretrained=False, register_neurons={1: [3]}))
