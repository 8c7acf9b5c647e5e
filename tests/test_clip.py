"""`CLIPVisionTTRegModel` and its projection variant against the parent classes and the hook-based reference edit."""

import pytest
import torch
from transformers import AutoModel, CLIPConfig, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

from ttreg_hf import (
    CLIPVisionTTRegModel,
    CLIPVisionTTRegModelWithProjection,
    RegisterNeuronIndex,
    RegisterNeuronIndexError,
)

from reference_edit import AUTOGRAD_MODES, hooked_register_edit

NEURONS = {1: [3, 40, 5], 2: [7]}
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
    projection_dim=16,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny full `CLIPModel` checkpoint (vision keys under ``vision_model.``, as on the Hub)."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=16))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return path


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 28, 28) * torch.linspace(0.5, 2.0, 3).view(3, 1, 1, 1)


def test_loads_parent_checkpoint_weights(checkpoint):
    parent = CLIPVisionModel.from_pretrained(checkpoint)
    model = CLIPVisionTTRegModel.from_pretrained(checkpoint, register_neurons=NEURONS)
    parent_state = parent.state_dict()
    assert model.state_dict().keys() == parent_state.keys()
    assert all(torch.equal(value, parent_state[key]) for key, value in model.state_dict().items())


def test_edit_off_is_bit_identical_to_parent(checkpoint, pixels):
    parent = CLIPVisionModel.from_pretrained(checkpoint).eval()
    model = CLIPVisionTTRegModel.from_pretrained(checkpoint, num_test_time_registers=0).eval()
    expected, actual = parent(pixels, output_hidden_states=True), model(pixels, output_hidden_states=True)
    assert actual.test_time_registers is None
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(actual.pooler_output, expected.pooler_output)
    assert all(torch.equal(a, e) for a, e in zip(actual.hidden_states, expected.hidden_states, strict=True))


@pytest.mark.parametrize("autograd", AUTOGRAD_MODES)
@pytest.mark.parametrize(
    "semantics, patch_mode", [("paper", "zero"), ("reference", "mean"), ("paper", "only_outliers")]
)
def test_matches_hooked_reference(checkpoint, pixels, semantics, patch_mode, autograd):
    parent = CLIPVisionModel.from_pretrained(checkpoint).eval()
    model = CLIPVisionTTRegModel.from_pretrained(
        checkpoint,
        register_neurons=NEURONS,
        num_test_time_registers=2,
        register_scale=[1.0, 0.5],
        register_semantics=semantics,
        register_patch_mode=patch_mode,
    ).eval()
    down_projections = {layer: parent.encoder.layers[layer].mlp.fc2 for layer in NEURONS}
    with (
        torch.no_grad(),
        hooked_register_edit(
            parent.embeddings,
            down_projections,
            NEURONS,
            num_registers=2,
            scale=[1.0, 0.5],
            semantics=semantics,
            patch_mode=patch_mode,
        ),
    ):
        expected = parent(pixels, output_hidden_states=True)
    with autograd():  # with autograd on the edit copies the activations, without it it edits them in place
        actual = model(pixels, output_hidden_states=True)
    full = torch.cat([actual.last_hidden_state, actual.test_time_registers], dim=1)
    assert full.requires_grad == (autograd is torch.enable_grad)
    torch.testing.assert_close(full, expected.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.hidden_states[-2], expected.hidden_states[-2][:, :-2], atol=1e-5, rtol=0)


def test_outputs_keep_parent_shapes_and_expose_the_registers(checkpoint, pixels):
    model = CLIPVisionTTRegModel.from_pretrained(
        checkpoint, register_neurons=NEURONS, num_test_time_registers=2, attn_implementation="eager"
    ).eval()
    outputs = model(pixels, output_hidden_states=True, output_attentions=True)
    assert outputs.last_hidden_state.shape == (3, 5, 32)
    assert outputs.pooler_output.shape == (3, 32)
    assert outputs.test_time_registers.shape == (3, 2, 32)
    assert [h.shape for h in outputs.hidden_states] == [(3, 5, 32)] * 4
    assert [a.shape for a in outputs.attentions] == [(3, 2, 5, 5)] * 3
    assert [a.shape for a in outputs.test_time_register_attentions] == [(3, 2, 5, 2)] * 3
    assert model(pixels, return_dict=False)[0].shape == (3, 5, 32)


def test_batch_invariance(checkpoint, pixels):
    model = CLIPVisionTTRegModel.from_pretrained(checkpoint, register_neurons=NEURONS).eval()
    batched = model(pixels)
    for i in range(len(pixels)):
        single = model(pixels[i : i + 1])
        torch.testing.assert_close(single.last_hidden_state, batched.last_hidden_state[i : i + 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            single.test_time_registers, batched.test_time_registers[i : i + 1], atol=1e-6, rtol=0
        )


def test_with_projection(checkpoint, pixels):
    parent = CLIPVisionModelWithProjection.from_pretrained(checkpoint).eval()
    model = CLIPVisionTTRegModelWithProjection.from_pretrained(checkpoint, register_neurons=NEURONS).eval()
    assert isinstance(model.vision_model, CLIPVisionModel) and model.vision_model.config is model.config
    outputs = model(pixels)
    assert outputs.image_embeds.shape == (3, 16) and outputs.test_time_registers.shape == (3, 1, 32)
    tower = CLIPVisionTTRegModel.from_pretrained(checkpoint, register_neurons=NEURONS).eval()
    torch.testing.assert_close(
        outputs.image_embeds, parent.visual_projection(tower(pixels).pooler_output), atol=1e-6, rtol=0
    )
    model.set_register_neurons({})
    assert torch.equal(model(pixels).image_embeds, parent(pixels).image_embeds)


def test_save_load_round_trip(checkpoint, pixels, tmp_path):
    model = CLIPVisionTTRegModel.from_pretrained(checkpoint, register_neurons=NEURONS, register_scale=2.0).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()  # index from the saved config, buffers rebuilt
    assert type(reloaded) is CLIPVisionTTRegModel
    assert reloaded.config.register_neuron_index == model.config.register_neuron_index
    assert torch.equal(reloaded(pixels).test_time_registers, model(pixels).test_time_registers)


def test_missing_index_is_a_clear_error(checkpoint):
    with pytest.raises(RegisterNeuronIndexError, match="find-neurons"):
        CLIPVisionTTRegModel.from_pretrained(checkpoint)


@pytest.mark.parametrize("neurons, problem", [({3: [1]}, "has 3 layers"), ({1: [64]}, "MLP has 64 neurons")])
def test_index_for_another_shape_is_a_clear_error(checkpoint, neurons, problem):
    model = CLIPVisionTTRegModel.from_pretrained(checkpoint, num_test_time_registers=0)
    with pytest.raises(RegisterNeuronIndexError, match=problem):
        model.set_register_neurons(neurons)


def test_index_file_for_another_checkpoint_is_a_clear_error(checkpoint, tmp_path):
    other = RegisterNeuronIndex({5: [599]}, num_layers=12, mlp_width=3072, checkpoints={"hf": "laion/other"})
    model = CLIPVisionTTRegModel.from_pretrained(checkpoint, num_test_time_registers=0)
    with pytest.raises(RegisterNeuronIndexError, match="made for laion/other"):
        model.set_register_neurons(other.save(tmp_path / "other.safetensors"))


def test_bad_images_are_clear_errors(checkpoint):
    model = CLIPVisionTTRegModel.from_pretrained(checkpoint, register_neurons=NEURONS)
    with pytest.raises(ValueError, match="does not match the model's 28x28.*interpolate_pos_encoding"):
        model(torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 30, 30))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


@pytest.mark.usefixtures("fresh_compile_caches")
def test_compiles_fullgraph(checkpoint, pixels):
    model = CLIPVisionTTRegModel.from_pretrained(checkpoint, register_neurons=NEURONS).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(pixels).test_time_registers, model(pixels).test_time_registers, atol=1e-6, rtol=0
    )


def test_hub_entry_needs_an_index_and_builds_the_llava_tower():
    from hubconf import clip_vitl14_336_tt_reg

    with torch.device("meta"):  # ViT-L/14 at 336 px, built without allocating it
        with pytest.raises(RegisterNeuronIndexError, match="find-neurons"):
            clip_vitl14_336_tt_reg(pretrained=False)
        model = clip_vitl14_336_tt_reg(pretrained=False, register_neurons={22: [1, 4095]})
    assert isinstance(model, CLIPVisionTTRegModel)
    assert (model.config.image_size, model.config.mlp_width, model.config.hidden_act) == (336, 4096, "quick_gelu")


def test_recomputed_attention_equals_the_eager_attention(checkpoint, pixels):
    from ttreg_hf.analysis import run_with_cache

    model = CLIPVisionTTRegModel.from_pretrained(
        checkpoint, register_neurons=NEURONS, attn_implementation="eager"
    ).eval()
    _, cache = run_with_cache(model, pixels, attentions="all")
    with torch.no_grad():
        eager = model(pixels, output_attentions=True).attentions
        onto_registers = model(pixels, output_attentions=True).test_time_register_attentions
    for layer in range(VISION["num_hidden_layers"]):
        assert cache.attentions[layer].shape[-1] == 1 + 4 + 1  # CLS, patches, the test-time register
        eager_rows = torch.cat((eager[layer], onto_registers[layer]), dim=-1)  # the register's own row is not output
        torch.testing.assert_close(cache.attentions[layer][:, :, :-1], eager_rows)
