"""Dinov2TTRegModel as a drop-in `Dinov2Model`: equality with the edit off, shapes, loading, errors."""

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from ttreg_hf import Dinov2TTRegModel, RegisterNeuronIndexError

from support import tiny_dinov2_config


def test_selected_hidden_states_and_tuple_outputs(images):
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    parent = Dinov2Model(model.config).eval()
    with torch.no_grad():
        selected = model(images, output_hidden_states=[-1]).hidden_states
        full = model(images, output_hidden_states=True)
        last, pooled = model(images, return_dict=False)  # the parent's tuple: registers are a field only
        as_tuple = model(images, return_dict=False, output_hidden_states=True)
        parent_tuple = parent(images, return_dict=False, output_hidden_states=True)
    assert selected[0] is None and torch.equal(selected[-1], full.hidden_states[-1])
    assert selected[-1].shape == (4, 17, 32)
    assert torch.equal(last, full.last_hidden_state) and torch.equal(pooled, full.pooler_output)
    assert len(as_tuple) == len(parent_tuple) == 3 and len(as_tuple[2]) == len(parent_tuple[2])


def test_a_checkpoint_without_an_index_is_a_clear_error(tmp_path):
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(RegisterNeuronIndexError, match="No register-neuron index is known.*find-neurons"):
        Dinov2TTRegModel.from_pretrained(tmp_path)


def test_an_index_for_another_checkpoint_is_refused(tmp_path):
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(RegisterNeuronIndexError, match="made for facebook/dinov2-large"):
        Dinov2TTRegModel.from_pretrained(tmp_path, register_neurons="dinov2_vitl14")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"register_neurons": {3: [1]}}, "layer 3 is out of range: the model has 3 layers"),
        ({"register_neurons": {1: [128]}}, r"\[128\] in layer 1 are out of range: the MLP has 128"),
        ({"register_neurons": {1: [4, 4]}}, "lists a neuron twice"),
        ({"register_neurons": {1: [3.7]}}, "lists of int neurons"),
        ({"register_neurons": {1: "12"}}, "lists of int neurons"),
        ({"register_neurons": {True: [1]}}, "lists of int neurons"),
        ({"register_scale": float("nan")}, "register_scale must be finite"),
        ({"num_test_time_registers": -1}, "must be >= 0"),
        ({"num_test_time_registers": 2, "register_scale": [1.0]}, "1 values for 2 test-time registers"),
        ({"register_semantics": "authors"}, "register_semantics.*one of"),
        ({"register_patch_mode": "drop"}, "register_patch_mode.*one of"),
    ],
)
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(Exception, match=message):
        tiny_dinov2_config(**settings)


def test_set_register_neurons_validates_before_changing_anything():
    model = Dinov2TTRegModel(tiny_dinov2_config())
    with pytest.raises(Exception, match="out of range"):
        model.set_register_neurons({0: [999]})
    assert model.config.register_neurons == {"1": [3, 70, 5], "2": [7, 100]}
    assert model.encoder.layer[1].mlp.register_edit.neuron_ids == (3, 70, 5)


def test_image_size_the_patch_size_does_not_divide_is_an_error():
    model = Dinov2TTRegModel(tiny_dinov2_config())
    with pytest.raises(ValueError, match="not a multiple of the patch size 14x14.*e.g. 56x56"):
        model(torch.randn(1, 3, 60, 56))
    with pytest.raises(ValueError, match="not a multiple of the patch size 14x14.*e.g. 14x28"):
        model(torch.randn(1, 3, 7, 30))  # a side shorter than a patch: the smallest multiple, not 0


def test_integer_images_are_an_error():
    model = Dinov2TTRegModel(tiny_dinov2_config())
    with pytest.raises(TypeError, match="floating-point.*image processor"):
        model(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))


def test_other_image_sizes_interpolate_like_the_parent():
    config = tiny_dinov2_config(num_test_time_registers=0)
    model = Dinov2TTRegModel(config).eval()
    parent = Dinov2Model(config).eval()
    parent.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 84, 70)
    with torch.no_grad():
        assert torch.equal(model(pixels).last_hidden_state, parent(pixels).last_hidden_state)


def test_from_pretrained_by_hub_id_attaches_the_shipped_index(tmp_path):
    """`from_pretrained("facebook/dinov2-large")` offline, from a hub cache holding a narrow stand-in checkpoint with
    ViT-L/14's depth and MLP width (24 blocks of 4096 neurons)."""
    snapshot = tmp_path / "models--facebook--dinov2-large" / "snapshots" / "0123abcd"
    config = Dinov2Config(hidden_size=64, mlp_ratio=64, num_hidden_layers=24, num_attention_heads=1, image_size=28)
    Dinov2Model(config).save_pretrained(snapshot)
    (tmp_path / "models--facebook--dinov2-large" / "refs").mkdir()
    (tmp_path / "models--facebook--dinov2-large" / "refs" / "main").write_text("0123abcd")
    model = Dinov2TTRegModel.from_pretrained("facebook/dinov2-large", cache_dir=tmp_path)
    assert model.config.register_semantics == "reference"
    assert sum(len(ids) for ids in model.config.register_neurons.values()) == 45
    assert model.encoder.layer[17].mlp.register_edit.neuron_ids[:3] == (884, 133, 1427)
    assert model(torch.randn(1, 3, 28, 28)).test_time_registers.shape == (1, 1, 64)


def test_loading_info_and_the_model_type(tmp_path):
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)).save_pretrained(tmp_path)
    model, info = Dinov2TTRegModel.from_pretrained(tmp_path, register_neurons={1: [2]}, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == "dinov2_tt_reg"  # the parent's type is relabelled, with no mismatch warning
    assert model.encoder.layer[1].mlp.register_edit.neuron_ids == (2,)


def test_offloaded_layers_run_and_match(tmp_path, images):
    model = Dinov2TTRegModel(tiny_dinov2_config(num_test_time_registers=0)).eval()
    model.save_pretrained(tmp_path / "model")
    device_map = {
        "embeddings": "cpu",
        "encoder.layer.0": "cpu",
        "encoder.layer.1": "disk",
        "encoder.layer.2": "disk",
        "layernorm": "cpu",
    }
    kwargs = dict(register_neurons={1: [3, 70]}, num_test_time_registers=1, attn_implementation="eager")
    offloaded = Dinov2TTRegModel.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload", **kwargs
    )
    in_memory = Dinov2TTRegModel.from_pretrained(tmp_path / "model", **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(images).test_time_registers, in_memory(images).test_time_registers)


def test_gradient_checkpointing_gives_the_same_gradients(images):
    config = tiny_dinov2_config()
    plain = Dinov2TTRegModel(config).train()
    checkpointed = Dinov2TTRegModel(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    for model in (plain, checkpointed):
        outputs = model(images)
        (outputs.last_hidden_state.square().mean() + outputs.test_time_registers.square().mean()).backward()
    weight = "encoder.layer.1.mlp.fc1.weight"
    torch.testing.assert_close(checkpointed.get_parameter(weight).grad, plain.get_parameter(weight).grad)


def test_hub_loader_keeps_the_callers_semantics(tmp_path):
    from ttreg_hf import RegisterNeuronIndex
    from ttreg_hf.hub import load_tt_model

    path = RegisterNeuronIndex(neurons={3: [1]}, num_layers=12, mlp_width=1536, semantics="reference").save(
        tmp_path / "index.safetensors"
    )
    assert (
        load_tt_model("dinov2_vits14", pretrained=False, register_neurons=path).config.register_semantics == "reference"
    )
    chosen = load_tt_model("dinov2_vits14", pretrained=False, register_neurons=path, register_semantics="paper")
    assert chosen.config.register_semantics == "paper"
