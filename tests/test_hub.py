"""torch.hub entry points, the upstream DINOv2 interface, and the original-checkpoint conversion."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model

from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel, RegisterNeuronIndexError
from ttreg_hf.hub import MODEL_NAMES, dinov2_vits14_tt_reg, dinov2_vits14_tt_reg_lc, load_tt_model
from ttreg_hf.modeling.dinov2_original import (
    DINOV2_LINEAR_HEAD_URL,
    DinoVisionTransformerTTReg,
    convert_original_state_dict,
    load_dinov2_linear_head,
)

from support import tiny_dinov2_config
from upstream_dinov2 import random_original_state_dict

REPO = Path(__file__).resolve().parents[1]
VITS14 = "weights/dinov2_vits14_imgfocus.safetensors"


def test_torch_hub_load_in_a_fresh_process():
    script = f"""
import json, torch
model = torch.hub.load({str(REPO)!r}, "dinov2_vitl14_tt_reg", source="local", pretrained=False)
with torch.no_grad():
    features = model.forward_features(torch.randn(2, 3, 28, 28))
print(json.dumps({{
    "cls": list(model(torch.randn(2, 3, 28, 28)).shape),
    "registers": list(features["x_norm_regtokens"].shape),
    "patches": list(features["x_norm_patchtokens"].shape),
    "neurons": sum(len(ids) for ids in model.dinov2.config.register_neurons.values()),
    "semantics": model.dinov2.config.register_semantics,
}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd="/",
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {
        "cls": [2, 1024],
        "registers": [2, 1, 1024],
        "patches": [2, 4, 1024],
        "neurons": 45,
        "semantics": "reference",
    }


def test_entries_without_a_shipped_index_ask_for_one():
    with pytest.raises(RegisterNeuronIndexError, match="No register-neuron index is known for 'dinov2_vits14'"):
        dinov2_vits14_tt_reg(pretrained=False)
    model = dinov2_vits14_tt_reg(pretrained=False, num_test_time_registers=0)
    assert model.dinov2.token_layout.num_registers == 0


def test_unknown_model_names_list_the_known_ones_and_the_closest():
    with pytest.raises(ValueError, match="Unknown model 'dinov2_vitx14'; did you mean 'dinov2_vits14'.*dinov2_vits14"):
        load_tt_model("dinov2_vitx14", pretrained=False)
    with pytest.raises(ValueError, match="'dinov2_vitl14_tt_reg' is the torch.hub entry of 'dinov2_vitl14'"):
        load_tt_model("dinov2_vitl14_tt_reg", pretrained=False)
    with pytest.raises(ValueError, match=r"Unknown model 'resnet50'; the names: "):  # nothing close: no guess
        load_tt_model("resnet50", pretrained=False)
    assert {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"} <= set(MODEL_NAMES)


@pytest.fixture
def hub_model():
    config = Dinov2TTRegConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        patch_size=14,
        register_neurons={2: [4, 9]},
        num_test_time_registers=2,
    )
    return DinoVisionTransformerTTReg(Dinov2TTRegModel(config).eval())


def test_upstream_interface_shapes_and_consistency(hub_model):
    pixels = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        features = hub_model.forward_features(pixels)
        (last,) = hub_model.get_intermediate_layers(pixels, n=1)
        grids = hub_model.get_intermediate_layers(pixels, n=[0, 3], reshape=True, return_class_token=True)
        raw = hub_model.get_intermediate_layers(pixels, n=2, norm=False)
        cls = hub_model(pixels)
    assert features["x_norm_clstoken"].shape == (2, 32) and torch.equal(cls, features["x_norm_clstoken"])
    assert features["x_norm_regtokens"].shape == (2, 2, 32)
    assert features["x_norm_patchtokens"].shape == (2, 12, 32)
    assert features["x_prenorm"].shape == (2, 13, 32) and features["masks"] is None
    torch.testing.assert_close(last, features["x_norm_patchtokens"])
    torch.testing.assert_close(raw[-1], features["x_prenorm"][:, 1:])
    assert [(grid.shape, cls_token.shape) for grid, cls_token in grids] == [((2, 32, 4, 3), (2, 32))] * 2
    assert hub_model.num_register_tokens == 0 and hub_model.embed_dim == 32 and hub_model.patch_size == 14


def test_upstream_attributes_are_the_models_own_parts(hub_model):
    dinov2 = hub_model.dinov2
    embeddings = dinov2.embeddings
    assert hub_model.blocks is dinov2.encoder.layer and hub_model.norm is dinov2.layernorm
    assert hub_model.patch_embed is embeddings.patch_embeddings
    assert hub_model.patch_embed.proj is embeddings.patch_embeddings.projection
    assert hub_model.patch_embed.patch_size == (14, 14)
    assert hub_model.pos_embed is embeddings.position_embeddings and hub_model.cls_token is embeddings.cls_token
    assert hub_model.mask_token is embeddings.mask_token
    assert (hub_model.num_heads, hub_model.n_blocks, hub_model.num_features) == (2, 4, 32)
    assert hub_model.num_register_tokens == 0 and hub_model.register_tokens is None
    assert hub_model.num_test_time_registers == 2
    assert all(key.startswith("dinov2.") for key in hub_model.state_dict())  # the aliases add no keys

    pixels = torch.randn(2, 3, 56, 42)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[:, 3] = True
    seen = []
    hub_model.blocks[1].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        features = hub_model.forward_features(pixels, masks=masks)
        x = hub_model.prepare_tokens_with_masks(pixels, masks)  # research code's own loop over the blocks
        for block in hub_model.blocks:
            x = block(x)
        x = hub_model.norm(x)
        table = hub_model.interpolate_pos_encoding(x[:, :13], 56, 42)
    assert seen == [(2, 15, 32), (2, 15, 32)]  # the hook fired in both forwards, on 1 + 12 patches + 2 registers
    assert torch.equal(x[:, 0], features["x_norm_clstoken"])
    assert torch.equal(x[:, 1:-2], features["x_norm_patchtokens"])
    assert torch.equal(x[:, -2:], features["x_norm_regtokens"])
    assert table.shape == (1, 13, 32)

    hub_model.head = torch.nn.Linear(32, 5)  # upstream's forward applies `head` to the CLS embedding
    assert hub_model(pixels).shape == (2, 5)
    hub_model.dinov2.set_register_neurons({})
    assert hub_model.num_test_time_registers == 0


@pytest.fixture(scope="module")
def vits14_file(tmp_path_factory):
    """Random ViT-S/14 weights in the original layout (a backbone `weights=` file that a fresh clone has too)."""
    path = tmp_path_factory.mktemp("vits14") / "vits14.safetensors"
    save_file(random_original_state_dict(dim=384, depth=12, patch_size=14, table_side=37), path)
    return path


def test_linear_heads_load_from_upstreams_urls_through_torch_hubs_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub's cache: tmp_path/hub/checkpoints
    heads = {layers: torch.nn.Linear((1 + layers) * 384, 1000) for layers in (1, 4)}
    # offline, nothing cached: one error, about the head, before the backbone (not cached either) is looked at
    with pytest.raises(OSError, match=r"offline .*dinov2_vits14_linear4_head\.pth .*`head_weights=` for a head"):
        dinov2_vits14_tt_reg_lc(num_test_time_registers=0)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    for layers, head in heads.items():
        url = DINOV2_LINEAR_HEAD_URL.format(arch="vits14", layers="4" if layers == 4 else "")
        torch.save(head.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
        loaded = load_dinov2_linear_head("vits14", layers)
        assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    assert DINOV2_LINEAR_HEAD_URL.format(arch="vitg14", layers="") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_linear_head.pth"
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_head_weights_from_a_local_file(vits14_file, tmp_path, suffix):
    head = torch.nn.Linear(2 * 384, 1000)
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(head.state_dict(), path)
    else:
        save_file(head.state_dict(), path)
    model = dinov2_vits14_tt_reg_lc(weights=vits14_file, head_weights=path, layers=1, num_test_time_registers=0)
    assert torch.equal(model.linear_head.weight, head.weight) and model.layers == 1
    assert model.backbone.dinov2.config.position_interpolation == "upstream"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 28, 42)).shape == (2, 1000)
    with pytest.raises(ValueError, match="holds a 1-layer head of dinov2_vits14, not a 4-layer one: pass layers=1"):
        dinov2_vits14_tt_reg_lc(weights=vits14_file, head_weights=path, num_test_time_registers=0)


def test_unknown_arguments_are_refused_with_the_closest_name():
    for entry, kwargs, closest in [
        (dinov2_vits14_tt_reg_lc, {"head_weight": "head.pth"}, "head_weights"),
        (dinov2_vits14_tt_reg_lc, {"layer": 1}, "layers"),
        (dinov2_vits14_tt_reg_lc, {"img_size": 224}, "image_size"),
        (dinov2_vits14_tt_reg, {"num_test_time_register": 0}, "num_test_time_registers"),
        (dinov2_vits14_tt_reg, {"weight": "backbone.pth"}, "weights"),
    ]:
        with pytest.raises(TypeError, match=f"unexpected keyword argument '.*'; did you mean '{closest}'"):
            entry(pretrained=False, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'zzz'; none of the [0-9]+ it takes is close"):
        dinov2_vits14_tt_reg(pretrained=False, zzz=1)
    with pytest.raises(ValueError, match="layers=2: upstream's linear heads read the last 1 or 4 blocks"):
        dinov2_vits14_tt_reg_lc(pretrained=False, layers=2, num_test_time_registers=0)


def test_intermediate_layers_are_upstreams_blocks_and_bad_choices_are_refused():
    model = DinoVisionTransformerTTReg(Dinov2TTRegModel(tiny_dinov2_config(num_test_time_registers=0)).eval())
    pixels = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        hidden = model.dinov2(pixels, output_hidden_states=True).hidden_states
        blocks = [model.dinov2.layernorm(state)[:, 1:] for state in hidden[1:]]  # normed outputs of blocks 0, 1, 2

        def taken(n):  # which blocks' outputs `get_intermediate_layers` returned
            outputs = model.get_intermediate_layers(pixels, n=n)
            return [next(i for i, block in enumerate(blocks) if torch.equal(block, out)) for out in outputs]

        assert taken(3) == [0, 1, 2] and taken(1) == [2]
        assert taken([-1]) == [2] and taken([0, -1]) == [0, 2] and taken([-3]) == [0]
        assert taken([2, 0]) == [0, 2]  # block order, as upstream returns them
    for n, error, message in [
        (4, ValueError, r"n=4 asks for the last 4 of 3 blocks: give 1 to 3"),
        (0, ValueError, r"give 1 to 3"),
        ([3], ValueError, r"Blocks \[3\] are out of range: the model has 3 blocks, 0 to 2 \(or -3 to -1"),
        ([-4, 1], ValueError, r"Blocks \[-4\] are out of range"),
        ([1, -2], ValueError, r"names a block twice"),
        ([], TypeError, r"non-empty list of int block indices"),
        ([1.0], TypeError, r"non-empty list of int block indices"),
    ]:
        with pytest.raises(error, match=message):
            model.get_intermediate_layers(pixels, n=n)


@pytest.mark.parametrize("dtypes", ["fp16", "mixed"])
def test_weights_of_any_dtype_load_into_fp32_parameters(tmp_path, dtypes):
    original = random_original_state_dict(dim=384, depth=12, patch_size=14, table_side=37)  # ViT-S/14's shapes
    cycle = [torch.float16] if dtypes == "fp16" else [torch.float16, torch.bfloat16, torch.float32]
    stored = {name: value.detach().to(cycle[i % len(cycle)]) for i, (name, value) in enumerate(original.items())}
    save_file(stored, tmp_path / "weights.safetensors")
    save_file({name: value.float() for name, value in stored.items()}, tmp_path / "fp32.safetensors")
    model = load_tt_model("dinov2_vits14", weights=tmp_path / "weights.safetensors", num_test_time_registers=0)
    expected = load_tt_model("dinov2_vits14", weights=tmp_path / "fp32.safetensors", num_test_time_registers=0)
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.float32}
    pixels = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        assert torch.equal(model(pixels).last_hidden_state, expected(pixels).last_hidden_state)


def test_original_layout_matches_timm_on_real_weights(shared_dir):
    timm = pytest.importorskip("timm")
    state_dict = load_file(shared_dir / VITS14)
    reference = timm.create_model("vit_small_patch14_dinov2", img_size=518, num_classes=0).eval()
    reference.load_state_dict({k: v for k, v in state_dict.items() if k != "mask_token"})
    model = dinov2_vits14_tt_reg(weights=shared_dir / VITS14, num_test_time_registers=0)
    pixels = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        expected = reference.forward_features(pixels)
        features = model.forward_features(pixels)
    torch.testing.assert_close(features["x_norm_clstoken"], expected[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(features["x_norm_patchtokens"], expected[:, 1:], atol=1e-5, rtol=0)


def test_converted_real_weights_load_in_stock_transformers(shared_dir, tmp_path):
    model = load_tt_model(
        "dinov2_vits14", weights=shared_dir / VITS14, num_test_time_registers=0, position_interpolation="transformers"
    )
    parent = Dinov2Model(model.config).eval()
    parent.load_state_dict(model.state_dict())
    parent.save_pretrained(tmp_path)
    stock = Dinov2Model.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(stock(pixels).last_hidden_state, model(pixels).last_hidden_state, atol=1e-5, rtol=0)


def to_original_layout(model: Dinov2Model, chunked: bool) -> dict[str, torch.Tensor]:
    """Invert the conversion by hand for a tiny model (also exercises chunked block keys and SwiGLU)."""
    original = {}
    for key, value in model.state_dict().items():
        if not key.startswith("encoder.layer."):
            continue
        i, name = key.removeprefix("encoder.layer.").split(".", 1)
        prefix = f"blocks.0.{i}." if chunked else f"blocks.{i}."
        renames = {
            "attention.o_proj": "attn.proj",
            "layer_scale1.lambda1": "ls1.gamma",
            "layer_scale2.lambda1": "ls2.gamma",
            "mlp.down_proj": "mlp.w3",
        }
        for new, old in renames.items():
            name = name.replace(new, old)
        original[prefix + name] = value
    for block in range(model.config.num_hidden_layers):
        prefix = f"blocks.0.{block}." if chunked else f"blocks.{block}."
        for suffix in ("weight", "bias"):
            original[f"{prefix}attn.qkv.{suffix}"] = torch.cat(
                [original.pop(f"{prefix}attention.{p}_proj.{suffix}") for p in "qkv"]
            )
            if model.config.use_swiglu_ffn:
                original[f"{prefix}mlp.w12.{suffix}"] = torch.cat(
                    [original.pop(f"{prefix}mlp.gate_proj.{suffix}"), original.pop(f"{prefix}mlp.up_proj.{suffix}")]
                )
    embeddings = model.embeddings
    original.update(
        cls_token=embeddings.cls_token,
        pos_embed=embeddings.position_embeddings,
        mask_token=embeddings.mask_token,
        **{
            "patch_embed.proj.weight": embeddings.patch_embeddings.projection.weight,
            "patch_embed.proj.bias": embeddings.patch_embeddings.projection.bias,
            "norm.weight": model.layernorm.weight,
            "norm.bias": model.layernorm.bias,
        },
    )
    return original


@pytest.mark.parametrize("swiglu", [False, True])
def test_conversion_inverts_the_original_layout(swiglu):
    config = Dinov2TTRegConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, use_swiglu_ffn=swiglu)
    model = Dinov2Model(config)
    converted = convert_original_state_dict(to_original_layout(model, chunked=swiglu), config)
    assert converted.keys() == model.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_checkpoints_with_trained_registers_are_refused():
    with pytest.raises(ValueError, match="trained registers"):
        convert_original_state_dict({"register_tokens": torch.zeros(1, 4, 8)}, Dinov2TTRegConfig())
