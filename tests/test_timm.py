"""`TimmTTRegVisionTransformer` against timm's `VisionTransformer` and the hook-based reference edit."""

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import SwiGLU, SwiGLUPacked
from timm.models._features import FeatureGetterNet
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch import nn

from ttreg_hf import RegisterNeuronIndex, RegisterNeuronIndexError, load_index
from ttreg_hf.modeling.timm import (
    TimmTTRegVisionTransformer,
    TimmTTRegVisionTransformerDistilled,
    create_model,
    to_test_time_registers,
)

from reference_edit import hooked_register_edit

pytest_plugins = ["fake_hub"]  # its `hub` fixture

NEURONS = {0: [3, 40], 2: [5]}
TINY = dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, num_classes=5)
ARCHS = {
    "token": {},
    "avg": dict(global_pool="avg"),
    "avgmax": dict(global_pool="avgmax"),
    "max": dict(global_pool="max"),
    "map": dict(global_pool="map"),
    "no_pool": dict(global_pool=""),
    "reg_tokens": dict(reg_tokens=4),
    "reg_tokens_no_embed_class": dict(reg_tokens=4, no_embed_class=True, global_pool="avg"),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "no_pos_embed_pre_norm": dict(pos_embed="none", pre_norm=True),
    "dynamic_img_size": dict(dynamic_img_size=True),
    "swiglu_packed": dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
    "swiglu": dict(mlp_layer=SwiGLU),
    "distilled": {},  # DeiT's VisionTransformerDistilled: CLS and distillation token
}
CLASSES = {"distilled": VisionTransformerDistilled}  # VisionTransformer unless named


def _pixels(arch: str, batch: int = 3) -> torch.Tensor:
    width = 42 if ARCHS[arch].get("dynamic_img_size") else 28  # non-square where timm allows other sizes
    return torch.randn(batch, 3, 28, width) * torch.linspace(0.5, 2.0, batch).view(batch, 1, 1, 1)


def _parent_and_model(arch: str = "token", **settings) -> tuple[VisionTransformer, TimmTTRegVisionTransformer]:
    parent = CLASSES.get(arch, VisionTransformer)(**TINY, **ARCHS[arch]).eval()
    return parent, to_test_time_registers(copy.deepcopy(parent), **settings).eval()


def _hooked(parent: VisionTransformer, num_registers: int = 1, **settings):
    down_projections = {layer: parent.blocks[layer].mlp.fc2 for layer in NEURONS}
    return hooked_register_edit(
        parent.patch_drop, down_projections, NEURONS, num_registers, parent.num_prefix_tokens, **settings
    )


def _to_nchw(tokens: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    height, width = pixels.shape[-2] // 7, pixels.shape[-1] // 7
    return tokens.reshape(len(tokens), height, width, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_edit_off_is_bit_identical_to_parent(arch):
    parent, model = _parent_and_model(arch, register_neurons=NEURONS, num_test_time_registers=0)
    pixels = _pixels(arch)
    assert torch.equal(model(pixels), parent(pixels))
    assert torch.equal(model.forward_features(pixels), parent.forward_features(pixels))
    assert model.forward_features_with_registers(pixels)[1] is None
    for kwargs in (
        dict(indices=2),
        dict(indices=[0, 2], return_prefix_tokens=True, norm=True),
        dict(output_fmt="NLC", output_dict=True, return_prefix_tokens=True),
        dict(intermediates_only=True, stop_early=True, indices=[1]),
    ):
        expected = parent.forward_intermediates(pixels, **kwargs)
        torch.testing.assert_close(model.forward_intermediates(pixels, **kwargs), expected, atol=0, rtol=0)
    torch.testing.assert_close(
        model.get_intermediate_layers(pixels, n=2, reshape=True, return_prefix_tokens=True),
        parent.get_intermediate_layers(pixels, n=2, reshape=True, return_prefix_tokens=True),
        atol=0, rtol=0,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("semantics", ["paper", "reference"])
def test_matches_hooked_reference(arch, semantics):
    settings = dict(register_neurons=NEURONS, num_test_time_registers=2, register_semantics=semantics)
    parent, model = _parent_and_model(arch, **settings)
    pixels = _pixels(arch)
    kwargs = dict(indices=[0, 2], norm=True, return_prefix_tokens=True, output_dict=True)
    with torch.no_grad(), _hooked(parent, num_registers=2, semantics=semantics):
        expected = parent.forward_intermediates(pixels, output_fmt="NLC", **kwargs)  # tokens include the registers
    expected_tokens = expected["image_features"]
    with torch.no_grad():
        tokens, registers = model.forward_features_with_registers(pixels)
        intermediates = model.forward_intermediates(pixels, **kwargs)
        off = parent.forward_features(pixels)
    assert (tokens - off).abs().max() > 1e-3  # the edit changes the output
    torch.testing.assert_close(tokens, expected_tokens[:, :-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(registers, expected_tokens[:, -2:], atol=1e-5, rtol=0)
    pooled = model(pixels)  # grad enabled: the edit's out-of-place path
    torch.testing.assert_close(pooled, parent.forward_head(expected_tokens[:, :-2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(intermediates["image_features"], tokens, atol=0, rtol=0)
    expected_nchw = [_to_nchw(y[:, :-2], pixels) for y in expected["image_intermediates"]]
    torch.testing.assert_close(intermediates["image_intermediates"], expected_nchw, atol=1e-5, rtol=0)
    expected_registers = [y[:, -2:] for y in expected["image_intermediates"]]
    torch.testing.assert_close(intermediates["image_intermediates_registers"], expected_registers, atol=1e-5, rtol=0)
    if parent.num_prefix_tokens:
        prefix, expected_prefix = intermediates["image_intermediates_prefix"], expected["image_intermediates_prefix"]
        torch.testing.assert_close(prefix, expected_prefix, atol=1e-5, rtol=0)
    else:
        assert "image_intermediates_prefix" not in intermediates


def test_intermediates_return_structures_keep_timm_shapes():
    _, model = _parent_and_model("reg_tokens", register_neurons=NEURONS)
    pixels = _pixels("reg_tokens", batch=2)
    features, intermediates = model.forward_intermediates(pixels, indices=2, return_prefix_tokens=True)
    assert features.shape == (2, 5 + 16, 32)
    assert [(y.shape, prefix.shape) for y, prefix in intermediates] == [((2, 32, 4, 4), (2, 5, 32))] * 2
    layers = model.get_intermediate_layers(pixels, n=[1], reshape=False)
    assert [y.shape for y in layers] == [(2, 16, 32)]
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(pixels, output_fmt="NHWC")


@pytest.mark.parametrize("arch", ["token", "swiglu_packed"])
def test_batch_invariance(arch):
    _, model = _parent_and_model(arch, register_neurons=NEURONS)
    pixels = _pixels(arch, batch=4)
    with torch.no_grad():
        batched = model.forward_features(pixels)
        for i in range(len(pixels)):
            torch.testing.assert_close(model.forward_features(pixels[i : i + 1]), batched[i : i + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_matches_reference(dtype):
    parent, model = _parent_and_model(register_neurons=NEURONS)
    parent, model = parent.to(dtype), model.to(dtype)
    pixels = _pixels("token").to(dtype)
    with _hooked(parent):
        expected = parent.forward_features(pixels)
    features, registers = model.forward_features_with_registers(pixels)
    assert features.dtype == registers.dtype == dtype
    torch.testing.assert_close(features.float(), expected[:, :-1].float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(registers.float(), expected[:, -1:].float(), atol=5e-2, rtol=5e-2)


@pytest.mark.usefixtures("fresh_compile_caches")
@torch.no_grad()
def test_compile_matches_eager():
    _, model = _parent_and_model("avg", register_neurons=NEURONS)
    pixels = _pixels("avg")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(pixels), model(pixels), atol=1e-5, rtol=0)


def test_state_dict_keeps_timm_keys_and_settings_survive():
    parent, model = _parent_and_model("swiglu_packed", register_neurons=NEURONS, register_scale=2.0)
    assert model.state_dict().keys() == parent.state_dict().keys()
    model.set_register_neurons({1: [7]}, num_test_time_registers=2)
    assert model.config.register_neurons == {"1": [7]} and model.config.register_scale == 2.0
    assert model.token_layout.num_registers == 2 and model.config.mlp_width == 64  # after the gating
    assert model.state_dict().keys() == parent.state_dict().keys()
    restored = TimmTTRegVisionTransformer(**TINY, **ARCHS["swiglu_packed"], register_neurons={1: [7]},
                                          num_test_time_registers=2, register_scale=2.0).eval()  # fmt: skip
    restored.load_state_dict(model.state_dict())
    parent.load_state_dict(model.state_dict())  # and back into plain timm
    pixels = _pixels("swiglu_packed")
    with torch.no_grad():
        assert torch.equal(restored(pixels), model(pixels))
        assert not torch.equal(parent(pixels), model(pixels))


def test_create_model_passes_timm_kwargs_and_needs_an_index():
    tiny = dict(img_size=28, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    model = create_model("vit_small_patch14_dinov2", register_neurons=NEURONS, num_test_time_registers=2, **tiny)
    assert isinstance(model, TimmTTRegVisionTransformer) and model.num_features == 32 and len(model.blocks) == 3
    assert model.token_layout.num_registers == 2 and model(torch.randn(1, 3, 28, 28)).shape == (1, 32)
    with pytest.raises(RegisterNeuronIndexError, match="dinov2_vits14"):
        create_model("vit_small_patch14_dinov2", **tiny)
    assert create_model("vit_small_patch14_dinov2", num_test_time_registers=0, **tiny).token_layout.num_registers == 0


def test_timm_dinov2_gets_the_shipped_dinov2_index(tmp_path):
    model = create_model("vit_large_patch14_dinov2.lvd142m", device="meta")  # no weights needed to attach an index
    shipped = load_index("dinov2_vitl14")
    # also where timm's DINOv2 comes from a folder (or a Hub repo, as timm publishes them): named by its config
    timm.models.save_for_hf(
        timm.create_model("vit_small_patch14_dinov2", **TIMM_TINY), tmp_path, safe_serialization=True
    )
    with pytest.raises(RegisterNeuronIndexError, match="No register-neuron index is known for 'dinov2_vits14'"):
        create_model(f"local-dir:{tmp_path}")
    assert model.config.register_neuron_index == shipped.neurons
    assert model.config.register_semantics == shipped.semantics
    assert model.blocks[12].mlp.register_edit.neuron_ids == shipped.neurons[12]


def test_refuses_models_it_cannot_edit():
    with pytest.raises(TypeError, match="VisionTransformer"):
        to_test_time_registers(nn.Linear(2, 2), NEURONS)
    parallel = VisionTransformer(**TINY, block_fn=ParallelScalingBlock)
    with pytest.raises(TypeError, match="block 0 \\(ParallelScalingBlock\\)"):
        to_test_time_registers(parallel, NEURONS)
    assert type(parallel) is VisionTransformer  # left as it was
    _, model = _parent_and_model(register_neurons=NEURONS)
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(_pixels("token"), attn_mask=torch.ones(3, 1, 18, 18, dtype=torch.bool))
    with pytest.raises(RegisterNeuronIndexError, match="has 3 layers"):
        model.set_register_neurons({3: [1]})
    with pytest.raises(RegisterNeuronIndexError, match="MLP has 128 neurons"):
        model.set_register_neurons({1: [128]})


def test_matches_hf_dinov2_on_real_weights(shared_dir):
    from ttreg_hf.hub import load_tt_model

    weights, index = shared_dir / "weights" / "dinov2_vits14_imgfocus.safetensors", {5: [10, 20], 8: [3]}
    model = create_model(
        "vit_small_patch14_dinov2", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), num_classes=0,
        register_neurons=index,
    ).eval()  # fmt: skip
    feature_maps = create_model(
        "vit_small_patch14_dinov2", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
        register_neurons=index, features_only=True, out_indices=(5, 8),
    ).eval()  # fmt: skip
    reference = load_tt_model("dinov2_vits14", weights=weights, register_neurons=index)
    pixels = torch.randn(1, 3, 518, 518)  # the size both parents agree at (no position interpolation)
    with torch.no_grad():
        features, registers = model.forward_features_with_registers(pixels)
        maps = feature_maps(pixels)
        expected = reference(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(features, expected.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(registers, expected.test_time_registers, atol=1e-4, rtol=0)
    for feature_map, layer in zip(maps, (5, 8), strict=True):  # block outputs, the registers stripped, as NCHW maps
        patches = expected.hidden_states[layer + 1][:, 1:]
        torch.testing.assert_close(feature_map, patches.unflatten(1, (37, 37)).permute(0, 3, 1, 2), atol=1e-4, rtol=0)


@torch.no_grad()
def test_analysis_reads_timm_blocks():
    from ttreg_hf.analysis.capture import run_with_cache

    model = to_test_time_registers(VisionTransformer(**TINY, qk_norm=True), NEURONS).eval()
    pixels = _pixels("token")
    _, cache = run_with_cache(model, pixels, mlp=[0], blocks=[2], attentions=[1])
    probabilities = []
    model.blocks[1].attn.fused_attn = False  # timm's own softmax, which feeds `attn_drop`
    model.blocks[1].attn.attn_drop.register_forward_hook(lambda module, args, output: probabilities.append(output))
    tokens, registers = model.forward_features_with_registers(pixels)
    torch.testing.assert_close(cache.attentions[1], probabilities[0], atol=1e-5, rtol=0)
    assert cache.attentions[1].shape == (3, 2, 18, 18) and cache.mlp_activations[0].shape == (3, 18, 128)
    final = torch.cat((tokens, registers), dim=1)
    torch.testing.assert_close(model.norm(cache.block_outputs[2]), final, atol=1e-5, rtol=0)


# timm names for the features_only tests, shrunk to TINY's geometry: a plain ViT, DINOv2 with trained registers (5
# prefix tokens; layer scale at 1, not its 1e-5 init, so that the edit shows), DeiT distilled (2 prefix tokens)
FEATURE_MODELS = {
    "vit_small_patch16_224": {},
    "vit_small_patch14_reg4_dinov2": dict(init_values=1.0),
    "deit_tiny_distilled_patch16_224": {},
}
TIMM_TINY = dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2)
FEATURES = dict(features_only=True, out_indices=(0, -2))  # blocks 0 and 1: block 2, with a listed layer, is pruned


def _load_from(model: nn.Module, source: nn.Module) -> nn.Module:
    """``model``, a features_only wrapper (keys under ``model.``, pruned ones absent), with ``source``'s weights."""
    weights = source.state_dict()
    model.load_state_dict({key: weights[key.removeprefix("model.")] for key in model.state_dict()})
    return model.eval()


@pytest.mark.parametrize("name", FEATURE_MODELS)
@torch.no_grad()
def test_features_only_is_the_parents_off_and_our_intermediates_on(name):
    tiny = {**TIMM_TINY, **FEATURE_MODELS[name]}
    full = timm.create_model(name, **tiny).eval()  # the weights every model below gets
    parent = _load_from(timm.create_model(name, **tiny, **FEATURES), full)
    off = _load_from(create_model(name, register_neurons=NEURONS, num_test_time_registers=0, **tiny, **FEATURES), full)
    on = _load_from(create_model(name, register_neurons=NEURONS, num_test_time_registers=2, **tiny, **FEATURES), full)
    assert type(on) is type(parent) is FeatureGetterNet and isinstance(on.model, TimmTTRegVisionTransformer)
    assert on.feature_info.channels() == parent.feature_info.channels() and len(on.model.blocks) == 2  # pruned
    assert on.model.config.register_neuron_index == {0: (3, 40), 2: (5,)}  # the index of the whole architecture
    pixels = _pixels("token")
    expected = parent(pixels)
    assert [y.shape for y in expected] == [(3, 32, 4, 4)] * 2
    torch.testing.assert_close(off(pixels), expected, atol=0, rtol=0)
    features = on(pixels)
    assert [y.shape for y in features] == [y.shape for y in expected]
    assert (features[1] - expected[1]).abs().max() > 1e-3  # the edit changes the features
    whole = to_test_time_registers(copy.deepcopy(full), NEURONS, num_test_time_registers=2)
    intermediates = whole.forward_intermediates(pixels, indices=[0, 1], intermediates_only=True)
    torch.testing.assert_close(features, intermediates, atol=1e-6, rtol=0)


@torch.no_grad()
def test_timm_built_feature_models_convert_in_place():
    full = timm.create_model("vit_small_patch16_224", **TIMM_TINY).eval()
    reference = _load_from(
        create_model("vit_small_patch16_224", register_neurons=NEURONS, **TIMM_TINY, **FEATURES), full
    )
    wrapper = _load_from(timm.create_model("vit_small_patch16_224", **TIMM_TINY, **FEATURES), full)
    assert to_test_time_registers(wrapper, NEURONS) is wrapper  # pruned before the conversion: layer 2 still fits
    wrapped_after = FeatureGetterNet(to_test_time_registers(copy.deepcopy(full), NEURONS), out_indices=(0, -2))
    pixels = _pixels("token")
    expected = reference(pixels)
    torch.testing.assert_close(wrapper(pixels), expected, atol=0, rtol=0)
    torch.testing.assert_close(wrapped_after(pixels), expected, atol=0, rtol=0)


def test_create_model_makes_deit_distilled_and_refuses_other_models_up_front():
    model = create_model("deit_tiny_distilled_patch16_224", register_neurons=NEURONS, **TIMM_TINY, num_classes=5)
    assert type(model) is TimmTTRegVisionTransformerDistilled and model.token_layout.num_prefix_tokens == 2
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 5)
    assert model.forward_features(torch.randn(2, 3, 28, 28)).shape == (2, 2 + 16, 32)
    for kwargs in ({}, dict(features_only=True)):
        with pytest.raises(TypeError, match="need timm's VisionTransformer .* got (ResNet|timm's FeatureListNet)"):
            create_model("resnet18", register_neurons=NEURONS, **kwargs)
    for feature_cls in ("hook", "fx"):
        with pytest.raises(TypeError, match="feature_cls='getter'"):
            create_model("vit_small_patch16_224", register_neurons=NEURONS, feature_cls=feature_cls, **TIMM_TINY,
                         **FEATURES)  # fmt: skip
    hooked = timm.create_model("vit_small_patch16_224", feature_cls="hook", **TIMM_TINY, **FEATURES)
    with pytest.raises(TypeError, match="raw outputs, which carry the test-time registers"):
        to_test_time_registers(hooked, NEURONS)

    class MyViT(VisionTransformer):
        pass

    own = MyViT(**TINY)
    with pytest.raises(TypeError, match="MyViT subclasses timm's VisionTransformer.*derive from both"):
        to_test_time_registers(own, NEURONS)
    assert type(own) is MyViT


# ---- timm's registry, `save_for_hf` / `push_to_hf_hub` and `create_model("local-dir:" / "hf-hub:")` ----------------


def found_index() -> RegisterNeuronIndex:
    """An index as `ttreg find-neurons` writes one for TINY (3 layers, MLP width 128), with its provenance."""
    return RegisterNeuronIndex(
        neurons={0: [3, 40], 2: [5]}, num_layers=3, mlp_width=128, checkpoints={"timm": "vit_small_patch16_224"},
        image_size=28,
    )  # fmt: skip


def test_our_models_are_in_timms_registry_by_timms_names():
    names = timm.list_models("ttreg_*")
    assert {
        "ttreg_vit_small_patch16_224",
        "ttreg_vit_large_patch14_dinov2",
        "ttreg_deit_tiny_distilled_patch16_224",
    } <= {*names}
    assert len(names) == len(timm.list_models(module=["vision_transformer", "deit"]))  # one per parent architecture
    assert "ttreg_vit_large_patch14_dinov2.lvd142m" in timm.list_models("ttreg_*", pretrained=True)
    model = timm.create_model("ttreg_vit_small_patch16_224", register_neurons=NEURONS, **TIMM_TINY, num_classes=5)
    assert type(model) is TimmTTRegVisionTransformer and model.config.register_neuron_index == {0: (3, 40), 2: (5,)}
    assert model.pretrained_cfg["architecture"] == "ttreg_vit_small_patch16_224"
    ours = create_model("ttreg_vit_small_patch16_224", register_neurons=NEURONS, **TIMM_TINY, num_classes=5)
    assert (
        type(ours) is TimmTTRegVisionTransformer
        and ours.pretrained_cfg["architecture"] == model.pretrained_cfg["architecture"]
    )
    distilled = timm.create_model("ttreg_deit_tiny_distilled_patch16_224", register_neurons=NEURONS, **TIMM_TINY)
    assert type(distilled) is TimmTTRegVisionTransformerDistilled
    # a pretrained tag: the parent's weights (not downloaded here) and the shipped index of those weights
    dinov2 = timm.create_model("ttreg_vit_large_patch14_dinov2.lvd142m", device="meta")
    assert dinov2.config.register_neuron_index == load_index("dinov2_vitl14").neurons
    assert dinov2.pretrained_cfg["tag"] == "lvd142m" and dinov2.pretrained_cfg["input_size"] == (3, 518, 518)
    with pytest.raises(RegisterNeuronIndexError, match="vit_small_patch16_224"):
        timm.create_model("ttreg_vit_small_patch16_224", **TIMM_TINY)


def _saved_and_reloaded(model: nn.Module, name: str, hub=None) -> nn.Module:
    """``model`` through timm's own `push_to_hf_hub` (with ``hub``) or `save_for_hf`, and `timm.create_model`."""
    if hub is not None:
        timm.models.push_to_hf_hub(model, f"user/{name.rpartition('/')[2]}", safe_serialization=True)
        return timm.create_model(f"hf-hub:user/{name.rpartition('/')[2]}", pretrained=True).eval()
    timm.models.save_for_hf(model, name, safe_serialization=True)
    return timm.create_model(f"local-dir:{name}", pretrained=True).eval()


@pytest.mark.parametrize("where", ["local-dir", "hf-hub"])
def test_save_for_hf_and_push_to_hub_keep_the_index_and_reload_as_ours(where, tmp_path, request):
    hub = request.getfixturevalue("hub") if where == "hf-hub" else None
    model = timm.create_model(
        "ttreg_vit_small_patch16_224", register_neurons=found_index(), num_test_time_registers=2, register_scale=1.5,
        register_semantics="reference", **TIMM_TINY, num_classes=5,
    ).eval()  # fmt: skip
    reloaded = _saved_and_reloaded(model, str(tmp_path / "saved"), hub)
    assert type(reloaded) is TimmTTRegVisionTransformer
    for name in ("register_neurons", "num_test_time_registers", "register_scale", "register_semantics"):
        assert getattr(reloaded.config, name) == getattr(model.config, name), name
    assert reloaded.config.register_index_provenance == found_index().provenance
    pixels = _pixels("token")
    with torch.no_grad():
        assert torch.equal(reloaded(pixels), model(pixels))
        assert torch.equal(
            reloaded.forward_features_with_registers(pixels)[1], model.forward_features_with_registers(pixels)[1]
        )
    source = "hf-hub:user/saved" if hub is not None else f"local-dir:{tmp_path / 'saved'}"
    through_ours = create_model(source, pretrained=True).eval()  # our loader: the saved settings, ours over them
    assert through_ours.config.register_index_provenance == found_index().provenance
    assert create_model(source, num_test_time_registers=1).config.register_neurons == {"0": [3, 40], "2": [5]}
    with torch.no_grad():
        assert torch.equal(through_ours(pixels), model(pixels))
    if hub is not None:
        config = json.loads(hub.file("user/saved", "config.json"))
        assert config["architecture"] == "ttreg_vit_small_patch16_224"
        assert config["model_args"]["register_neurons"] == {"0": [3, 40], "2": [5]}
        assert not any(path.endswith(".bin") for path in hub.repos["user/saved"].files_at("main"))  # no pickle


@torch.no_grad()
def test_a_converted_timm_model_saves_what_it_runs(tmp_path):
    parent = timm.create_model("vit_small_patch16_224", **TIMM_TINY, num_classes=5).eval()
    model = to_test_time_registers(copy.deepcopy(parent), {1: [7]}, num_test_time_registers=0)
    model.set_register_neurons(NEURONS, num_test_time_registers=1)  # changed after conversion: saved as it is now
    reloaded = _saved_and_reloaded(model, str(tmp_path / "converted"))
    assert type(reloaded) is TimmTTRegVisionTransformer and reloaded.config.register_neuron_index == {
        0: (3, 40),
        2: (5,),
    }
    pixels = _pixels("token")
    assert torch.equal(reloaded(pixels), model(pixels)) and not torch.equal(reloaded(pixels), parent(pixels))
    # the edit off and no index: it stays so (no shipped-index lookup, no error), and plain timm loads the weights
    off = to_test_time_registers(copy.deepcopy(parent))
    assert off.config.register_neurons is None
    reloaded_off = _saved_and_reloaded(off, str(tmp_path / "off"))
    assert reloaded_off.config.register_neurons == {} and torch.equal(reloaded_off(pixels), parent(pixels))
    plain = timm.create_model("vit_small_patch16_224", **TIMM_TINY, num_classes=5)
    plain.load_state_dict(load_file(tmp_path / "converted" / "model.safetensors"))  # timm's keys, every one
    assert torch.equal(plain.eval()(pixels), parent(pixels))
    # a pretrained_cfg that names the parent's architecture: saved as the parent, which plain timm loads
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": "vit_small_patch16_224"}
    timm.models.save_for_hf(model, tmp_path / "as_parent", safe_serialization=True)
    as_parent = timm.create_model(f"local-dir:{tmp_path / 'as_parent'}", pretrained=True).eval()
    assert type(as_parent) is VisionTransformer and torch.equal(as_parent(pixels), parent(pixels))
