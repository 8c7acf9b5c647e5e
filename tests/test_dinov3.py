"""DINOv3ViTTTRegModel as a drop-in `DINOv3ViTModel`: the edit off is the parent; the edit on is the hook-based
reference on the parent with the registers placed where the parent's own RoPE leaves tokens unrotated."""

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModel, DINOv3ViTConfig, DINOv3ViTModel

from ttreg_hf import DINOv3ViTTTRegConfig, DINOv3ViTTTRegModel, RegisterNeuronIndexError
from ttreg_hf.hub import load_tt_model
from ttreg_hf.settings import PATCH_MODES, SEMANTICS

from reference_edit import hooked_register_edit

ARCH = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    num_register_tokens=4,
    layerscale_value=0.5,
)
NUM_PREFIX = 5  # CLS and 4 trained registers


def tiny_config(**overrides):
    config = DINOv3ViTTTRegConfig(**{**ARCH, "register_neurons": {1: [3, 70, 5], 2: [7, 100]}, **overrides})
    config._attn_implementation = "eager"
    return config


def parent_of(model):
    parent = DINOv3ViTModel(model.config).eval()
    parent.load_state_dict(model.state_dict())
    return parent


def with_registers(outputs):
    return torch.cat([outputs.last_hidden_state, outputs.test_time_registers], dim=1)


def registers_last(tokens, num_registers):
    """``[prefix | registers | patches]`` -> ``[prefix | patches | registers]``."""
    registers = tokens[:, NUM_PREFIX : NUM_PREFIX + num_registers]
    return torch.cat([tokens[:, :NUM_PREFIX], tokens[:, NUM_PREFIX + num_registers :], registers], 1)


def registers_in_prefix(tokens, num_registers):
    """``[prefix | patches | registers]`` -> ``[prefix | registers | patches]``."""
    return torch.cat([tokens[:, :NUM_PREFIX], tokens[:, -num_registers:], tokens[:, NUM_PREFIX:-num_registers]], 1)


@contextmanager
def hooked_unrotated_registers(parent, config):
    """The parent with the edit done by `hooked_register_edit`, its registers moved to just after the trained ones.

    There the parent's `apply_rotary_pos_emb` leaves them unrotated by construction: an independent account of
    "registers get no RoPE". Around each edited MLP projection the registers are moved last, where the reference
    edit expects them, and back. The returned function turns the parent's last_hidden_state into our layout.
    """
    num_registers = config.num_test_time_registers
    down_projections = {layer: parent.model.layer[layer].mlp.down_proj for layer in config.register_neuron_index}
    with hooked_register_edit(
        parent.embeddings,
        down_projections,
        config.register_neuron_index,
        num_registers=num_registers,
        num_prefix=NUM_PREFIX,
        scale=config.register_scale,
        semantics=config.register_semantics,
        patch_mode=config.register_patch_mode,
    ):
        handles = [parent.embeddings.register_forward_hook(lambda m, a, out: registers_in_prefix(out, num_registers))]
        for projection in down_projections.values():
            handles.append(
                projection.register_forward_pre_hook(
                    lambda m, args: (registers_last(args[0], num_registers), *args[1:]), prepend=True
                )
            )
            handles.append(projection.register_forward_hook(lambda m, a, out: registers_in_prefix(out, num_registers)))
        try:
            yield lambda tokens: registers_last(tokens, num_registers)
        finally:
            for handle in handles:
                handle.remove()


def hooked_output(parent, config, pixel_values):
    with hooked_unrotated_registers(parent, config) as to_our_layout:
        return to_our_layout(parent(pixel_values).last_hidden_state)


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32) * torch.linspace(0.5, 2.0, 4).view(4, 1, 1, 1)


@pytest.mark.parametrize("edit_off", [{"num_test_time_registers": 0}, {"register_neurons": {}}])
def test_edit_off_is_bit_identical_to_the_parent(edit_off, images):
    model = DINOv3ViTTTRegModel(tiny_config(**edit_off)).eval()
    parent = parent_of(model)
    with torch.no_grad():
        outputs = model(images, output_hidden_states=True)
        expected = parent(images, output_hidden_states=True)
        as_tuple, parent_tuple = model(images, return_dict=False), parent(images, return_dict=False)
    assert torch.equal(outputs.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(outputs.pooler_output, expected.pooler_output)
    for a, b in zip(outputs.hidden_states, expected.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert len(as_tuple) == len(parent_tuple) and all(torch.equal(a, b) for a, b in zip(as_tuple, parent_tuple))
    assert outputs.test_time_registers is None


@pytest.mark.parametrize("patch_mode", PATCH_MODES)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_matches_hook_reference_with_unrotated_registers(semantics, patch_mode, images):
    config = tiny_config(register_semantics=semantics, register_patch_mode=patch_mode)
    model = DINOv3ViTTTRegModel(config).eval()
    with torch.no_grad():
        expected = hooked_output(parent_of(model), config, images)
        actual = with_registers(model(images))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_gated_mlp_edit_sits_after_the_gating(images):
    config = tiny_config(use_gated_mlp=True, hidden_act="silu", register_neurons={0: [1, 9], 2: [30]})
    model = DINOv3ViTTTRegModel(config).eval()
    with torch.no_grad():
        expected = hooked_output(parent_of(model), config, images)
        actual = with_registers(model(images))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_registers_are_not_rotated():
    """The rotation the blocks get: the patches' as in the parent, then cos 1 and sin 0 (the identity) per register."""
    model = DINOv3ViTTTRegModel(tiny_config(num_test_time_registers=2, register_scale=1.0)).eval()
    pixels = torch.randn(1, 3, 32, 48)
    cos, sin = model.rope_embeddings(pixels)
    parent_cos, parent_sin = parent_of(model).rope_embeddings(pixels)
    assert torch.equal(cos[:-2], parent_cos) and torch.equal(sin[:-2], parent_sin)
    assert torch.equal(cos[-2:], torch.ones_like(cos[-2:])) and torch.equal(sin[-2:], torch.zeros_like(sin[-2:]))


def test_gradients_and_several_registers_match_the_reference(images):
    config = tiny_config(num_test_time_registers=2, register_scale=[1.0, -0.5], register_patch_mode="mean")
    model = DINOv3ViTTTRegModel(config).eval()
    parent = parent_of(model)
    actual = with_registers(model(images))
    expected = hooked_output(parent, config, images)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    actual.square().mean().backward()
    expected.square().mean().backward()
    names = ("model.layer.1.mlp.up_proj.weight", "embeddings.patch_embeddings.weight", "embeddings.register_tokens")
    for name in names:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, parent.get_parameter(name).grad, atol=1e-6, rtol=1e-4)


def test_other_image_sizes_match_the_reference():
    config = tiny_config()
    model = DINOv3ViTTTRegModel(config).eval()
    pixels = torch.randn(2, 3, 48, 24)
    with torch.no_grad():
        expected = hooked_output(parent_of(model), config, pixels)
        actual = with_registers(model(pixels))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_outputs_keep_the_parents_shapes_and_expose_the_registers(images):
    model = DINOv3ViTTTRegModel(tiny_config(num_test_time_registers=3, register_scale=1.0)).eval()
    with torch.no_grad():
        outputs = model(images, output_hidden_states=True)
        expected = parent_of(model)(images, output_hidden_states=True)
    assert outputs.last_hidden_state.shape == expected.last_hidden_state.shape == (4, NUM_PREFIX + 16, 32)
    assert outputs.pooler_output.shape == expected.pooler_output.shape
    assert [h.shape for h in outputs.hidden_states] == [h.shape for h in expected.hidden_states]
    assert outputs.test_time_registers.shape == (4, 3, 32)
    assert model.token_layout.num_prefix_tokens == NUM_PREFIX


def test_every_image_is_edited_on_its_own():
    model = DINOv3ViTTTRegModel(tiny_config()).eval()
    batch = torch.randn(16, 3, 32, 32) * torch.rand(16, 1, 1, 1) * 3
    with torch.no_grad():
        together = with_registers(model(batch))
        alone = [with_registers(model(batch[i : i + 1])) for i in (0, 7, 15)]
    for i, single in zip((0, 7, 15), alone):
        torch.testing.assert_close(together[i], single[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_matches_the_reference_in_that_precision(dtype, tolerance, images):
    config = tiny_config(register_patch_mode="only_outliers")
    model = DINOv3ViTTTRegModel(config).eval()
    parent = parent_of(model).to(dtype)
    with torch.no_grad():
        expected = hooked_output(parent, config, images.to(dtype))
        actual = with_registers(model.to(dtype)(images.to(dtype)))
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.usefixtures("fresh_compile_caches")
def test_compiled_fullgraph_equals_eager(images):
    model = DINOv3ViTTTRegModel(tiny_config(register_semantics="reference")).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(with_registers(compiled(images)), with_registers(model(images)), atol=1e-6, rtol=0)


def test_save_load_round_trip_and_automodel(tmp_path, images):
    config = tiny_config(register_scale=[0.5, 2.0], num_test_time_registers=2, register_semantics="reference")
    model = DINOv3ViTTTRegModel(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is DINOv3ViTTTRegModel
    for field in ("register_neurons", "num_test_time_registers", "register_scale", "register_semantics"):
        assert getattr(loaded.config, field) == getattr(config, field)
    with torch.no_grad():
        assert torch.equal(loaded(images).test_time_registers, model(images).test_time_registers)


def test_loads_a_parent_checkpoint(tmp_path, images):
    parent = DINOv3ViTModel(DINOv3ViTConfig(**ARCH)).eval()
    parent.save_pretrained(tmp_path)
    model, info = DINOv3ViTTTRegModel.from_pretrained(tmp_path, num_test_time_registers=0, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == "dinov3_vit_tt_reg"
    with torch.no_grad():
        assert torch.equal(model(images).last_hidden_state, parent(images).last_hidden_state)
    edited = DINOv3ViTTTRegModel.from_pretrained(tmp_path, register_neurons={2: [5, 6]})
    assert edited.model.layer[2].mlp.register_edit.neuron_ids == (5, 6)


def test_user_mistakes_are_clear_errors():
    model = DINOv3ViTTTRegModel(tiny_config())
    with pytest.raises(TypeError, match="floating-point.*image processor"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        model(torch.randn(1, 3, 36, 32))


def test_hub_name_builds_random_weights_offline():
    with torch.device("meta"):  # the architecture, without spending time on 300M random weights
        model = load_tt_model("dinov3_vitl16", pretrained=False, register_neurons={23: [4095]})
        with pytest.raises(RegisterNeuronIndexError, match="No register-neuron index is known for 'dinov3_vitl16'"):
            load_tt_model("dinov3_vitl16", pretrained=False)
    assert type(model) is DINOv3ViTTTRegModel
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.mlp_width) == (24, 1024, 4096)
    assert config.num_register_tokens == 4
    assert model.token_layout.num_prefix_tokens == 5
    assert model.model.layer[23].mlp.register_edit.neuron_ids == (4095,)


def test_changing_the_number_of_registers_reaches_the_rotation(images):
    model = DINOv3ViTTTRegModel(tiny_config()).eval()
    model.set_register_neurons({0: [2], 2: [7, 100]}, num_test_time_registers=3, register_scale=[1.0, 2.0, 0.5])
    with torch.no_grad():
        expected = hooked_output(parent_of(model), model.config, images)
        actual = with_registers(model(images))
    assert actual.shape[1] == NUM_PREFIX + 16 + 3
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_recomputed_attention_with_rope_equals_the_eager_attention():
    """The analysis tools' DINOv3 reader (RoPE on the patches, identity on the registers) against the eager maps."""
    from ttreg_hf.analysis import run_with_cache

    model = DINOv3ViTTTRegModel(tiny_config()).eval()
    pixels = torch.randn(2, 3, *([ARCH["image_size"]] * 2))
    _, cache = run_with_cache(model, pixels, blocks=None, attentions="all")
    with torch.no_grad():
        outputs = model(pixels, output_attentions=True)
    for layer, (tokens, registers) in enumerate(zip(outputs.attentions, outputs.test_time_register_attentions)):
        num_tokens = tokens.shape[-1]
        torch.testing.assert_close(torch.cat((tokens, registers), dim=-1), cache.attentions[layer][:, :, :num_tokens])
