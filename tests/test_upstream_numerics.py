"""`position_interpolation`: the hub models compute what upstream DINOv2 computes at every size, the `transformers`
path what `Dinov2Model` computes; the setting is saved, exported and can be chosen anywhere."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Dinov2ForImageClassification, Dinov2Model

from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel, RegisterNeuronIndex
from ttreg_hf.export import export_model
from ttreg_hf.hub import dinov2_vits14_tt_reg, load_tt_model
from ttreg_hf.modeling.dinov2_original import (
    DinoVisionTransformerTTReg,
    DinoVisionTransformerTTRegClassifier,
    convert_original_state_dict,
)

from reference_edit import hooked_register_edit
from support import SHARED
from upstream_dinov2 import UpstreamDinov2, random_original_state_dict

VITS14 = "weights/dinov2_vits14_imgfocus.safetensors"
SIZES = [(224, 224), (448, 448), (224, 448)]  # 518, the table's own size: test_hub.py checks it against timm
NEURONS = {5: [10, 20], 8: [3]}


def size_id(size: tuple[int, int]) -> str:
    return "x".join(map(str, size))


def tiny_config(**settings) -> Dinov2TTRegConfig:
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    return Dinov2TTRegConfig(**{**tiny, **settings})


def assert_features_match(features, expected, num_registers=0):
    end = expected["x_prenorm"].shape[1] - num_registers
    torch.testing.assert_close(features["x_norm_clstoken"], expected["x_norm_clstoken"], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        features["x_norm_patchtokens"], expected["x_norm_patchtokens"][:, : end - 1], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(features["x_prenorm"], expected["x_prenorm"][:, :end], atol=1e-4, rtol=0)
    if num_registers:
        registers = expected["x_norm_patchtokens"][:, end - 1 :]
        torch.testing.assert_close(features["x_norm_regtokens"], registers, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def real_weights():
    if not (SHARED / VITS14).is_file():
        pytest.skip(f"{SHARED / VITS14} is absent (it exists only beside the development checkout and in CI)")
    return SHARED / VITS14


@pytest.fixture(scope="module")
def upstream(real_weights):
    return UpstreamDinov2(load_file(real_weights), num_heads=6).eval()


@pytest.fixture(scope="module")
def hub_models(real_weights):
    """The hub model on the real weights, edit off and edit on."""
    return {
        "off": dinov2_vits14_tt_reg(weights=real_weights, num_test_time_registers=0),
        "on": dinov2_vits14_tt_reg(weights=real_weights, register_neurons=NEURONS),
    }


@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_hub_model_is_upstream_dinov2_with_the_edit_off(hub_models, upstream, size):
    model = hub_models["off"]
    assert model.dinov2.config.position_interpolation == "upstream"
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert_features_match(model.forward_features(pixels), upstream(pixels))


@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_hub_model_is_upstream_dinov2_with_the_hooked_edit(hub_models, upstream, size):
    model = hub_models["on"]
    semantics = model.dinov2.config.register_semantics
    pixels = torch.randn(1, 3, *size)
    fc2 = {layer: upstream.blocks[layer].mlp.fc2 for layer in NEURONS}
    with torch.no_grad(), hooked_register_edit(upstream.tokens, fc2, NEURONS, semantics=semantics):
        expected = upstream(pixels)
    with torch.no_grad():
        features = model.forward_features(pixels)
        unedited = upstream(pixels)
    assert_features_match(features, expected, num_registers=1)
    assert not torch.allclose(features["x_norm_patchtokens"], unedited["x_norm_patchtokens"], atol=1e-3)


LAYERS = (1, 4)  # upstream's linear heads read the last 1 or 4 blocks


def linear_heads() -> dict[int, nn.Linear]:
    return {layers: nn.Linear((1 + layers) * 384, 1000) for layers in LAYERS}


def upstream_head_inputs(normed: list[torch.Tensor], num_registers: int = 0) -> dict[int, torch.Tensor]:
    """Upstream's `_LinearClassifierWrapper` input by hand, from every block's normed output: the CLS tokens of the
    last ``layers`` blocks and the mean of the last block's patch tokens (its last ``num_registers`` tokens left out)."""
    patches = normed[-1][:, 1 : normed[-1].shape[1] - num_registers]
    return {
        layers: torch.cat([*(out[:, 0] for out in normed[-layers:]), patches.mean(dim=1)], dim=1) for layers in LAYERS
    }


def upstream_normed_blocks(upstream: UpstreamDinov2, pixels: torch.Tensor) -> list[torch.Tensor]:
    x, normed = upstream.prepare_tokens(pixels), []
    for block in upstream.blocks:
        x = block(x)
        normed.append(upstream.norm(x))
    return normed


def test_linear_classifiers_are_upstreams_with_the_edit_off(hub_models, upstream):
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        inputs = upstream_head_inputs(upstream_normed_blocks(upstream, pixels))
        for layers, head in linear_heads().items():
            model = DinoVisionTransformerTTRegClassifier(hub_models["off"], head, layers)
            torch.testing.assert_close(model(pixels), head(inputs[layers]), atol=1e-4, rtol=0)


def test_linear_classifiers_with_the_edit_keep_their_shape_and_no_register_in_the_patch_mean(hub_models, upstream):
    semantics = hub_models["on"].dinov2.config.register_semantics
    pixels = torch.randn(1, 3, 224, 224)
    fc2 = {layer: upstream.blocks[layer].mlp.fc2 for layer in NEURONS}
    with torch.no_grad(), hooked_register_edit(upstream.tokens, fc2, NEURONS, semantics=semantics):
        normed = upstream_normed_blocks(upstream, pixels)  # the register is the last token
    inputs, register_in_the_mean = upstream_head_inputs(normed, num_registers=1), upstream_head_inputs(normed)
    with torch.no_grad():
        for layers, head in linear_heads().items():
            logits = DinoVisionTransformerTTRegClassifier(hub_models["on"], head, layers)(pixels)
            assert logits.shape == (1, 1000)
            torch.testing.assert_close(logits, head(inputs[layers]), atol=1e-4, rtol=0)
            assert not torch.allclose(logits, head(register_in_the_mean[layers]), atol=1e-3)


def test_linear_classifiers_with_the_edit_off_are_bit_equal_to_the_parent(real_weights):
    """With `transformers`' numerics, layers=1 is `Dinov2ForImageClassification`, the parent's task model (upstream's
    1-layer head), and layers=4 the same on the parent's last four hidden states."""
    backbone = load_tt_model(
        "dinov2_vits14", weights=real_weights, num_test_time_registers=0, position_interpolation="transformers"
    )
    heads = linear_heads()
    config = copy.deepcopy(backbone.config)
    config.num_labels = 1000
    with torch.device("meta"):
        parent = Dinov2ForImageClassification(config)
    state_dict = {f"dinov2.{key}": value for key, value in backbone.state_dict().items()}
    state_dict.update({f"classifier.{key}": value for key, value in heads[1].state_dict().items()})
    parent.load_state_dict(state_dict, assign=True)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        outputs = parent.eval()(pixels, output_hidden_states=True)
        normed = [parent.dinov2.layernorm(hidden) for hidden in outputs.hidden_states[1:]]
        expected = {1: outputs.logits, 4: heads[4](upstream_head_inputs(normed)[4])}
        for layers, head in heads.items():
            model = DinoVisionTransformerTTRegClassifier(DinoVisionTransformerTTReg(backbone), head, layers)
            assert torch.equal(model(pixels), expected[layers])


@pytest.mark.parametrize("size", [(56, 56), (28, 112), (112, 28), (70, 70), (42, 98), (98, 42)], ids=size_id)
def test_upstream_interpolation_at_any_size_including_the_tables_patch_count_non_square(size):
    """A 4x4 table: 28x112 has its 16 patches but is not square, so upstream interpolates it (and so must we)."""
    original = random_original_state_dict(dim=32, depth=2, patch_size=14, table_side=4)
    config = tiny_config(num_test_time_registers=0, position_interpolation="upstream")
    model = Dinov2TTRegModel(config).eval()
    model.load_state_dict(convert_original_state_dict(original, config))
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert_features_match(
            DinoVisionTransformerTTReg(model).forward_features(pixels),
            UpstreamDinov2(original, num_heads=2).eval()(pixels),
        )


@pytest.mark.parametrize("size", [(224, 224), (224, 448), (518, 518)], ids=size_id)
def test_transformers_numerics_stay_bit_equal_to_the_parent(size):
    config = tiny_config(num_test_time_registers=0, image_size=518)
    assert config.position_interpolation == "transformers"
    model = Dinov2TTRegModel(config).eval()
    parent = Dinov2Model(config).eval()
    parent.load_state_dict(model.state_dict())
    other_config = copy.deepcopy(config)
    other_config.position_interpolation = "upstream"
    other = Dinov2TTRegModel(other_config).eval()
    other.load_state_dict(model.state_dict())
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = parent(pixels).last_hidden_state
        assert torch.equal(model(pixels).last_hidden_state, expected)
        assert torch.equal(other(pixels).last_hidden_state, expected) == (size == (518, 518))


def test_the_setting_is_saved_overridable_and_checked(tmp_path):
    config = tiny_config(num_test_time_registers=0, position_interpolation="upstream")
    Dinov2TTRegModel(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["position_interpolation"] == "upstream"
    assert Dinov2TTRegModel.from_pretrained(tmp_path).config.position_interpolation == "upstream"
    loaded = Dinov2TTRegModel.from_pretrained(tmp_path, position_interpolation="transformers")
    assert loaded.embeddings.config.position_interpolation == "transformers"
    hub = load_tt_model(
        "dinov2_vits14", pretrained=False, num_test_time_registers=0, position_interpolation="transformers"
    )
    assert hub.config.position_interpolation == "transformers"
    with pytest.raises(Exception, match="'position_interpolation' expected one of \\('transformers', 'upstream'\\)"):
        Dinov2TTRegConfig(position_interpolation="bicubic")


REMOTE_LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["ttreg_hf"] = None  # the exported remote code alone
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    import torch

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert model.config.position_interpolation == "upstream", model.config.position_interpolation
    with torch.no_grad():
        hidden = model(load_file("inputs.safetensors")["pixel_values"]).last_hidden_state
    save_file({"hidden": hidden.contiguous()}, "outputs.safetensors")
    """
)


def test_exports_carry_the_setting_into_the_remote_code(tmp_path):
    config = tiny_config(register_neurons={1: [3]}, position_interpolation="upstream")
    model = Dinov2TTRegModel(config).eval()
    index = RegisterNeuronIndex(neurons={1: [3]}, num_layers=2, mlp_width=128, source="planted for a test")
    index.save(tmp_path / "index.safetensors")
    out = export_model(model, tmp_path / "index.safetensors", tmp_path / "export")
    pixels = torch.randn(2, 3, 42, 98)
    save_file({"pixel_values": pixels}, tmp_path / "inputs.safetensors")
    (tmp_path / "load.py").write_text(REMOTE_LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, "-I", "load.py", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
    assert torch.allclose(load_file(tmp_path / "outputs.safetensors")["hidden"], expected, atol=1e-6)
    assert Dinov2TTRegModel.from_pretrained(out).config.position_interpolation == "upstream"
