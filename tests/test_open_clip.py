"""`OpenCLIPTTRegVisionTransformer` against open_clip's `VisionTransformer` and the hook-based reference edit."""

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from safetensors.torch import load_file, save_file

from ttreg_hf import RegisterNeuronIndexError
from ttreg_hf.modeling.open_clip import (
    OpenCLIPTTRegVisionTransformer,
    checkpoint_uses_quick_gelu,
    create_model_and_transforms,
    to_test_time_registers,
)

from reference_edit import AUTOGRAD_MODES, hooked_register_edit

NEURONS = {0: [3, 70], 2: [5]}
TEXT = dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)


def _vision(**overrides):
    return dict(image_size=32, layers=3, width=32, head_width=16, patch_size=8, **overrides)


@pytest.fixture(scope="module", autouse=True)
def tiny_configs(tmp_path_factory):
    """Tiny architectures registered with open_clip the public way (a folder of model-config JSON files)."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    configs = {
        "tiny-vit": dict(embed_dim=16, vision_cfg=_vision(), text_cfg=TEXT),
        "tiny-vit-avg": dict(embed_dim=16, vision_cfg=_vision(pool_type="avg"), text_cfg=TEXT),
        "tiny-vit-quickgelu": dict(embed_dim=16, quick_gelu=True, vision_cfg=_vision(), text_cfg=TEXT),
    }
    for name, config in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 32, 32) * torch.linspace(0.5, 2.0, 3).view(3, 1, 1, 1)


def _parent_and_copy(name="tiny-vit", **settings):
    parent = open_clip.create_model(name).eval()
    return parent, to_test_time_registers(copy.deepcopy(parent), **settings).eval()


def _hooked(parent, **settings):
    """The parent with the edit done by hooks, its registers appended where ours are (after `patch_dropout`)."""
    blocks = parent.visual.transformer.resblocks
    down_projections = {layer: blocks[layer].mlp.c_proj for layer in NEURONS}
    return hooked_register_edit(parent.visual.patch_dropout, down_projections, NEURONS, **settings)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-vit-avg"])
def test_edit_off_is_bit_identical_to_parent(name, pixels):
    parent, model = _parent_and_copy(name, register_neurons=NEURONS, num_test_time_registers=0)
    assert isinstance(model.visual, OpenCLIPTTRegVisionTransformer)
    assert torch.equal(model.encode_image(pixels), parent.encode_image(pixels))
    expected, actual = parent.visual.forward_intermediates(pixels), model.visual.forward_intermediates(pixels)
    assert torch.equal(actual["image_features"], expected["image_features"])
    assert all(
        torch.equal(a, e) for a, e in zip(actual["image_intermediates"], expected["image_intermediates"], strict=True)
    )


def test_conversion_keeps_weights_and_keys(pixels):
    parent, model = _parent_and_copy(register_neurons=NEURONS)
    assert model.state_dict().keys() == parent.state_dict().keys()
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in model.state_dict().items())
    visual = open_clip.create_model("tiny-vit").visual
    assert to_test_time_registers(visual, register_neurons=NEURONS) is visual  # a bare tower, in place


@pytest.mark.parametrize("autograd", AUTOGRAD_MODES)
@pytest.mark.parametrize("semantics, patch_mode", [("paper", "zero"), ("reference", "mean")])
def test_matches_hooked_reference(pixels, semantics, patch_mode, autograd):
    parent, model = _parent_and_copy(
        register_neurons=NEURONS,
        num_test_time_registers=2,
        register_scale=[1.0, -0.5],
        register_semantics=semantics,
        register_patch_mode=patch_mode,
    )
    parent.visual.output_tokens = model.visual.output_tokens = True
    with (
        torch.no_grad(),
        _hooked(parent, num_registers=2, scale=[1.0, -0.5], semantics=semantics, patch_mode=patch_mode),
    ):
        expected_pooled, expected_tokens = parent.visual(pixels)  # `tok` pool: CLS, tokens include the registers
    with autograd():  # with autograd on the edit copies the activations, without it it edits them in place
        pooled, tokens = model.visual(pixels)
    assert tokens.requires_grad == (autograd is torch.enable_grad)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, expected_tokens[:, :-2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("autograd", AUTOGRAD_MODES)
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-vit-avg"])
def test_encode_image_and_zero_shot_match_hooked_reference(name, pixels, autograd):
    parent, model = _parent_and_copy(name, register_neurons=NEURONS)
    parent.visual.output_tokens = model.visual.output_tokens = True
    with torch.no_grad(), _hooked(parent):
        pooled_with_register, tokens_with_register = parent.encode_image(pixels)
    expected_tokens = tokens_with_register[:, :-1]
    # the parent's `avg` pool would average the register in: the expected pool is over the patches alone
    expected = pooled_with_register if name == "tiny-vit" else expected_tokens.mean(dim=1) @ parent.visual.proj
    with autograd():
        pooled, tokens = model.encode_image(pixels)
        model.visual.output_tokens = False
        image_features, _, _ = model(pixels, torch.randint(0, 100, (5, 8)))
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(image_features, F.normalize(expected, dim=-1), atol=1e-5, rtol=0)


def test_encode_image_zero_shot_and_token_shapes(pixels):
    model, _, preprocess = create_model_and_transforms("tiny-vit", register_neurons=NEURONS)
    assert callable(preprocess)
    text = torch.randint(0, 100, (5, 8))
    image_features, text_features, logit_scale = model(pixels, text)
    logits = (logit_scale * image_features @ text_features.T).softmax(dim=-1)
    assert model.encode_image(pixels).shape == (3, 16) and logits.shape == (3, 5)
    model.visual.output_tokens = True
    pooled, tokens = model.visual(pixels)
    assert pooled.shape == (3, 16) and tokens.shape == (3, 16, 32)


NORMALIZED_NLC = dict(image_indices=[0, 2], image_output_fmt="NLC", normalize_intermediates=True)


@pytest.mark.parametrize("autograd", AUTOGRAD_MODES)
def test_forward_intermediates_match_hooked_reference(pixels, autograd):
    parent, model = _parent_and_copy(register_neurons=NEURONS, num_test_time_registers=2, register_scale=[1.0, -0.5])
    with torch.no_grad(), _hooked(parent, num_registers=2, scale=[1.0, -0.5]):  # NLC: the parent cannot make grids
        expected = parent.visual.forward_intermediates(pixels, indices=2, output_fmt="NLC", output_extra_tokens=True)
        normalized = parent.forward_intermediates(pixels, **NORMALIZED_NLC)
    with autograd():
        nchw = model.visual.forward_intermediates(pixels, indices=2, output_extra_tokens=True)
        nlc = model.forward_intermediates(pixels, **NORMALIZED_NLC)
    patches = [tokens[:, :-2] for tokens in expected["image_intermediates"]]  # the registers are the last two tokens
    grids = [tokens.reshape(3, 4, 4, 32).permute(0, 3, 1, 2) for tokens in patches]
    assert len(nchw["image_intermediates"]) == len(nlc["image_intermediates"]) == 2
    for actual, grid in zip(nchw["image_intermediates"], grids, strict=True):
        torch.testing.assert_close(actual, grid, atol=1e-5, rtol=0)
    for actual, prefix in zip(nchw["image_intermediates_prefix"], expected["image_intermediates_prefix"], strict=True):
        torch.testing.assert_close(actual, prefix, atol=1e-5, rtol=0)
    torch.testing.assert_close(nchw["image_features"], expected["image_features"], atol=1e-5, rtol=0)
    for actual, tokens in zip(nlc["image_intermediates"], normalized["image_intermediates"], strict=True):
        torch.testing.assert_close(actual, tokens[:, :-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(nlc["image_features"], normalized["image_features"], atol=1e-5, rtol=0)


def test_batch_invariance(pixels):
    _, model = _parent_and_copy(register_neurons=NEURONS)
    batched = model.encode_image(pixels)
    for i in range(len(pixels)):
        torch.testing.assert_close(model.encode_image(pixels[i : i + 1]), batched[i : i + 1], atol=1e-6, rtol=0)


def test_activation_follows_the_checkpoint():
    assert checkpoint_uses_quick_gelu("ViT-B-16", "openai")
    assert not checkpoint_uses_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    model, _, _ = create_model_and_transforms("tiny-vit-quickgelu", register_neurons=NEURONS)
    mlp = model.visual.transformer.resblocks[0].mlp
    assert isinstance(mlp.gelu, QuickGELU) and list(dict(mlp.named_children())) == [
        "c_fc",
        "gelu",
        "c_proj",
        "register_edit",
    ]


def test_direct_construction_and_state_dict_round_trip(pixels, tmp_path):
    parent = open_clip.create_model("tiny-vit").visual.eval()
    model = OpenCLIPTTRegVisionTransformer(
        image_size=32,
        patch_size=8,
        width=32,
        layers=3,
        heads=2,
        mlp_ratio=4.0,
        output_dim=16,
        register_neurons=NEURONS,
        num_test_time_registers=0,
    ).eval()
    save_file(parent.state_dict(), tmp_path / "visual.safetensors")
    model.load_state_dict(load_file(tmp_path / "visual.safetensors"), strict=True)
    assert torch.equal(model(pixels), parent(pixels))


def test_missing_index_is_a_clear_error():
    with pytest.raises(RegisterNeuronIndexError, match="find-neurons"):
        create_model_and_transforms("tiny-vit")


def test_bad_inputs_are_clear_errors():
    _, model = _parent_and_copy(register_neurons=NEURONS)
    with pytest.raises(ValueError, match="does not match the model's 32x32"):
        model.encode_image(torch.randn(1, 3, 48, 48))
    with pytest.raises(RegisterNeuronIndexError, match="MLP has 128 neurons"):
        model.visual.set_register_neurons({1: [128]})
    with pytest.raises(RegisterNeuronIndexError, match="has 3 layers"):
        model.visual.set_register_neurons({3: [1]})
    with pytest.raises(TypeError, match="VisionTransformer tower"):
        to_test_time_registers(torch.nn.Linear(2, 2))


def test_hub_entry_needs_an_index():
    from hubconf import openclip_vitb16_tt_reg

    with pytest.raises(RegisterNeuronIndexError, match="openclip_vitb16.*find-neurons"):
        openclip_vitb16_tt_reg(pretrained=False)


def test_recomputed_attention_equals_multihead_attention_weights(pixels):
    from ttreg_hf.analysis import run_with_cache

    visual = _parent_and_copy(register_neurons=NEURONS)[1].visual
    blocks, inputs = visual.transformer.resblocks, {}
    handles = [
        block.register_forward_pre_hook(lambda module, args, layer=layer: inputs.__setitem__(layer, args[0]))
        for layer, block in enumerate(blocks)
    ]
    _, cache = run_with_cache(visual, pixels, blocks=None, attentions="all")
    for handle in handles:
        handle.remove()
    for layer, block in enumerate(blocks):
        normed = block.ln_1(inputs[layer])
        with torch.no_grad():
            _, weights = block.attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
        assert weights.shape[-1] == 1 + 16 + 1  # CLS, patches, the test-time register
        torch.testing.assert_close(cache.attentions[layer], weights)


@pytest.mark.parametrize("autograd", AUTOGRAD_MODES)
def test_forward_with_registers_matches_hooked_reference(pixels, autograd):
    parent, model = _parent_and_copy(register_neurons=NEURONS, num_test_time_registers=2, register_scale=[1.0, -0.5])
    parent.visual.output_tokens = True
    with torch.no_grad(), _hooked(parent, num_registers=2, scale=[1.0, -0.5]):
        expected_pooled, expected_tokens = parent.visual(
            pixels
        )  # `tok` pool: the tokens after `ln_post`, registers last
    with autograd():
        pooled, registers = model.visual.forward_with_registers(pixels)
        model.visual.output_tokens = True
        (pooled_too, tokens), registers_too = model.visual.forward_with_registers(pixels)
        pooled_by_forward, pooled_by_encode_image = model.visual(pixels)[0], model.encode_image(pixels)[0]
    assert registers.shape == (3, 2, 32)
    torch.testing.assert_close(registers, expected_tokens[:, -2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens, expected_tokens[:, :-2], atol=1e-5, rtol=0)
    assert torch.equal(pooled_too, pooled) and torch.equal(registers_too, registers)
    assert torch.equal(pooled_by_forward, pooled) and torch.equal(pooled_by_encode_image, pooled)
    # the edit off: the parent's outputs, and no registers
    parent_off, off = _parent_and_copy(register_neurons=NEURONS, num_test_time_registers=0)
    pooled_off, none = off.visual.forward_with_registers(pixels)
    assert none is None and torch.equal(pooled_off, parent_off.visual(pixels))


@pytest.mark.parametrize("autograd", AUTOGRAD_MODES)
def test_forward_intermediates_give_the_registers_as_extra_tokens(pixels, autograd):
    parent, model = _parent_and_copy(register_neurons=NEURONS, num_test_time_registers=2, register_scale=[1.0, -0.5])
    with torch.no_grad(), _hooked(parent, num_registers=2, scale=[1.0, -0.5]):
        expected = parent.forward_intermediates(pixels, image_output_fmt="NLC", image_output_extra_tokens=True)
    with autograd():
        tower = model.visual.forward_intermediates(pixels, indices=[0, 2], output_extra_tokens=True)
        clip = model.forward_intermediates(pixels, image_output_extra_tokens=True)  # open_clip's CLIP passes it on
        plain = model.visual.forward_intermediates(pixels, indices=[0, 2])
    registers = [tokens[:, -2:] for tokens in expected["image_intermediates"]]  # every block, the last two tokens
    assert len(clip["image_intermediates_registers"]) == 3
    for actual, wanted in zip(clip["image_intermediates_registers"], registers, strict=True):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=0)
    for actual, wanted in zip(tower["image_intermediates_registers"], registers[::2], strict=True):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=0)
    assert (
        "image_intermediates_registers" not in plain
        and [y.shape for y in plain["image_intermediates"]] == [(3, 32, 4, 4)] * 2
    )
    _, off = _parent_and_copy(register_neurons=NEURONS, num_test_time_registers=0)
    assert "image_intermediates_registers" not in off.visual.forward_intermediates(pixels, output_extra_tokens=True)
