"""Generic planting: a register neuron planted in a tiny model of every family is what discovery finds, and attaching
it removes the outliers."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ttreg_hf import (
    Dinov2TTRegModel,
    DINOv3ViTTTRegConfig,
    DINOv3ViTTTRegModel,
    ViTTTRegConfig,
    ViTTTRegModel,
    find_register_neurons,
)
from ttreg_hf.analysis import patch_norms, run_with_cache
from ttreg_hf.planted import build_planted_model, plant_register_neurons, planting_sites, textured_images
from ttreg_hf.registry import family_of

from family_models import (
    DEPTH,
    HEADS,
    HF,
    LAYER,
    MLP,
    NEURONS,
    OFF,
    PATCH,
    PLANTABLE,
    SIZE,
    WIDTH,
    naflex,
    planted,
    tiny_images,
)
from reference_discovery import assert_same_as_reference, reference_discovery


def outlier_ratio(model, inputs, threshold: float) -> float:
    kwargs = dict(inputs) if isinstance(inputs, dict) else {"pixel_values": inputs}
    pixel_values = kwargs.pop("pixel_values")
    _, cache = run_with_cache(model, pixel_values, blocks=[-1], **kwargs)
    return float((patch_norms(cache.block_outputs[DEPTH - 1], cache.layout) > threshold).float().mean())


def assert_recovered(model, discovery_images, held_out) -> None:
    """Discovery with its defaults finds the planted neurons and k, as the algorithm as it was does with its own
    (`reference_discovery`, whose k search ran every k it tried over 32 images), and attaching them removes the
    outliers of held-out images."""
    result = find_register_neurons(model, discovery_images)
    assert result.found, result.summary()
    assert_same_as_reference(result, reference_discovery(model, discovery_images, eval_images=32), False)
    assert result.eval_outlier_ratio[0] > 0.005 and result.eval_outlier_ratio[1] == 0
    assert {layer: set(ids) for layer, ids in result.index.neurons.items()} == {LAYER: set(NEURONS)}, result.summary()
    before = outlier_ratio(model, held_out, result.threshold)
    model.set_register_neurons(result.index)
    after = outlier_ratio(model, held_out, result.threshold)
    assert before > 0.005 and after == 0, (before, after)


@pytest.mark.parametrize("family", PLANTABLE)
def test_planted_neurons_are_found_and_their_edit_removes_the_outliers(family):
    assert_recovered(planted(family), list(tiny_images(32, seed=0)), tiny_images(16, seed=1))


def test_siglip2_naflex_inputs_go_to_discovery_as_keyword_inputs():
    model = planted("siglip2")
    held_out = naflex(tiny_images(16, seed=1))
    batch = {key: torch.stack([image[key] for image in held_out]) for key in held_out[0]}
    assert_recovered(model, naflex(tiny_images(32, seed=0)), batch)


@pytest.mark.parametrize("family", [*PLANTABLE, "siglip2-naflex"])
def test_discovery_refuses_integer_images_for_every_family(family):
    """0-255 images are refused before any forward, with the TypeError the models raise (timm's own forward fails
    on the dtype mismatch with another error)."""
    model = planted("siglip2") if family == "siglip2-naflex" else PLANTABLE[family]().eval()
    pixels = (textured_images(2, size=SIZE) * 255).round().to(torch.uint8)
    inputs = [{**image, "pixel_values": image["pixel_values"].to(torch.uint8)} for image in naflex(pixels.float())]
    with pytest.raises(TypeError, match="pixel_values must be a floating-point tensor of normalized images"):
        find_register_neurons(model, inputs if family == "siglip2-naflex" else pixels)


CROPS = [(96, 96), (72, 96), (60, 72), (48, 48)]  # 64, 48, 30 and 16 patches of 12 px


def test_a_padded_naflex_batch_gives_what_each_image_gives_alone():
    """Images of four sizes padded to 64 patches, in batches of 8, against each image alone (batch 1, no padding):
    padding is no patch in any statistic (norms, outliers, scores, the automatic threshold, the ratios)."""
    model = planted("siglip2")
    crops = [image[:, : CROPS[i % 4][0], : CROPS[i % 4][1]] for i, image in enumerate(tiny_images(32, seed=0))]
    padded = find_register_neurons(model, naflex(crops, max_patches=64), batch_size=8, calibration_images=12)
    alone = find_register_neurons(model, naflex(crops), batch_size=1, calibration_images=12)
    assert padded.num_patch_tokens == alone.num_patch_tokens == 8 * (64 + 48 + 30 + 16)
    for name in ("threshold", "num_outlier_tokens", "num_images_with_outliers", "top_k", "median_norm"):
        assert getattr(padded, name) == pytest.approx(getattr(alone, name), rel=1e-6), name
    assert padded.index.neurons == alone.index.neurons and padded.eval_outlier_ratio == alone.eval_outlier_ratio
    assert [score for *_, score in padded.ranked] == pytest.approx([score for *_, score in alone.ranked], rel=1e-5)
    assert {layer: set(ids) for layer, ids in padded.index.neurons.items()} == {LAYER: set(NEURONS)}
    # one of the two neurons: outliers are left, and padding (uniform zero patches, where the planted neurons fire)
    # would be counted among them
    half = [
        find_register_neurons(model, inputs, batch_size=size, threshold=padded.threshold, top_k=1).eval_outlier_ratio
        for inputs, size in ((naflex(crops, max_patches=64), 8), (naflex(crops), 1))
    ]
    assert half[0] == pytest.approx(half[1]) and half[0][1] > 0


def add_a_family_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "add_a_family.py"
    spec = importlib.util.spec_from_file_location("add_a_family", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_users_own_vit_gets_planted_through_the_sites_its_family_declares():
    example = add_a_family_example()  # declares and registers its family
    torch.manual_seed(0)
    model = example.TinyViTTTReg(width=WIDTH, depth=DEPTH, heads=HEADS, patch=PATCH, image=SIZE).eval()
    assert family_of(model) is example.FAMILY
    plant_register_neurons(planting_sites(model), LAYER, NEURONS)
    assert_recovered(model, list(tiny_images(32, seed=0)), tiny_images(16, seed=1))


def test_a_model_of_no_family_has_no_planting_sites():
    with pytest.raises(TypeError, match="build a `PlantingSites`"):
        planting_sites(torch.nn.Linear(2, 2))


def test_build_planted_model_is_the_generic_planting_of_its_dinov2():
    model = build_planted_model(seed=3)
    torch.manual_seed(3)
    fresh = Dinov2TTRegModel(model.config).eval()
    plant_register_neurons(planting_sites(fresh), 3, (37, 101, 222, 300), seed=3, quiet_channels=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


@pytest.mark.parametrize(
    ("layer", "neurons", "message"),
    [
        (0, NEURONS, "planted layer must be one of 1-3"),
        (DEPTH, NEURONS, "planted layer must be one of 1-3"),
        (LAYER, (5, MLP), "distinct ids in 0-127"),
        (LAYER, (5, 5), "distinct ids in 0-127"),
        (LAYER, (), "distinct ids"),
    ],
)
def test_what_planting_cannot_do_is_one_clear_error(layer, neurons, message):
    sites = planting_sites(PLANTABLE["vit"]())
    with pytest.raises(ValueError, match=message):
        plant_register_neurons(sites, layer, neurons)


def test_a_narrow_model_or_a_projection_without_bias_is_refused():
    narrow_arch = {**HF, "hidden_size": 32, "num_attention_heads": 2}
    narrow = ViTTTRegModel(ViTTTRegConfig(**narrow_arch, intermediate_size=MLP, **OFF))
    with pytest.raises(ValueError, match="width of at least 48"):
        plant_register_neurons(planting_sites(narrow), LAYER, NEURONS)
    unbiased = DINOv3ViTTTRegModel(DINOv3ViTTTRegConfig(**HF, intermediate_size=MLP, mlp_bias=False, **OFF))
    with pytest.raises(ValueError, match="Block 2's MLP input projection has no bias"):
        plant_register_neurons(planting_sites(unbiased), LAYER, NEURONS)
    gated = PLANTABLE["dinov3-gated"]()
    gated.model.layer[LAYER].mlp.up_proj.bias = None
    with pytest.raises(ValueError, match="Block 2's gated MLP has an up projection without bias"):
        plant_register_neurons(planting_sites(gated), LAYER, NEURONS)


@pytest.mark.parametrize("family", ["clip", "siglip", "vit", "deit"])
def test_the_analysis_tools_read_each_familys_attention_as_the_model_computes_it(family):
    model = planted(family)
    model.set_attn_implementation("eager")
    with torch.no_grad():  # the norms apart: a reader that takes the wrong one shows
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    pixel_values = tiny_images(2, seed=0)
    _, cache = run_with_cache(model, pixel_values, attentions="all")
    with torch.no_grad():
        eager = model(pixel_values, output_attentions=True).attentions
    for layer in range(DEPTH):
        torch.testing.assert_close(cache.attentions[layer], eager[layer])
