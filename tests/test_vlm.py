"""`to_test_time_registers` and `load_vlm` on tiny random LLaVA (CLIP), LLaVA-NeXT (CLIP, anyres) and LLaVA-OneVision
(SigLIP, anyres, pooled tiles) models: the original with the edit off, the hooked parent's features with it on."""

import copy
from contextlib import contextmanager

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PixtralVisionConfig,
    SiglipVisionConfig,
)

from ttreg_hf import (
    CLIPVisionTTRegModel,
    RegisterNeuronIndexError,
    SiglipVisionTTRegModel,
    load_vlm,
    to_test_time_registers,
    vision_tower_with_registers,
)
from ttreg_hf.modeling.vlm import with_test_time_register_tower

from host_models import IMAGE_TOKEN, PAD, VLM_TEXT, llava, llava_next, llava_onevision
from reference_edit import hooked_register_edit

NEURONS = {0: [3, 40], 1: [5]}


KINDS = [llava, llava_next, llava_onevision]


@pytest.fixture(scope="module", params=KINDS, ids=lambda kind: kind.__name__)
def kind(request):
    """The parent VLM and its inputs: each prompt holds as many image tokens as the parent makes features."""
    torch.manual_seed(0)
    parent, images = request.param()
    parent.eval()
    with torch.no_grad():
        counts = [len(features) for features in parent.get_image_features(**images).pooler_output]
    longest = max(counts)
    input_ids = torch.tensor([[PAD] * (longest - n) + [1, *[IMAGE_TOKEN] * n, 5, 6, 7] for n in counts])
    return parent, dict(input_ids=input_ids, attention_mask=(input_ids != PAD).long(), **images), counts


def _upgraded(parent, **kwargs):
    return to_test_time_registers(copy.deepcopy(parent), **kwargs).eval()


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False)


@contextmanager
def _hooked(parent):
    """The parent with the edit done by hooks on its tower, and the register (the tower's last token) cut before the
    projector: what the language model should see."""
    tower = parent.model.vision_tower
    down_projections = {layer: tower.encoder.layers[layer].mlp.fc2 for layer in NEURONS}
    num_prefix = 0 if isinstance(tower.config, SiglipVisionConfig) else 1
    cut = parent.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: (args[0][:, :-1],))
    try:
        with hooked_register_edit(tower.embeddings, down_projections, NEURONS, num_prefix=num_prefix):
            yield
    finally:
        cut.remove()


@pytest.mark.parametrize(
    "edit_off", [dict(register_neurons={}), dict(num_test_time_registers=0)], ids=["no-index", "0-registers"]
)
def test_edit_off_is_the_original(kind, edit_off):
    parent, inputs, _ = kind
    model = _upgraded(parent, **edit_off)
    assert isinstance(model.model.vision_tower, (CLIPVisionTTRegModel, SiglipVisionTTRegModel))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, parent(**inputs).logits)
    assert torch.equal(_generate(model, inputs), _generate(parent, inputs))


def test_image_features_match_the_hooked_parent(kind):
    parent, inputs, counts = kind
    model = _upgraded(parent, register_neurons=NEURONS)
    images = {key: value for key, value in inputs.items() if key in ("pixel_values", "image_sizes")}
    with torch.no_grad():
        with _hooked(parent):
            expected = parent.get_image_features(**images).pooler_output
        features = model.get_image_features(**images).pooler_output
        logits = model(**inputs).logits  # the prompt's image tokens still match the features in number
    assert [len(f) for f in features] == counts
    for actual, reference in zip(features, expected, strict=True):
        torch.testing.assert_close(actual, reference, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(logits, parent(**inputs).logits, atol=1e-3)  # the edit reaches the language model
    assert _generate(model, inputs).shape == _generate(parent, inputs).shape


def test_the_tower_shares_the_weights_and_the_config(kind):
    parent, inputs, _ = kind
    original = copy.deepcopy(parent)
    tower = original.model.vision_tower
    tower.requires_grad_(False)
    model = to_test_time_registers(original, register_neurons=NEURONS)
    upgraded = vision_tower_with_registers(model)
    assert upgraded is model.model.vision_tower and upgraded.config is model.config.vision_config
    assert dict(upgraded.named_parameters()) == dict(tower.named_parameters())  # the same tensors: no copy, no init
    assert upgraded.embeddings.position_ids is tower.embeddings.position_ids  # a non-persistent buffer
    assert not any(t.is_meta or t.requires_grad for t in upgraded.parameters())
    assert not any(t.is_meta for t in upgraded.buffers())
    assert upgraded.config.register_neuron_index == {0: (3, 40), 1: (5,)}
    assert upgraded.config._attn_implementation == tower.config._attn_implementation


def test_save_load_round_trip(kind, tmp_path):
    parent, inputs, _ = kind
    model = _upgraded(parent, register_neurons=NEURONS, register_scale=2.0)
    model.save_pretrained(tmp_path)
    reloaded = type(parent).from_pretrained(tmp_path).eval()  # plain transformers: the config says what to build
    tower = vision_tower_with_registers(reloaded)
    assert (tower.config.register_neuron_index, tower.config.register_scale) == ({0: (3, 40), 1: (5,)}, 2.0)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
        assert torch.equal(load_vlm(tmp_path, model_class=type(parent))(**inputs).logits, model(**inputs).logits)


def test_load_vlm_builds_what_the_upgrade_makes(kind, tmp_path):
    parent, inputs, _ = kind
    parent.save_pretrained(tmp_path)
    loaded = load_vlm(tmp_path, register_neurons=NEURONS, register_semantics="reference").eval()
    upgraded = _upgraded(parent, register_neurons=NEURONS, register_semantics="reference")
    assert type(loaded) is type(upgraded) and type(upgraded).__bases__[-1] is type(parent)  # our host class, in place
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, upgraded(**inputs).logits)
    baseline = load_vlm(tmp_path, num_test_time_registers=0).eval()
    assert torch.equal(_generate(baseline, inputs), _generate(parent, inputs))


def test_family_settings_reach_the_tower_and_typos_are_refused():
    parent, _ = llava_onevision()
    model = to_test_time_registers(parent, register_neurons=NEURONS, pool_registers=False)
    assert model.config.vision_config.pool_registers is False
    clip_parent, _ = llava()
    with pytest.raises(TypeError, match="pool_registers not a setting of CLIPVisionTTRegConfig"):
        to_test_time_registers(clip_parent, register_neurons=NEURONS, pool_registers=False)
    with pytest.raises(TypeError, match="register_scales not a setting"):
        with_test_time_register_tower(clip_parent.config, register_scales=2.0)


def test_mistakes_are_clear_errors_and_change_nothing():
    parent, _ = llava()
    tower = parent.model.vision_tower
    with pytest.raises(RegisterNeuronIndexError, match="find-neurons"):
        to_test_time_registers(parent)
    with pytest.raises(RegisterNeuronIndexError, match=r"\[64\] in layer 0 are out of range"):
        to_test_time_registers(parent, register_neurons={0: [64]})
    assert parent.model.vision_tower is tower and type(parent.config.vision_config) is CLIPVisionConfig
    to_test_time_registers(parent, register_neurons=NEURONS)
    with pytest.raises(ValueError, match="already has test-time registers.*set_register_neurons"):
        to_test_time_registers(parent, register_neurons=NEURONS)


def test_a_dispatched_tower_is_refused():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    parent, _ = llava()
    add_hook_to_module(parent.model.vision_tower.encoder.layers[1], AlignDevicesHook(execution_device="cpu"))
    with pytest.raises(ValueError, match="model.vision_tower is dispatched by accelerate.*load_vlm"):
        to_test_time_registers(parent, register_neurons=NEURONS)


def test_unsupported_tower_is_a_clear_error():
    config = LlavaConfig(
        vision_config=PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        text_config=LlamaConfig(**VLM_TEXT),
    )
    with pytest.raises(TypeError, match="SiglipVisionModel.*has 0 .*vision_config: pixtral"):
        with_test_time_register_tower(config)
    with pytest.raises(TypeError, match="CLIPVisionModel.*LlavaForConditionalGeneration has none"):
        to_test_time_registers(LlavaForConditionalGeneration(config))


def test_onevision_video_features_match_the_hooked_parent():
    torch.manual_seed(0)
    parent, _ = llava_onevision()
    model = _upgraded(parent.eval(), register_neurons=NEURONS)
    videos = torch.randn(1, 3, 3, 28, 28)  # frames are pooled on the patch grid: a register there would break it
    with torch.no_grad():
        with _hooked(parent):
            expected = parent.get_video_features(videos).pooler_output
        actual = model.get_video_features(videos).pooler_output
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_the_index_is_attached_once_and_the_edits_built_once(monkeypatch):
    from ttreg_hf.configs.registers import TestTimeRegisterConfigMixin
    from ttreg_hf.modeling.edit import RegisterNeuronEdit

    calls = {"attach": 0, "edits": 0}
    counted_methods = (
        (TestTimeRegisterConfigMixin, "attach_register_neurons", "attach"),
        (RegisterNeuronEdit, "configure", "edits"),  # every MLP has an edit: count those set up with neurons
    )
    for owner, name, key in counted_methods:
        original = getattr(owner, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += _key == "attach" or bool(args[1])
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    parent, _ = llava_next()
    to_test_time_registers(parent, register_neurons=NEURONS)
    assert calls == {"attach": 1, "edits": len(NEURONS)}
