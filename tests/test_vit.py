"""ViTTTRegModel and DeiTTTRegModel as drop-in `ViTModel` / `DeiTModel`: the edit off is the parent, the edit on is
the hook-based reference on the parent, and the rest of the family contract (shapes, loading, compile, hub)."""

import pytest
import torch
from torch import nn
from transformers import AutoModel, DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTModel, ViTConfig, ViTModel

from ttreg_hf import DeiTTTRegConfig, DeiTTTRegModel, RegisterNeuronIndexError, ViTTTRegConfig, ViTTTRegModel
from ttreg_hf.hub import load_tt_model
from ttreg_hf.settings import PATCH_MODES, SEMANTICS

from reference_edit import hooked_register_edit

# family -> (config class, model class, parent model class, parent config class, tokens before the patches)
FAMILIES = {
    "vit": (ViTTTRegConfig, ViTTTRegModel, ViTModel, ViTConfig, 1),
    "deit": (DeiTTTRegConfig, DeiTTTRegModel, DeiTModel, DeiTConfig, 2),
}
ARCH = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
)


def tiny_config(family, **overrides):
    config_class = FAMILIES[family][0]
    config = config_class(**{**ARCH, "register_neurons": {1: [3, 70, 5], 2: [7, 100]}, **overrides})
    config._attn_implementation = "eager"
    return config


def parent_of(family, model):
    parent = FAMILIES[family][2](model.config).eval()
    parent.load_state_dict(model.state_dict())
    return parent


def with_registers(outputs):
    return torch.cat([outputs.last_hidden_state, outputs.test_time_registers], dim=1)


def hooked_output(family, parent, config, pixel_values, **kwargs):
    with hooked_register_edit(
        parent.embeddings,
        {layer: parent.layers[layer].mlp.fc2 for layer in config.register_neuron_index},
        config.register_neuron_index,
        num_registers=config.num_test_time_registers,
        num_prefix=FAMILIES[family][4],
        scale=config.register_scale,
        semantics=config.register_semantics,
        patch_mode=config.register_patch_mode,
    ):
        return parent(pixel_values, **kwargs).last_hidden_state


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32) * torch.linspace(0.5, 2.0, 4).view(4, 1, 1, 1)


families = pytest.mark.parametrize("family", FAMILIES)


@families
@pytest.mark.parametrize("edit_off", [{"num_test_time_registers": 0}, {"register_neurons": {}}])
def test_edit_off_is_bit_identical_to_the_parent(family, edit_off, images):
    model = FAMILIES[family][1](tiny_config(family, **edit_off)).eval()
    parent = parent_of(family, model)
    with torch.no_grad():
        outputs = model(images, output_hidden_states=True)
        expected = parent(images, output_hidden_states=True)
        as_tuple, parent_tuple = model(images, return_dict=False), parent(images, return_dict=False)
    assert torch.equal(outputs.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(outputs.pooler_output, expected.pooler_output)
    for a, b in zip(outputs.hidden_states, expected.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert len(as_tuple) == len(parent_tuple) == 2
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, parent_tuple))
    assert outputs.test_time_registers is None


@families
@pytest.mark.parametrize("patch_mode", PATCH_MODES)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_matches_hook_reference(family, semantics, patch_mode, images):
    config = tiny_config(family, register_semantics=semantics, register_patch_mode=patch_mode)
    model = FAMILIES[family][1](config).eval()
    with torch.no_grad():
        expected = hooked_output(family, parent_of(family, model), config, images)
        actual = with_registers(model(images))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@families
def test_gradients_and_several_registers_match_the_reference(family, images):
    config = tiny_config(family, num_test_time_registers=2, register_scale=[1.0, -0.5], register_patch_mode="mean")
    model = FAMILIES[family][1](config)
    parent = parent_of(family, model).train()
    actual = with_registers(model(images))
    expected = hooked_output(family, parent, config, images)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    actual.square().mean().backward()
    expected.square().mean().backward()
    for name in ("layers.1.mlp.fc1.weight", "embeddings.patch_embeddings.projection.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, parent.get_parameter(name).grad, atol=1e-6, rtol=1e-4)


@families
def test_interpolated_positions_match_the_reference(family):
    config = tiny_config(family)
    model = FAMILIES[family][1](config).eval()
    pixels = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        expected = hooked_output(family, parent_of(family, model), config, pixels, interpolate_pos_encoding=True)
        actual = with_registers(model(pixels, interpolate_pos_encoding=True))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@families
def test_outputs_keep_the_parents_shapes_and_expose_the_registers(family, images):
    config = tiny_config(family, num_test_time_registers=3, register_scale=1.0)
    model = FAMILIES[family][1](config).eval()
    with torch.no_grad():
        outputs = model(images, output_hidden_states=True)
        expected = parent_of(family, model)(images, output_hidden_states=True)
    num_tokens = FAMILIES[family][4] + 16
    assert outputs.last_hidden_state.shape == expected.last_hidden_state.shape == (4, num_tokens, 32)
    assert outputs.pooler_output.shape == expected.pooler_output.shape
    assert [h.shape for h in outputs.hidden_states] == [h.shape for h in expected.hidden_states]
    assert outputs.test_time_registers.shape == (4, 3, 32)


@families
def test_every_image_is_edited_on_its_own(family):
    model = FAMILIES[family][1](tiny_config(family)).eval()
    batch = torch.randn(16, 3, 32, 32) * torch.rand(16, 1, 1, 1) * 3
    with torch.no_grad():
        together = with_registers(model(batch))
        alone = [with_registers(model(batch[i : i + 1])) for i in (0, 7, 15)]
    for i, single in zip((0, 7, 15), alone):
        torch.testing.assert_close(together[i], single[0], atol=1e-6, rtol=0)


@families
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_matches_the_reference_in_that_precision(family, dtype, tolerance, images):
    config = tiny_config(family, register_patch_mode="only_outliers")
    model = FAMILIES[family][1](config).eval()
    parent = parent_of(family, model).to(dtype)
    with torch.no_grad():
        expected = hooked_output(family, parent, config, images.to(dtype))
        actual = with_registers(model.to(dtype)(images.to(dtype)))
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.usefixtures("fresh_compile_caches")
@families
def test_compiled_fullgraph_equals_eager(family, images):
    model = FAMILIES[family][1](tiny_config(family, register_semantics="reference")).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(with_registers(compiled(images)), with_registers(model(images)), atol=1e-6, rtol=0)


@families
def test_save_load_round_trip_and_automodel(family, tmp_path, images):
    config = tiny_config(family, register_scale=[0.5, 2.0], num_test_time_registers=2, register_semantics="reference")
    model = FAMILIES[family][1](config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is FAMILIES[family][1]
    for field in ("register_neurons", "num_test_time_registers", "register_scale", "register_semantics"):
        assert getattr(loaded.config, field) == getattr(config, field)
    assert type(AutoModel.from_config(config)) is FAMILIES[family][1]
    with torch.no_grad():
        assert torch.equal(loaded(images).test_time_registers, model(images).test_time_registers)


@families
def test_loads_a_parent_checkpoint(family, tmp_path, images):
    _, model_class, parent_class, parent_config_class, _ = FAMILIES[family]
    parent = parent_class(parent_config_class(**ARCH)).eval()
    parent.save_pretrained(tmp_path)  # the hub's (older) key layout
    model, info = model_class.from_pretrained(tmp_path, num_test_time_registers=0, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(model(images).pooler_output, parent(images).pooler_output)
    edited = model_class.from_pretrained(tmp_path, register_neurons={2: [5, 6]})
    assert edited.layers[2].mlp.register_edit.neuron_ids == (5, 6)


@families
def test_user_mistakes_are_clear_errors(family):
    model = FAMILIES[family][1](tiny_config(family))
    with pytest.raises(TypeError, match="floating-point.*image processor"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        model(torch.randn(1, 3, 36, 32), interpolate_pos_encoding=True)
    with pytest.raises(Exception, match=r"\[128\] in layer 1 are out of range"):
        tiny_config(family, register_neurons={1: [128]})


@families
def test_attention_mask_leaves_the_registers_visible(family, images):
    """A mask over the parent's tokens (one patch hidden) is the reference's with the registers visible."""
    config = tiny_config(family)
    model = FAMILIES[family][1](config).eval()
    mask = torch.ones(4, FAMILIES[family][4] + 16)
    mask[:, -3] = 0
    registers_visible = nn.functional.pad(mask, (0, 1), value=1)
    with torch.no_grad():
        expected = hooked_output(family, parent_of(family, model), config, images, attention_mask=registers_visible)
        actual = with_registers(model(images, attention_mask=mask))
        unmasked = with_registers(model(images))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(actual, unmasked, atol=1e-3)


@pytest.mark.parametrize(
    ("name", "model_class", "has_pooler"),
    [("vit_base_patch16_224_in21k", ViTTTRegModel, True), ("deit_base_distilled_patch16_224", DeiTTTRegModel, False)],
)
def test_hub_names_build_random_weights_offline(name, model_class, has_pooler):
    with torch.device("meta"):  # the architecture, without spending time on 86M random weights
        model = load_tt_model(name, pretrained=False, register_neurons={11: [3071]})
        with pytest.raises(RegisterNeuronIndexError, match=f"No register-neuron index is known for '{name}'"):
            load_tt_model(name, pretrained=False)
    assert type(model) is model_class
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.mlp_width) == (12, 768, 3072)
    assert model.layers[11].mlp.register_edit.neuron_ids == (3071,)
    assert (model.pooler is not None) == has_pooler


def test_hub_loader_reads_a_local_classifier_checkpoint_without_a_pooler(tmp_path, images):
    """DeiT's hub checkpoints are classifiers: the model is built without the pooler they do not hold."""
    classifier = DeiTForImageClassificationWithTeacher(DeiTConfig(**ARCH)).eval()
    classifier.save_pretrained(tmp_path)
    model = load_tt_model("deit_base_distilled_patch16_224", weights=tmp_path, num_test_time_registers=0)
    assert model.pooler is None
    with torch.no_grad():
        assert torch.equal(model(images).last_hidden_state, classifier.deit(images).last_hidden_state)
