"""Task models on test-time-register towers: backbones inside depth and segmentation models, classifiers, whole CLIP /
SigLIP models, `to_test_time_registers` on loaded ones, and the pipelines that run them.

With the edit off every class is its parent bit for bit (`test_family_contract.py` checks all of them); here, with
the edit on, feature maps and pooled features are the hook-based reference edit on the parent's tower with the
register cut before the head, and what `save_pretrained` writes reloads with the registers.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoBackbone,
    AutoModel,
    AutoModelForDepthEstimation,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    DepthProConfig,
    DepthProForDepthEstimation,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    DPTImageProcessor,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    pipeline,
)
from transformers.backbone_utils import load_backbone

from ttreg_hf import (
    CLIPTTRegForImageClassification,
    CLIPTTRegModel,
    Dinov2TTRegBackbone,
    Dinov2TTRegConfig,
    Dinov2TTRegForImageClassification,
    Dinov2TTRegModel,
    DINOv3ViTTTRegBackbone,
    DINOv3ViTTTRegConfig,
    DINOv3ViTTTRegModel,
    SiglipTTRegModel,
    to_test_time_registers,
    vision_tower_with_registers,
)
from ttreg_hf.family import parent_class

from host_models import (
    BACKBONE_HOSTS,
    DEPTH_ANYTHING,
    DINOV2,
    LOADED,
    NEURONS,
    TEXT,
    VISION,
    tiny_backbone_config,
    tiny_clip,
)
from reference_edit import hooked_register_edit


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 42, 42) * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)


def _hooked_parent(tower, num_prefix=1):
    """The reference edit on a parent tower (`Dinov2Model`, `CLIPVisionModel`, `SiglipVisionModel`), its outputs with
    the register still last."""
    blocks = tower.encoder.layer if hasattr(tower.encoder, "layer") else tower.encoder.layers
    return hooked_register_edit(
        tower.embeddings, {layer: blocks[layer].mlp.fc2 for layer in NEURONS}, NEURONS, num_prefix=num_prefix
    )


# ---- backbones --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reshape", [True, False], ids=["maps", "tokens"])
def test_backbone_feature_maps_are_the_reference_edits_patch_tokens(reshape, pixels):
    backbone = Dinov2TTRegBackbone(
        Dinov2TTRegConfig(**DINOV2, out_indices=[1, 2, 3], reshape_hidden_states=reshape, register_neurons=NEURONS)
    ).eval()
    parent = Dinov2Model(backbone.config).eval()
    parent.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        maps = backbone(pixels, output_hidden_states=True).feature_maps
        with _hooked_parent(parent):
            hidden = parent(pixels, output_hidden_states=True).hidden_states
    for stage, feature_map in zip((1, 2, 3), maps, strict=True):
        tokens = backbone.layernorm(hidden[stage][:, :-1])  # the register cut, as no head may see it
        expected = tokens[:, 1:].reshape(2, 3, 3, 32).permute(0, 3, 1, 2) if reshape else tokens
        torch.testing.assert_close(feature_map, expected, atol=1e-5, rtol=1e-5)


def test_dinov3_backbone_maps_are_the_models_patch_tokens(pixels):
    config = DINOv3ViTTTRegConfig(
        **VISION, num_register_tokens=2, out_indices=[1, 3], register_neurons=NEURONS, return_class_token=True
    )
    backbone = DINOv3ViTTTRegBackbone(config).eval()
    model = DINOv3ViTTTRegModel(config).eval()
    model.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        outputs = backbone(pixels)
        tokens = model(pixels, output_hidden_states=True)
    normed = [backbone.norm(tokens.hidden_states[stage]) for stage in (1, 3)]
    for feature_map, cls, stage_tokens in zip(outputs.feature_maps, outputs.cls_tokens, normed, strict=True):
        assert torch.equal(feature_map, stage_tokens[:, 3:].reshape(2, 3, 3, 32).permute(0, 3, 1, 2))
        assert torch.equal(cls, stage_tokens[:, 0])


@pytest.mark.parametrize("host", BACKBONE_HOSTS)
def test_depth_and_segmentation_models_take_our_backbone_config(host, pixels):
    """A ``backbone_config`` of ours builds our backbone in the host (through `load_backbone` / `AutoBackbone`); its
    output has the parent's shape, and with the edit off is the parent's."""
    model_class, host_config, backbone_fields, output = BACKBONE_HOSTS[host]
    torch.manual_seed(0)
    parent = model_class(host_config(tiny_backbone_config(False, **backbone_fields))).eval()
    ours = model_class(host_config(tiny_backbone_config(True, **backbone_fields))).eval()
    ours.load_state_dict(parent.state_dict())
    backbone = vision_tower_with_registers(ours)
    assert isinstance(backbone, Dinov2TTRegBackbone)
    with torch.no_grad():
        expected = getattr(parent(pixels), output)
        edited, maps = getattr(ours(pixels), output), backbone(pixels).feature_maps
        backbone.set_register_neurons({})
        assert torch.equal(getattr(ours(pixels), output), expected)
        assert not torch.equal(backbone(pixels).feature_maps[-1], maps[-1])  # the edit ran (a tiny ZoeDepth saturates)
    assert edited.shape == expected.shape


def test_auto_backbone_and_load_backbone_build_ours():
    config = tiny_backbone_config(True)
    assert type(AutoBackbone.from_config(config)) is Dinov2TTRegBackbone
    assert type(load_backbone(DepthAnythingConfig(backbone_config=config.to_dict()))) is Dinov2TTRegBackbone


def test_depth_anything_upgraded_in_place_reloads_with_its_registers(pixels, tmp_path):
    torch.manual_seed(0)
    fields = BACKBONE_HOSTS["depth_anything"][2]
    model = DepthAnythingForDepthEstimation(
        BACKBONE_HOSTS["depth_anything"][1](tiny_backbone_config(False, **fields))
    ).eval()
    weight = model.backbone.embeddings.patch_embeddings.projection.weight
    assert to_test_time_registers(model, register_neurons=NEURONS) is model
    backbone = model.backbone
    assert isinstance(backbone, Dinov2TTRegBackbone) and model.config.backbone_config is backbone.config
    assert backbone.embeddings.patch_embeddings.projection.weight is weight  # shared, not copied
    with torch.no_grad():
        depth = model(pixels).predicted_depth
        maps = backbone(pixels).feature_maps
        # the parent's forward after its backbone (DepthAnythingForDepthEstimation.forward): neck and head on the maps
        expected = model.head(model.neck(list(maps), 3, 3), 3, 3)
    assert torch.equal(depth, expected)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForDepthEstimation.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.backbone, Dinov2TTRegBackbone)
    assert reloaded.backbone.config.register_neuron_index == {layer: tuple(ids) for layer, ids in NEURONS.items()}
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).predicted_depth, depth)


def test_several_towers_are_refused_with_a_way_out():
    sub_config = dict(**DINOV2 | {"image_size": 56})
    config = DepthProConfig(
        image_model_config=Dinov2Config(**sub_config), patch_model_config=Dinov2Config(**sub_config),
        fov_model_config=Dinov2Config(**sub_config), patch_size=56, fusion_hidden_size=16,
        intermediate_hook_ids=[2, 1], intermediate_feature_dims=[16, 16], scaled_images_ratios=[0.5, 1.0],
        scaled_images_overlap_ratios=[0.0, 0.25], scaled_images_feature_dims=[32, 32], num_fov_head_layers=1,
    )  # fmt: skip
    model = DepthProForDepthEstimation(config)
    with pytest.raises(TypeError, match=r"has 2 \(.*patch_encoder.model.*build the model from our configs"):
        to_test_time_registers(model, register_neurons=NEURONS)
    assert type(model.depth_pro.encoder.patch_encoder.model) is Dinov2Model  # unchanged
    ours = DepthProForDepthEstimation(
        DepthProConfig(**{**config.to_dict(), "patch_model_config": Dinov2TTRegConfig(**sub_config)})
    )
    assert type(ours.depth_pro.encoder.patch_encoder.model) is Dinov2TTRegModel  # `AutoModel` builds ours


# ---- classifiers and whole CLIP / SigLIP models ------------------------------------------------------------------


# our class, the parent's config, the parent's tower, tokens before the patches, the parent's pooling of the tokens
CLASSIFIERS = {
    "dinov2": (
        Dinov2TTRegForImageClassification,
        lambda: Dinov2Config(**DINOV2, num_labels=3),
        "dinov2",
        lambda tokens: torch.cat((tokens[:, 0], tokens[:, 1:].mean(1)), dim=1),
    ),
    "clip": (
        CLIPTTRegForImageClassification,
        lambda: CLIPConfig(vision_config=VISION, text_config=TEXT, num_labels=3),
        "vision_model",
        lambda tokens: tokens[:, 1:].mean(1),
    ),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_heads_pool_the_patches_without_the_registers(name, pixels):
    model_class, parent_config, tower_path, pooling = CLASSIFIERS[name]
    model = model_class(parent_config())
    vision_tower_with_registers(model).set_register_neurons(NEURONS)
    parent = parent_class(model_class)(parent_config()).eval()
    parent.load_state_dict(model.state_dict())
    labels = torch.tensor([0, 2])
    outputs = model.eval()(pixels, labels=labels)
    with torch.no_grad(), _hooked_parent(parent.get_submodule(tower_path)):
        tokens = parent.get_submodule(tower_path)(pixels).last_hidden_state[:, :-1]
    torch.testing.assert_close(outputs.logits, parent.classifier(pooling(tokens)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.loss, torch.nn.functional.cross_entropy(outputs.logits, labels))


def test_a_classifier_loads_a_parent_checkpoint_with_a_new_head_and_the_index(tmp_path):
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**DINOV2)).save_pretrained(tmp_path)
    model = Dinov2TTRegForImageClassification.from_pretrained(tmp_path, register_neurons=NEURONS, num_labels=5)
    assert type(model.dinov2) is Dinov2TTRegModel and model.classifier.out_features == 5
    assert model.dinov2.config is model.config and model.config.register_neurons == {"1": [3, 40], "2": [7]}
    backbone = Dinov2TTRegBackbone.from_pretrained(tmp_path, register_neurons=NEURONS, out_indices=[1, 3])
    assert backbone.out_features == ["stage1", "stage3"]
    with pytest.raises(TypeError, match="'num_lables'; did you mean 'num_labels'"):
        Dinov2TTRegForImageClassification.from_pretrained(tmp_path, register_neurons=NEURONS, num_lables=5)
    with pytest.raises(TypeError, match="'out_indice'; did you mean 'out_indices'"):
        Dinov2TTRegBackbone.from_pretrained(tmp_path, register_neurons=NEURONS, out_indice=[1])


@pytest.mark.parametrize("name", LOADED)
def test_to_test_time_registers_upgrades_a_loaded_model_in_place_and_it_reloads_with_registers(name, pixels, tmp_path):
    build, output, auto_class, reloaded_class = LOADED[name]
    torch.manual_seed(0)
    model = build().eval()
    inputs = {"pixel_values": pixels}
    if output == "logits_per_image":
        inputs["input_ids"] = torch.tensor([[4, 5, 6, 2], [7, 8, 9, 2]])
    parent = copy.deepcopy(model)
    assert to_test_time_registers(model, register_neurons=NEURONS) is model
    assert type(model) is reloaded_class  # ours in place: its save_pretrained writes the remote code
    tower = vision_tower_with_registers(model)
    parent_tower = next(module for module in parent.modules() if type(module) is parent_class(type(tower)))
    with torch.no_grad():
        edited = getattr(model(**inputs), output)
        if output == "logits_per_image":  # CLS / MAP pooling: the reference edit on the parent gives the same logits
            with _hooked_parent(parent_tower, num_prefix=int("clip" in name)):
                torch.testing.assert_close(edited, getattr(parent(**inputs), output), atol=1e-5, rtol=1e-5)
        assert not torch.equal(edited, getattr(parent(**inputs), output))
    model.save_pretrained(tmp_path)
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is reloaded_class
    assert vision_tower_with_registers(reloaded).config.register_neurons == {"1": [3, 40], "2": [7]}
    with torch.no_grad():
        assert torch.equal(getattr(reloaded(**inputs), output), edited)


def test_a_whole_clip_model_returns_the_towers_registers_and_saves_them(pixels, tmp_path):
    model = CLIPTTRegModel(CLIPConfig(vision_config={**VISION, "register_neurons": NEURONS}, text_config=TEXT))
    outputs = model.eval()(pixel_values=pixels, input_ids=torch.tensor([[4, 5, 2]]))
    assert outputs.vision_model_output.test_time_registers.shape == (2, 1, 32)
    model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is CLIPTTRegModel


# ---- pipelines ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(50, 60, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer of the prompts below: each label its own id, the prompt ending in id 2, CLIP's pooled
    token (its argmax) is the label."""
    words = ["[PAD]", "[UNK]", ".", "this", "is", "a", "photo", "of", "cat", "dog", "car"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def _pair(parent, ours_class):
    """``parent`` and ``ours_class`` on its weights, edit off, and the same with the edit on."""
    off = ours_class(copy.deepcopy(parent.config)).eval()
    off.load_state_dict(parent.state_dict())
    on = copy.deepcopy(off)
    vision_tower_with_registers(on).set_register_neurons(NEURONS)
    return off, on


def _processor(side):
    return BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


PIPELINES = {
    "image-feature-extraction": (
        lambda: Dinov2Model(Dinov2Config(**DINOV2)),
        Dinov2TTRegModel,
        dict(image_processor=_processor(42)),
        {},
    ),
    "image-classification": (
        lambda: Dinov2ForImageClassification(Dinov2Config(**DINOV2, num_labels=3)),
        Dinov2TTRegForImageClassification,
        dict(image_processor=_processor(42)),
        {},
    ),
    "zero-shot-image-classification": (
        lambda: tiny_clip(CLIPModel),
        CLIPTTRegModel,
        dict(image_processor=CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})),
        dict(candidate_labels=["cat", "dog", "car"]),
    ),
    "zero-shot-image-classification-siglip": (
        lambda: SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)),
        SiglipTTRegModel,
        dict(image_processor=SiglipImageProcessor(size={"height": 42, "width": 42})),
        dict(candidate_labels=["cat", "dog"]),
    ),
    "depth-estimation": (
        lambda: DepthAnythingForDepthEstimation(
            DepthAnythingConfig(
                backbone_config=tiny_backbone_config(False, **BACKBONE_HOSTS["depth_anything"][2]), **DEPTH_ANYTHING
            )
        ),
        None,  # Depth Anything with our backbone: `to_test_time_registers`
        dict(image_processor=DPTImageProcessor(size={"height": 42, "width": 42}, ensure_multiple_of=14)),
        {},
    ),
}


def _comparable(result):
    if isinstance(result, dict):
        return {key: _comparable(value) for key, value in result.items()}
    if isinstance(result, list):
        return [_comparable(value) for value in result]
    if isinstance(result, Image.Image):
        return np.asarray(result).tolist()
    return result.tolist() if isinstance(result, torch.Tensor) else result


@pytest.mark.parametrize("task", PIPELINES)
def test_pipelines_run_our_models_and_give_the_parents_answer_with_the_edit_off(task, image, tokenizer):
    build, ours_class, components, call = PIPELINES[task]
    torch.manual_seed(0)
    parent = build().eval()
    if ours_class is None:
        off = to_test_time_registers(copy.deepcopy(parent), register_neurons={})
        on = to_test_time_registers(copy.deepcopy(parent), register_neurons=NEURONS)
    else:
        off, on = _pair(parent, ours_class)
    name = task.removesuffix("-siglip")
    if name.startswith("zero-shot"):
        components = {**components, "tokenizer": tokenizer}
    results = [_comparable(pipeline(name, model=model, **components)(image, **call)) for model in (parent, off, on)]
    assert results[1] == results[0]
    assert results[2] != results[0]
    assert np.shape(results[2]) == np.shape(results[0])
    if name == "depth-estimation":
        assert np.shape(results[2]["predicted_depth"]) == (50, 60)  # resized to the image, as the parent's
