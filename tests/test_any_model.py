"""Discovery, inspect and the analysis tools on whatever model a user holds (issue #26, items 1-3): a tower, a
classifier, backbone hosts, a dual encoder, VLMs, the torch.hub DINOv2 model, an open_clip CLIP, timm models
(``features_only`` too). Each holds a tiny tower with planted register neurons; discovery finds them through the API
and, from a saved folder, through the CLI's model specs."""

import copy
import json
import re
import warnings
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models._features import FeatureGetterNet
from timm.models._hub import save_for_hf
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
    ViTConfig,
    ViTForMaskedImageModeling,
    ViTImageProcessor,
)

from ttreg_cli import ModelSpec, main, parse_model_spec
from ttreg_hf import (
    CLIPTTRegModel,
    Dinov2TTRegForImageClassification,
    RegisterIndexMismatchWarning,
    RegisterNeuronIndex,
    load_vlm,
    to_test_time_registers,
    vision_tower_with_registers,
)
from ttreg_hf.analysis import (
    ablate_neurons,
    capture,
    consumer_layer,
    register_tower,
    run_with_cache,
    summarize_layers,
    with_register_neurons,
)
from ttreg_hf.discovery import find_register_neurons
from ttreg_hf.images import normalize
from ttreg_hf.modeling.dinov2_original import DinoVisionTransformerTTReg
from ttreg_hf.modeling.open_clip import to_test_time_registers as open_clip_tt
from ttreg_hf.modeling.timm import to_test_time_registers as timm_tt
from ttreg_hf.planted import plant_register_neurons, planting_sites, textured_images
from ttreg_hf.report import inspect_image

from family_models import DEPTH, HEADS, HF, LAYER, MLP, NEURONS, PATCH, SIZE, TINY, WIDTH, tiny_model

PLANTED = {LAYER: set(NEURONS)}
MEAN, STD = [0.5] * 3, [0.5] * 3  # what every processor saved below normalises with
CLIP_TOWER = dict(**HF, intermediate_size=MLP)
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
    vocab_size=64, max_position_embeddings=256,
)  # fmt: skip
IMAGE_TOKEN, NUM_PATCHES = 63, (SIZE // PATCH) ** 2
BACKBONE = dict(**HF, mlp_ratio=MLP // WIDTH, out_indices=[2, 3, 4], reshape_hidden_states=False)
NECK = dict(neck_hidden_sizes=[8, 16, 32], fusion_hidden_size=8, reassemble_factors=[2, 1, 0.5])
OPEN_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=SIZE, layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH,
                    mlp_ratio=MLP / WIDTH),
    text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
)  # fmt: skip
TIMM = dict(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH)


def llava(vision_feature_layer: int = -2):
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_TOWER), text_config=LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
        image_seq_length=NUM_PATCHES, vision_feature_layer=vision_feature_layer,
    )  # fmt: skip
    return to_test_time_registers(LlavaForConditionalGeneration(config), register_neurons={})


def llava_next():
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**CLIP_TOWER), text_config=LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[SIZE, SIZE]],
    )  # fmt: skip
    return to_test_time_registers(LlavaNextForConditionalGeneration(config), register_neurons={})


def llava_onevision():
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**CLIP_TOWER, vision_use_head=False), text_config=Qwen2Config(**TEXT),
        image_token_index=IMAGE_TOKEN, video_token_index=62, image_grid_pinpoints=[[SIZE, SIZE]],
    )  # fmt: skip
    return to_test_time_registers(LlavaOnevisionForConditionalGeneration(config), register_neurons={})


def open_clip_model():
    model = open_clip.model.CLIP(**OPEN_CLIP)
    model.visual.preprocess_cfg = {"size": SIZE, "mean": MEAN, "std": STD}
    return open_clip_tt(model, num_test_time_registers=1)


def timm_features_only():
    model = timm_tt(timm.models.VisionTransformer(**TIMM, num_classes=0), num_test_time_registers=1)
    return FeatureGetterNet(model, out_indices=(1, LAYER))  # blocks after LAYER pruned: its last block is LAYER


# every kind of model of item 1, each built with its tower's edit off
KINDS = {
    "tower": TINY["dinov2"],
    "classifier": lambda: tiny_model("dinov2", Dinov2TTRegForImageClassification),
    "dpt": lambda: to_test_time_registers(
        DPTForDepthEstimation(
            DPTConfig(backbone_config=Dinov2Config(**BACKBONE), is_hybrid=False, hidden_size=WIDTH, **NECK)
        ),
        register_neurons={},
    ),  # fmt: skip
    "depth_anything": lambda: to_test_time_registers(
        DepthAnythingForDepthEstimation(
            DepthAnythingConfig(
                backbone_config=Dinov2Config(**BACKBONE), reassemble_hidden_size=WIDTH, head_hidden_size=8, **NECK
            )
        ),
        register_neurons={},
    ),  # fmt: skip
    "dual_encoder": lambda: tiny_model("clip", CLIPTTRegModel),
    "masked_image": lambda: to_test_time_registers(
        ViTForMaskedImageModeling(ViTConfig(**HF, intermediate_size=MLP, encoder_stride=PATCH)), register_neurons={}
    ),
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "torch_hub_dinov2": lambda: DinoVisionTransformerTTReg(TINY["dinov2"]()),
    "open_clip": open_clip_model,
    "timm": TINY["timm"],
    "timm_features_only": timm_features_only,
}
# the block each kind reads from its tower: LLaVA's and LLaVA-NeXT's vision_feature_layer -2, the pruned features
# model's last block; the rest read the last (LLaVA-OneVision's -1, the backbones' deepest out_indices 4)
DETECTION_LAYER = {"llava": LAYER, "llava_next": LAYER, "timm_features_only": LAYER}


@torch.no_grad()
def planted(kind: str) -> torch.nn.Module:
    """The model of ``kind`` with `NEURONS` of block `LAYER` of its tower planted as register neurons."""
    torch.manual_seed(0)
    model = KINDS[kind]().eval()
    plant_register_neurons(planting_sites(register_tower(model)), LAYER, NEURONS, seed=0)
    return model


def pixels(num_images: int, seed: int = 0) -> torch.Tensor:
    return normalize(textured_images(num_images, seed=seed, size=SIZE), MEAN, STD)


def outliers_per_image(model, images: torch.Tensor, layer: int, threshold: float) -> float:
    _, cache = run_with_cache(model, images, blocks=[layer])
    return summarize_layers(cache, threshold)[0].outliers_per_image


@pytest.mark.parametrize("kind", KINDS)
def test_discovery_finds_the_planted_neurons_of_any_model_and_the_index_attaches_without_a_warning(kind, tmp_path):
    model = planted(kind)
    tower = register_tower(model)
    result = find_register_neurons(model, pixels(24))
    assert {layer: set(ids) for layer, ids in result.index.neurons.items()} == PLANTED
    assert result.index.details["detection_layer"] == DETECTION_LAYER.get(kind, DEPTH - 1)
    held_out = pixels(4, seed=1)
    before = outliers_per_image(model, held_out, LAYER, result.threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegisterIndexMismatchWarning)
        tower.set_register_neurons(result.index, num_test_time_registers=1)  # the same model
        if hasattr(tower, "save_pretrained"):  # its tower alone, saved and loaded as its class
            tower.save_pretrained(tmp_path)
            alone = type(tower).from_pretrained(tmp_path, register_neurons=result.index)
        else:
            alone = copy.deepcopy(tower).set_register_neurons(result.index)
    assert before >= 1 and outliers_per_image(model, held_out, LAYER, result.threshold) == 0
    assert outliers_per_image(alone.eval(), held_out, LAYER, result.threshold) == 0


def test_the_detection_layer_follows_a_vlms_vision_feature_layer():
    assert consumer_layer(llava(-2)).layer == DEPTH - 2 == LAYER
    assert consumer_layer(llava(-1)).layer == DEPTH - 1
    assert consumer_layer(llava(2)).layer == 1  # hidden state 2 is block 1's output
    assert consumer_layer(llava([-4, -1])).layer == DEPTH - 1  # of a list, the deepest
    assert consumer_layer(TINY["dinov2"]()).rule == "the last block"
    with pytest.raises(ValueError, match="hidden state 0, which is the embeddings"):
        consumer_layer(llava(0))
    result = find_register_neurons(planted("llava"), pixels(16), top_k=2)
    assert (
        result.detection_layer == LAYER
        and "vision_feature_layer -2 of LlavaTTRegForConditionalGeneration"
        in (result.index.details["detection_layer_rule"])
    )
    assert f"layer {LAYER} (the vision_feature_layer -2" in result.summary()
    assert find_register_neurons(planted("llava"), pixels(16), top_k=2, detection_layer=-1).detection_layer == 3


def test_the_llava_walk_through_finds_saves_attaches_and_generates(tmp_path):
    """The VLM guide's walk-through: find on the VLM, attach to its tower, save, reload with the index, generate."""
    vlm = planted("llava")
    result = find_register_neurons(vlm, pixels(16))
    vision_tower_with_registers(vlm).set_register_neurons(result.index, num_test_time_registers=1)
    vlm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegisterIndexMismatchWarning)
        reloaded = load_vlm(tmp_path).eval()
    neurons = vision_tower_with_registers(reloaded).config.register_neuron_index
    assert {layer: set(ids) for layer, ids in neurons.items()} == PLANTED
    inputs = dict(input_ids=torch.tensor([[1, *[IMAGE_TOKEN] * NUM_PATCHES, 5, 6]]), pixel_values=pixels(1, seed=3))
    with torch.no_grad():
        logits = reloaded(**inputs).logits
        with with_register_neurons(reloaded, {}):
            assert not torch.allclose(reloaded(**inputs).logits, logits)  # the edit reaches the language model
        assert torch.equal(vlm(**inputs).logits, logits)
    generated = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, vlm.generate(**inputs, max_new_tokens=3, do_sample=False))


def test_the_analysis_tools_run_on_the_tower_of_a_vlm():
    model, images = planted("llava"), pixels(2)
    tower = register_tower(model)
    with capture(model, mlp=[LAYER]) as cache:
        tower(images)
    with ablate_neurons(model, {LAYER: list(NEURONS)}), capture(tower, mlp=[LAYER]) as ablated:
        tower(images)
    assert cache.mlp_activations[LAYER][..., list(NEURONS)].abs().amax() > 0
    assert ablated.mlp_activations[LAYER][..., list(NEURONS)].abs().amax() == 0
    with with_register_neurons(model, {LAYER: list(NEURONS)}) as same:
        assert same is model and tower.token_layout.num_registers == 1
    assert tower.token_layout.num_registers == 0
    original, edited = inspect_image(model, {"pixel_values": images[:1]}, {LAYER: list(NEURONS)})
    assert original.layer.layer == edited.layer.layer == LAYER
    assert original.summary.outliers_per_image >= 1 and edited.summary.outliers_per_image == 0


def test_a_model_with_several_towers_or_none_is_refused_naming_them():
    two = torch.nn.ModuleDict({"left": TINY["dinov2"](), "right": TINY["clip"]()})
    with pytest.raises(ValueError, match=r"2 towers .*left \(Dinov2TTRegModel\), right \(CLIPVisionTTRegModel\)"):
        find_register_neurons(two, pixels(2))
    with pytest.raises(ValueError, match="no tower with test-time registers .*to_test_time_registers"):
        register_tower(torch.nn.Linear(2, 2))


# ---- the CLI's model specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("planted", ModelSpec("name", "planted")),  # a registered checkpoint, as the families' are
        ("dinov2_vitl14", ModelSpec("name", "dinov2_vitl14")),
        ("facebook/dinov2-small", ModelSpec("transformers", "facebook/dinov2-small")),
        ("open_clip:ViT-B-16", ModelSpec("open_clip", "ViT-B-16")),
        ("open_clip:ViT-B-16:laion2b_s34b_b88k", ModelSpec("open_clip", "ViT-B-16", "laion2b_s34b_b88k")),
        ("open_clip:hf-hub:me/clip", ModelSpec("open_clip", "hf-hub:me/clip")),
        ("hf-hub:me/clip", ModelSpec("open_clip", "hf-hub:me/clip")),
        ("local-dir:/some/folder", ModelSpec("open_clip", "local-dir:/some/folder")),
        ("timm:vit_small_patch14_dinov2.lvd142m", ModelSpec("timm", "vit_small_patch14_dinov2.lvd142m")),
        ("timm:local-dir:/some/folder", ModelSpec("timm", "local-dir:/some/folder")),
    ],
)
def test_one_grammar_parses_every_model_spec(spec, parsed):
    assert parse_model_spec(spec) == parsed


def save_image(image: torch.Tensor, path: Path) -> Path:
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(textured_images(16, seed=0, size=SIZE)):
        save_image(image, folder / f"{i:02d}.png")
    return folder


def saved_transformers(kind: str, processor):
    def save(folder: Path) -> str:
        planted(kind).save_pretrained(folder)
        processor.save_pretrained(folder)
        return str(folder)

    return save


def saved_open_clip(folder: Path) -> str:
    folder.mkdir()
    model = planted("open_clip")
    config = {"model_cfg": OPEN_CLIP, "preprocess_cfg": {"mean": MEAN, "std": STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return f"local-dir:{folder}"


def saved_llava_parent(folder: Path) -> str:
    """The planted LLaVA saved as plain `transformers` writes the parent: a `CLIPVisionConfig` tower."""
    model = planted("llava")
    config = LlavaConfig(**{**model.config.to_dict(), "vision_config": CLIPVisionConfig(**CLIP_TOWER)})
    parent = LlavaForConditionalGeneration(config)
    parent.load_state_dict(model.state_dict())
    parent.save_pretrained(folder)
    CLIP_PROCESSOR.save_pretrained(folder)
    return str(folder)


def saved_timm(folder: Path) -> str:
    model = planted("timm")
    model.pretrained_cfg = dict(
        architecture="vit_base_patch16_224", input_size=(3, SIZE, SIZE), mean=tuple(MEAN), std=tuple(STD), crop_pct=1.0
    )
    save_for_hf(model, folder, model_args={**TIMM, "num_classes": 0}, safe_serialization=True)
    return f"timm:local-dir:{folder}"


CLIP_PROCESSOR = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=SIZE, image_mean=MEAN, image_std=STD)
VIT_PROCESSOR = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD)
DPT_PROCESSOR = DPTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD)
LLAVA_NEXT_PROCESSOR = LlavaNextImageProcessor(
    size={"shortest_edge": SIZE},
    crop_size=SIZE,
    image_grid_pinpoints=[[SIZE, 2 * SIZE]],
    image_mean=MEAN,
    image_std=STD,
)
SAVED = {
    "classifier": saved_transformers("classifier", CLIP_PROCESSOR),
    "dpt": saved_transformers("dpt", DPT_PROCESSOR),
    "depth_anything": saved_transformers("depth_anything", DPT_PROCESSOR),
    "dual_encoder": saved_transformers("dual_encoder", CLIP_PROCESSOR),
    "masked_image": saved_transformers("masked_image", VIT_PROCESSOR),
    "llava": saved_transformers("llava", CLIP_PROCESSOR),
    "llava_parent": saved_llava_parent,
    "llava_next": saved_transformers("llava_next", LLAVA_NEXT_PROCESSOR),  # tiles: the tower sees each base view
    "open_clip": saved_open_clip,
    "timm": saved_timm,
}


@pytest.mark.parametrize("kind", SAVED)
def test_the_cli_finds_the_planted_neurons_of_any_saved_model(kind, image_dir, tmp_path, capsys):
    spec = SAVED[kind](tmp_path / kind)
    out = tmp_path / "index.safetensors"
    assert main(["find-neurons", spec, str(image_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    index = RegisterNeuronIndex.load(out)
    assert {layer: set(ids) for layer, ids in index.neurons.items()} == PLANTED, printed
    consumer = {"llava": "Llava", "llava_parent": "Llava", "llava_next": "LlavaNext"}.get(kind)
    rule = f"the vision_feature_layer -2 of {consumer}TTRegForConditionalGeneration" if consumer else None
    assert f"patch norms at layer {index.details['detection_layer']} ({rule or ''}" in printed
    report = tmp_path / "report.png"
    assert main(["inspect", spec, str(image_dir / "00.png"), "--index", str(out), "--out", str(report)]) == 0
    original, edited = capsys.readouterr().out.splitlines()[:2]
    outliers = [int(re.search(r"(\d+) outlier tokens", line).group(1)) for line in (original, edited)]
    assert outliers[0] >= 1 and outliers[1] == 0, (original, edited)
    assert f"layer {index.details['detection_layer']} (" in original
    evaluation = tmp_path / "evaluation"
    argv = ["evaluate", spec, str(image_dir), "--index", str(out), "--out-dir", str(evaluation), "--no-figure"]
    assert main([*argv, "--resamples", "20"]) == 0
    ratio = json.loads((evaluation / "evaluation.json").read_text())["layers"][-1]["outlier_ratio"]
    assert ratio["on"] < ratio["off"], ratio  # the last block's outliers, which the edit moves onto the register


def test_export_refuses_what_it_cannot_write_with_the_reason(tmp_path, capsys):
    for spec, reason in [
        ("planted", "a model name is a loader"),
        ("timm:vit_small_patch14_dinov2", "save_for_hf"),
        ("dinov2_vits14", "a model name is a loader"),
    ]:
        assert main(["export", spec, "--index", "dinov2_vitl14", "--out", str(tmp_path / "e")]) == 2
        assert reason in capsys.readouterr().err


def test_the_demo_runs_discovery_and_the_report_on_a_vlm_folder(image_dir, tmp_path, capsys):
    folder = SAVED["llava"](tmp_path / "llava")
    out = tmp_path / "demo"
    assert main(["demo", "--model", folder, "--images", str(image_dir), "--out-dir", str(out)]) == 0
    assert RegisterNeuronIndex.load(out / "index.safetensors").neurons.keys() == PLANTED.keys()
    assert f"with test-time register: layer {LAYER} (the vision_feature_layer -2" in capsys.readouterr().out
