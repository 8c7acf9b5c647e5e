"""DINOv3ViTTTRegModel beyond the shared suites (`test_family_suite.py`, whose reference puts the registers where the
parent's own RoPE leaves tokens unrotated): the gated MLP, the rotation table, errors, the Hub name, the analysis
tools' attention reader."""

import pytest
import torch

from ttreg_hf import DINOv3ViTTTRegModel, RegisterNeuronIndexError
from ttreg_hf.hub import load_tt_model

from support import SPECS, parent_of, with_registers

DINOV3 = SPECS["dinov3"]
NUM_PREFIX = DINOV3.num_prefix  # CLS and 4 trained registers


@pytest.fixture
def images():
    return DINOV3.images()


def test_gated_mlp_edit_sits_after_the_gating(images):
    model = DINOV3.model(use_gated_mlp=True, hidden_act="silu", register_neurons={0: [1, 9], 2: [30]})
    with torch.no_grad():
        expected = DINOV3.reference(model, images)
        actual = with_registers(model(images))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_registers_are_not_rotated():
    """The rotation the blocks get: the patches' as in the parent, then cos 1 and sin 0 (the identity) per register."""
    model = DINOV3.model(num_test_time_registers=2, register_scale=1.0)
    pixels = torch.randn(1, 3, 32, 48)
    cos, sin = model.rope_embeddings(pixels)
    parent_cos, parent_sin = parent_of(model).rope_embeddings(pixels)
    assert torch.equal(cos[:-2], parent_cos) and torch.equal(sin[:-2], parent_sin)
    assert torch.equal(cos[-2:], torch.ones_like(cos[-2:])) and torch.equal(sin[-2:], torch.zeros_like(sin[-2:]))


def test_user_mistakes_are_clear_errors():
    model = DINOV3.model()
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
    model = DINOV3.model()
    model.set_register_neurons({0: [2], 2: [7, 100]}, num_test_time_registers=3, register_scale=[1.0, 2.0, 0.5])
    with torch.no_grad():
        expected = DINOV3.reference(model, images)
        actual = with_registers(model(images))
    assert actual.shape[1] == NUM_PREFIX + 16 + 3
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_recomputed_attention_with_rope_equals_the_eager_attention():
    """The analysis tools' DINOv3 reader (RoPE on the patches, identity on the registers) against the eager maps."""
    from ttreg_hf.analysis import run_with_cache

    model = DINOV3.model()
    pixels = torch.randn(2, 3, DINOV3.image_size, DINOV3.image_size)
    _, cache = run_with_cache(model, pixels, blocks=None, attentions="all")
    with torch.no_grad():
        outputs = model(pixels, output_attentions=True)
    for layer, (tokens, registers) in enumerate(zip(outputs.attentions, outputs.test_time_register_attentions)):
        num_tokens = tokens.shape[-1]
        torch.testing.assert_close(torch.cat((tokens, registers), dim=-1), cache.attentions[layer][:, :, :num_tokens])
