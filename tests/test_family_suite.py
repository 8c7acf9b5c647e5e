"""The suites every `transformers` tower family passes, driven by its spec (`support.SPECS`), as transformers'
`ModelTesterMixin` is by a `ModelTester`: the edit off is the parent bit for bit; the edit on is the hook-based
reference on the parent, in every setting, dtype and image size, with the same gradients; outputs keep the parent's
shapes; compile, save / load and parent checkpoints. A family's own behaviour stays in its test module."""

import inspect

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from ttreg_hf.family import parent_class
from ttreg_hf.settings import PATCH_MODES, SEMANTICS

from support import SPECS, parent_of, with_registers


@pytest.fixture(params=SPECS)
def spec(request):
    return SPECS[request.param]


@pytest.fixture
def images(spec):
    return spec.images()


@pytest.mark.parametrize("edit_off", [{"num_test_time_registers": 0}, {"register_neurons": {}}])
def test_edit_off_is_bit_identical_to_the_parent(spec, edit_off, images):
    model = spec.model(**edit_off)
    parent = parent_of(model)
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        outputs, expected = model(images, **kwargs), parent(images, **kwargs)
        as_tuple, parent_tuple = model(images, return_dict=False), parent(images, return_dict=False)
    for field in ("last_hidden_state", "pooler_output"):
        assert torch.equal(outputs[field], expected[field]), field
    for field in ("hidden_states", "attentions"):
        assert all(torch.equal(a, b) for a, b in zip(outputs[field], expected[field], strict=True)), field
    assert len(as_tuple) == len(parent_tuple) and all(torch.equal(a, b) for a, b in zip(as_tuple, parent_tuple))
    assert outputs.test_time_registers is None


@pytest.mark.parametrize("patch_mode", PATCH_MODES)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_matches_the_hook_reference(spec, semantics, patch_mode, images):
    model = spec.model(register_semantics=semantics, register_patch_mode=patch_mode)
    with torch.no_grad():
        torch.testing.assert_close(with_registers(model(images)), spec.reference(model, images), atol=1e-5, rtol=0)


def test_gradients_and_several_registers_match_the_reference(spec, images):
    model = spec.model(num_test_time_registers=2, register_scale=[1.0, -0.5], register_patch_mode="mean")
    parent = parent_of(model)  # both in eval mode (DINOv3's RoPE jitters in training)
    actual = with_registers(model(images))
    expected = spec.reference(model, images, parent)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    actual.square().mean().backward()
    expected.square().mean().backward()
    for name in spec.gradient_parameters:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, parent.get_parameter(name).grad, atol=1e-6, rtol=1e-4)


def test_another_image_size_matches_the_reference(spec):
    model = spec.model()
    kwargs, size = spec.resized
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(
            with_registers(model(pixels, **kwargs)), spec.reference(model, pixels, **kwargs), atol=1e-5, rtol=0
        )


def test_an_attention_mask_leaves_the_registers_visible(spec, images):
    """A mask over the parent's tokens (one patch hidden) is the reference's with the registers visible."""
    if "attention_mask" not in inspect.signature(spec.model_class.forward).parameters:
        pytest.skip(f"{spec.model_class.__name__} takes no attention mask")
    model = spec.model()
    mask = torch.ones(4, spec.num_prefix + (spec.image_size // model.config.patch_size) ** 2)
    mask[:, -3] = 0
    with torch.no_grad():
        actual = with_registers(model(images, attention_mask=mask))
        expected = spec.reference(model, images, attention_mask=nn.functional.pad(mask, (0, 1), value=1))
        unmasked = with_registers(model(images))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(actual, unmasked, atol=1e-3)


def test_outputs_keep_the_parents_shapes_and_expose_the_registers(spec, images):
    model = spec.model(num_test_time_registers=3, register_scale=1.0)
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        outputs, expected = model(images, **kwargs), parent_of(model)(images, **kwargs)
    num_tokens = spec.num_prefix + (spec.image_size // model.config.patch_size) ** 2
    assert outputs.last_hidden_state.shape == expected.last_hidden_state.shape == (4, num_tokens, 32)
    assert outputs.pooler_output.shape == expected.pooler_output.shape
    for field in ("hidden_states", "attentions"):
        assert [t.shape for t in outputs[field]] == [t.shape for t in expected[field]], field
    assert outputs.test_time_registers.shape == (4, 3, 32)
    assert [a.shape for a in outputs.test_time_register_attentions] == [(4, 2, num_tokens, 3)] * 3


def test_every_image_is_edited_on_its_own(spec):
    model = spec.model()
    batch = spec.images(16) * torch.rand(16, 1, 1, 1) * 3
    with torch.no_grad():
        together = with_registers(model(batch))
        alone = [with_registers(model(batch[i : i + 1])) for i in (0, 7, 15)]
    for i, single in zip((0, 7, 15), alone, strict=True):
        torch.testing.assert_close(together[i], single[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_matches_the_reference_in_that_precision(spec, dtype, tolerance, images):
    model = spec.model(register_patch_mode="only_outliers").to(dtype)
    with torch.no_grad():
        actual = with_registers(model(images.to(dtype)))
        expected = spec.reference(model, images.to(dtype))
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.usefixtures("fresh_compile_caches")
def test_compiled_fullgraph_equals_eager(spec, images):
    model = spec.model(register_semantics="reference", register_patch_mode="only_outliers")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(with_registers(compiled(images)), with_registers(model(images)), atol=1e-6, rtol=0)


def test_save_load_round_trip_and_automodel(spec, tmp_path, images):
    config = spec.config(register_scale=[0.5, 2.0], num_test_time_registers=2, register_semantics="reference")
    model = spec.model_class(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is spec.model_class and type(AutoModel.from_config(config)) is spec.model_class
    assert type(AutoConfig.from_pretrained(tmp_path)) is spec.model_class.config_class
    for field in ("register_neurons", "num_test_time_registers", "register_scale", "register_semantics"):
        assert getattr(loaded.config, field) == getattr(config, field)
    with torch.no_grad():
        expected, actual = model(images), loaded(images)
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(actual.test_time_registers, expected.test_time_registers)


def test_loads_a_parent_checkpoint(spec, tmp_path, images):
    """A checkpoint saved by the parent class (the Hub's key layout): every key loads, and it computes the parent."""
    parent_model = parent_class(spec.model_class)
    parent = parent_model(parent_model.config_class(**spec.arch)).eval()
    parent.save_pretrained(tmp_path)
    model, info = spec.model_class.from_pretrained(tmp_path, num_test_time_registers=0, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == spec.model_class.config_class.model_type
    with torch.no_grad():
        assert torch.equal(model(images).last_hidden_state, parent(images).last_hidden_state)
    edited = spec.model_class.from_pretrained(tmp_path, register_neurons={2: [5, 6]})
    assert edited.register_edit_sites[2].register_edit.neuron_ids == (5, 6)
    assert edited.config.register_neurons == {"2": [5, 6]}
