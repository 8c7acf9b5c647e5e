"""What the towers inside task models must carry over from the base models: settings written on a backbone's config,
a backbone's attention mask, a masked-image-modeling tower's mask token, a dual encoder's register settings at load.
Each is compared with an independent computation: a fresh model, the reference edit on the parent, the parent."""

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForMaskedImageModeling,
    CLIPConfig,
    CLIPModel,
    DeiTConfig,
    DeiTForMaskedImageModeling,
    Dinov2Model,
    SiglipConfig,
    SiglipModel,
    ViTConfig,
    ViTForMaskedImageModeling,
)

from ttreg_hf import (
    CLIPTTRegModel,
    DeiTTTRegForMaskedImageModeling,
    Dinov2TTRegBackbone,
    Dinov2TTRegConfig,
    DINOv3ViTTTRegBackbone,
    DINOv3ViTTTRegConfig,
    SiglipTTRegModel,
    ViTTTRegForMaskedImageModeling,
    to_test_time_registers,
    vision_tower_with_registers,
)

from support import hooked_register_edit_of, with_registers

NEURONS = {1: [3, 40], 2: [7]}
TOWER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, patch_size=14, image_size=42)
BACKBONES = {
    "dinov2": lambda: Dinov2TTRegBackbone(
        Dinov2TTRegConfig(**TOWER, mlp_ratio=2, out_indices=[2, 3], register_neurons=NEURONS)
    ),
    "dinov3": lambda: DINOv3ViTTTRegBackbone(
        DINOv3ViTTTRegConfig(
            **TOWER, intermediate_size=64, num_register_tokens=2, out_indices=[2, 3], register_neurons=NEURONS
        )
    ),
}
# settings written on the config after the backbone is built: each changes the feature maps
WRITES = {
    "register_neurons": {"register_neurons": {"1": [5], "2": [9, 11]}},
    "register_scale": {"register_scale": 3.0},
    "register_patch_mode": {"register_patch_mode": "mean"},
    "num_test_time_registers": {"num_test_time_registers": 2, "register_scale": [1.0, -2.0]},
    "edit_off": {"register_neurons": {}},
}


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 42, 42) * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("family", BACKBONES)
def test_a_setting_written_on_a_backbones_config_is_what_its_next_forward_runs(family, write, pixels):
    """The backbone after the write computes what a backbone built with the written config computes."""
    torch.manual_seed(0)
    backbone = BACKBONES[family]().eval()
    with torch.no_grad():
        before = backbone(pixels).feature_maps
        for name, value in WRITES[write].items():
            setattr(backbone.config, name, value)
        after = backbone(pixels).feature_maps
        fresh = type(backbone)(copy.deepcopy(backbone.config)).eval()
        fresh.load_state_dict(backbone.state_dict())
        expected = fresh(pixels).feature_maps
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(after, expected, strict=True))
    assert not all(torch.allclose(ours, old, atol=1e-4) for ours, old in zip(after, before, strict=True))


def test_a_dinov2_backbones_attention_mask_leaves_the_registers_visible(pixels):
    """A mask over the parent's tokens (one patch hidden): the feature maps are the reference edit's on the parent,
    run with that mask extended by a visible register."""
    backbone = BACKBONES["dinov2"]().eval()
    backbone.config._attn_implementation = "eager"
    parent = Dinov2Model(backbone.config).eval()
    parent.load_state_dict(backbone.state_dict())
    mask = torch.ones(2, 1 + 9)
    mask[:, 4] = 0
    with torch.no_grad():
        maps = backbone(pixels, attention_mask=mask).feature_maps
        unmasked = backbone(pixels).feature_maps
        with hooked_register_edit_of(backbone, parent, num_prefix=1):
            hidden = parent(
                pixels, attention_mask=nn.functional.pad(mask, (0, 1), value=1), output_hidden_states=True
            ).hidden_states
    for stage, feature_map, plain in zip((2, 3), maps, unmasked, strict=True):
        tokens = backbone.layernorm(hidden[stage][:, :-1])  # the register cut, as no head may see it
        expected = tokens[:, 1:].reshape(2, 3, 3, 32).permute(0, 3, 1, 2)
        torch.testing.assert_close(feature_map, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(feature_map, plain, atol=1e-3)


MASKED_IMAGE_MODELS = {
    "vit": (ViTForMaskedImageModeling, ViTConfig, "vit", 1, ViTTTRegForMaskedImageModeling),
    "deit": (DeiTForMaskedImageModeling, DeiTConfig, "deit", 2, DeiTTTRegForMaskedImageModeling),  # CLS, distillation
}


@pytest.mark.parametrize("family", MASKED_IMAGE_MODELS)
def test_an_upgraded_masked_image_model_keeps_its_mask_token_masks_as_its_parent_and_reloads(family, tmp_path):
    """A `*ForMaskedImageModeling` upgraded in place (`to_test_time_registers`) becomes ours: its tower holds the
    parent's mask token and masks the patches of ``bool_masked_pos`` as the parent does (edit off: loss and
    reconstruction bit for bit; edit on: the reference edit on the parent's tower), and what `save_pretrained` writes
    reloads through `AutoModelForMaskedImageModeling` as ours, with the same outputs."""
    model_class, config_class, tower_path, num_prefix, ours_class = MASKED_IMAGE_MODELS[family]
    config = config_class(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        encoder_stride=8, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    parent = model_class(config).eval()
    parent_tower = parent.get_submodule(tower_path)
    nn.init.normal_(parent_tower.embeddings.mask_token)  # zeros at init: it would not show
    off, on = (to_test_time_registers(copy.deepcopy(parent), register_neurons=n) for n in ({}, NEURONS))
    assert type(off) is type(on) is ours_class
    for model in (off, on):
        assert torch.equal(vision_tower_with_registers(model).embeddings.mask_token, parent_tower.embeddings.mask_token)
    pixels, masked = torch.randn(2, 3, 32, 32), torch.rand(2, 16) < 0.5
    with torch.no_grad():
        expected = parent(pixels, bool_masked_pos=masked)
        assert not torch.allclose(parent(pixels).reconstruction, expected.reconstruction, atol=1e-4)  # the mask counts
        got = off(pixels, bool_masked_pos=masked)
        assert torch.equal(got.loss, expected.loss) and torch.equal(got.reconstruction, expected.reconstruction)
        with hooked_register_edit_of(vision_tower_with_registers(on), parent_tower, num_prefix):
            reference = parent_tower(pixels, bool_masked_pos=masked).last_hidden_state
        tower_output = vision_tower_with_registers(on)(pixels, bool_masked_pos=masked)
        torch.testing.assert_close(with_registers(tower_output), reference, atol=1e-5, rtol=0)
        edited = on(pixels, bool_masked_pos=masked)
    on.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is ours_class
    with torch.no_grad():
        assert torch.equal(reloaded(pixels, bool_masked_pos=masked).reconstruction, edited.reconstruction)


TEXT = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=16,
    max_position_embeddings=64, eos_token_id=2,
)  # fmt: skip
VISION = dict(**TOWER, intermediate_size=64)
DUAL_ENCODERS = {
    "clip": (CLIPTTRegModel, lambda: CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT))),
    "siglip": (SiglipTTRegModel, lambda: SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT))),
}


@pytest.mark.parametrize("family", DUAL_ENCODERS)
def test_register_settings_given_to_a_dual_encoders_from_pretrained_reach_its_vision_tower(family, tmp_path, pixels):
    """`CLIPTTRegModel` / `SiglipTTRegModel.from_pretrained(..., num_test_time_registers=2, register_scale=[...])`:
    the tower's config holds them, and the image features are those of a model built with them in its
    ``vision_config``."""
    model_class, build_parent = DUAL_ENCODERS[family]
    torch.manual_seed(0)
    build_parent().save_pretrained(tmp_path)
    settings = dict(num_test_time_registers=2, register_scale=[1.0, -2.0], register_patch_mode="mean")
    model = model_class.from_pretrained(tmp_path, register_neurons=NEURONS, **settings).eval()
    tower = vision_tower_with_registers(model)
    assert tower.config is model.config.vision_config
    assert {name: getattr(tower.config, name) for name in settings} == settings
    assert tower.token_layout.num_registers == 2
    assert not set(settings) & set(model.config.to_diff_dict())  # the outer config does not hold them
    config = copy.deepcopy(model.config)
    expected = model_class(config).eval()
    expected.load_state_dict(model.state_dict())
    default = model_class.from_pretrained(tmp_path, register_neurons=NEURONS).eval()
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
        assert features.test_time_registers.shape == (2, 2, 32)
        assert torch.equal(features.pooler_output, expected.get_image_features(pixel_values=pixels).pooler_output)
        other = default.get_image_features(pixel_values=pixels).pooler_output
        assert not torch.allclose(features.pooler_output, other, atol=1e-4)
