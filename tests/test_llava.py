"""A tiny random LLaVA (tiny CLIP tower + tiny Llama) with the test-time-register tower, end to end."""

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ttreg_hf import CLIPVisionTTRegModel, RegisterNeuronIndexError
from ttreg_hf.modeling.llava import load_llava, vision_tower_with_registers, with_test_time_register_tower

from host_models import IMAGE_TOKEN, VLM_TEXT, VLM_TOWER
from reference_edit import AUTOGRAD_MODES, hooked_register_edit

NEURONS = {0: [3, 40], 1: [5]}
NUM_PATCHES = 16  # 56 px, patch 14: what the processor would insert


def tiny_llava_config(**overrides) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**VLM_TOWER, image_size=56),
        text_config=LlamaConfig(**VLM_TEXT),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=NUM_PATCHES,
        **overrides,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava")
    LlavaForConditionalGeneration(tiny_llava_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parent(checkpoint):
    return LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()


@pytest.fixture
def inputs():
    input_ids = torch.tensor([[1, *[IMAGE_TOKEN] * NUM_PATCHES, 5, 6, 7]] * 2)
    return dict(input_ids=input_ids, pixel_values=torch.randn(2, 3, 56, 56))


def _hooked(tower):
    """The parent's CLIP tower with the edit done by hooks: every hidden state ends with the register."""
    down_projections = {layer: tower.encoder.layers[layer].mlp.fc2 for layer in NEURONS}
    return hooked_register_edit(tower.embeddings, down_projections, NEURONS)


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=4, do_sample=False)


def test_generate_with_register_and_baseline_switch(checkpoint, parent, inputs):
    model = load_llava(checkpoint, register_neurons=NEURONS).eval()
    assert isinstance(model, LlavaForConditionalGeneration)
    assert vision_tower_with_registers(model).token_layout.num_registers == 1
    assert _generate(model, inputs).shape == (2, 1 + NUM_PATCHES + 3 + 4)
    assert not torch.equal(model(**inputs).logits, parent(**inputs).logits)
    baseline = load_llava(checkpoint, num_test_time_registers=0).eval()
    assert torch.equal(baseline(**inputs).logits, parent(**inputs).logits)
    assert torch.equal(_generate(baseline, inputs), _generate(parent, inputs))


@pytest.mark.parametrize("layer", [-2, [-3, -1]])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_projector_sees_the_processors_tokens(inputs, layer, strategy):
    config = tiny_llava_config(vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    parent = LlavaForConditionalGeneration(config).eval()
    model = LlavaForConditionalGeneration(
        with_test_time_register_tower(copy.deepcopy(config), register_neurons=NEURONS)
    )
    model.load_state_dict(parent.state_dict())
    with torch.no_grad():
        with _hooked(parent.model.vision_tower):
            expected = parent.get_image_features(inputs["pixel_values"]).pooler_output  # the register included, last
        features = model.eval().get_image_features(inputs["pixel_values"]).pooler_output
    assert len(features) == len(expected) == 2
    for actual, with_register in zip(features, expected, strict=True):
        assert actual.shape[0] == NUM_PATCHES + (strategy == "full")
        torch.testing.assert_close(actual, with_register[:-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("autograd", AUTOGRAD_MODES)
def test_image_features_match_hooked_reference(checkpoint, parent, inputs, autograd):
    model = load_llava(checkpoint, register_neurons=NEURONS).eval()
    with torch.no_grad(), _hooked(parent.model.vision_tower):
        expected = parent.get_image_features(inputs["pixel_values"]).pooler_output  # the register included, last
    with autograd():  # with autograd on the edit copies the activations, without it it edits them in place
        actual = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert actual[0].requires_grad == (autograd is torch.enable_grad)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e[:-1], atol=1e-5, rtol=0)


def test_original_llava_feature_read(checkpoint, parent, inputs):
    tower = vision_tower_with_registers(load_llava(checkpoint, register_neurons=NEURONS)).eval()
    parent_tower = parent.model.vision_tower
    with torch.no_grad():
        with _hooked(parent_tower):
            expected = parent_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:-1]
        features = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    assert features.shape == (2, NUM_PATCHES, 32)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_save_load_round_trip_with_plain_transformers(checkpoint, inputs, tmp_path):
    model = load_llava(checkpoint, register_neurons=NEURONS).eval()
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()  # `_init_weights` refills the edits
    assert isinstance(reloaded.model.vision_tower, CLIPVisionTTRegModel)
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    assert torch.equal(load_llava(tmp_path)(**inputs).logits, model(**inputs).logits)  # index from the saved config


def test_missing_index_is_a_clear_error(checkpoint):
    with pytest.raises(RegisterNeuronIndexError, match="index is known for .*find-neurons"):
        load_llava(checkpoint)


def test_wrong_image_size_is_a_clear_error(checkpoint, inputs):
    model = load_llava(checkpoint, register_neurons=NEURONS)
    with pytest.raises(ValueError, match="does not match the model's 56x56"):
        model.get_image_features(torch.randn(1, 3, 42, 42))
