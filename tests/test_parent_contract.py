"""What a drop-in owes its parent class, on every HF subclass: the parent's init, parent-shaped attentions, the
parent's own tensors without registers, and edits that survive a meta-device build."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, Dinov2Model

from ttreg_hf import (
    CLIPVisionTTRegConfig,
    CLIPVisionTTRegModel,
    CLIPVisionTTRegModelWithProjection,
    Dinov2TTRegConfig,
    Dinov2TTRegModel,
)
from ttreg_hf.analysis import run_with_cache, summarize_layers

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14)
FAMILIES = {
    "dinov2": (Dinov2TTRegModel, Dinov2Model, Dinov2TTRegConfig, {}),
    "dinov2_swiglu": (Dinov2TTRegModel, Dinov2Model, Dinov2TTRegConfig, {"use_swiglu_ffn": True}),
    "clip": (CLIPVisionTTRegModel, CLIPVisionModel, CLIPVisionTTRegConfig, {"intermediate_size": 64}),
    "clip_projection": (
        CLIPVisionTTRegModelWithProjection,
        CLIPVisionModelWithProjection,
        CLIPVisionTTRegConfig,
        {"intermediate_size": 64, "projection_dim": 16},
    ),
}
NEURONS = {1: [3, 40, 5], 2: [7]}


def tiny_config(family: str, **settings):
    _, _, config_class, extra = FAMILIES[family]
    config = config_class(**TINY, **extra, **{"register_neurons": NEURONS, **settings})
    config._attn_implementation = "eager"
    return config


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 28, 28)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_weights_equal_the_parents_for_the_same_seed(family):
    model_class, parent_class, _, _ = FAMILIES[family]
    config = tiny_config(family)
    torch.manual_seed(0)
    ours = model_class(config).state_dict()
    torch.manual_seed(0)
    parents = parent_class(config).state_dict()
    assert ours.keys() == parents.keys()
    assert [key for key in parents if not torch.equal(ours[key], parents[key])] == []


def test_missing_projection_gets_clips_init(tmp_path):
    """A vision-only checkpoint in `...WithProjection`: `visual_projection` is missing and initialised as CLIP does."""
    CLIPVisionModel(CLIPVisionConfig(**TINY, intermediate_size=64, projection_dim=16)).save_pretrained(tmp_path)
    torch.manual_seed(1)
    ours = CLIPVisionTTRegModelWithProjection.from_pretrained(tmp_path, register_neurons=NEURONS)
    torch.manual_seed(1)
    parent = CLIPVisionModelWithProjection.from_pretrained(tmp_path)
    torch.testing.assert_close(ours.visual_projection.weight, parent.visual_projection.weight, atol=0, rtol=0)
    assert parent.visual_projection.weight.std() > 0.1  # hidden_size ** -0.5, not the generic 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_device_build_then_init_weights_restores_the_edits(family, pixels):
    model_class = FAMILIES[family][0]
    config = tiny_config(family, num_test_time_registers=2)
    reference = model_class(config).eval()
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(reference.state_dict())
    for site, expected in zip(model.register_edit_sites, reference.register_edit_sites, strict=True):
        assert type(site.register_edit) is type(expected.register_edit)
        for name, buffer in expected.register_edit.named_buffers():
            assert torch.equal(site.register_edit.get_buffer(name), buffer), name
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixels).test_time_registers, reference(pixels).test_time_registers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("edit_off", [{"num_test_time_registers": 0}, {"register_neurons": {}}])
def test_without_registers_outputs_are_the_parents_tensors(family, edit_off, pixels):
    """`retain_grad` on hidden states and attentions works as on the parent: nothing is re-sliced."""
    model = FAMILIES[family][0](tiny_config(family, **edit_off))
    outputs = model(pixels, output_hidden_states=True, output_attentions=True)
    hidden, attention = outputs.hidden_states[1], outputs.attentions[1]
    hidden.retain_grad()
    attention.retain_grad()
    outputs.last_hidden_state[:, 0].sum().backward()
    assert hidden.grad is not None and attention.grad is not None
    assert outputs.test_time_registers is None and outputs.test_time_register_attentions is None


@pytest.mark.parametrize("family", FAMILIES)
def test_attentions_have_the_parents_shape_and_registers_their_own_field(family, pixels):
    model_class, parent_class, _, _ = FAMILIES[family]
    model = model_class(tiny_config(family, num_test_time_registers=2)).eval()
    parent = parent_class(model.config).eval()
    with torch.no_grad():
        outputs = model(pixels, output_attentions=True)
        expected = parent(pixels, output_attentions=True)
        _, cache = run_with_cache(model, pixels, attentions="all")  # maps recomputed from the blocks' inputs
        as_tuple = model(pixels, return_dict=False, output_attentions=True)
        parent_tuple = parent(pixels, return_dict=False, output_attentions=True)
    assert [a.shape for a in outputs.attentions] == [a.shape for a in expected.attentions] == [(3, 2, 5, 5)] * 3
    assert [a.shape for a in outputs.test_time_register_attentions] == [(3, 2, 5, 2)] * 3
    for layer, (tokens, registers) in enumerate(zip(outputs.attentions, outputs.test_time_register_attentions)):
        torch.testing.assert_close(torch.cat((tokens, registers), dim=-1), cache.attentions[layer][:, :, :5])
        torch.testing.assert_close((tokens.sum(-1) + registers.sum(-1)), torch.ones(3, 2, 5))
        cls_on_registers = registers[:, :, 0].sum(-1).mean().item()  # the analysis tools' CLS share, from the outputs
        assert summarize_layers(cache)[layer].cls_register_share == pytest.approx(cls_on_registers, rel=1e-5)
    assert len(as_tuple) == len(parent_tuple)  # the register fields are never tuple entries
    assert [a.shape for a in as_tuple[-1]] == [a.shape for a in parent_tuple[-1]]
