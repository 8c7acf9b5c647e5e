"""The planted model shows the paper's mechanism, measured with the package's own metrics."""

import pytest
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ttreg_hf.analysis import run_with_cache, summarize_layers
from ttreg_hf.images import normalize
from ttreg_hf.planted import build_planted_model, planted_index, textured_images


@pytest.fixture(scope="module")
def pixel_values():
    return normalize(textured_images(16, seed=1), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def last_layer(model, pixel_values):
    _, cache = run_with_cache(model, pixel_values, blocks=[-1], attentions=[-1])
    return summarize_layers(cache)[0]


def test_outliers_and_attention_sink_without_the_edit(pixel_values):
    summary = last_layer(build_planted_model(), pixel_values)
    assert summary.max_median_ratio >= 10
    assert summary.outliers_per_image >= 1
    assert summary.cls_outlier_share >= 0.5


def test_the_test_time_register_takes_the_outlier_and_the_attention(pixel_values):
    summary = last_layer(build_planted_model(register_neurons=planted_index()), pixel_values)
    assert summary.max_median_ratio <= 2
    assert summary.outliers_per_image == 0
    assert summary.register_norm >= 10 * summary.median_norm
    assert summary.cls_register_share >= 0.5


def test_images_without_uniform_regions_have_no_outliers():
    images = normalize(textured_images(4, seed=3, uniform_regions=False), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert last_layer(build_planted_model(), images).max_median_ratio < 2


def test_construction_is_deterministic_for_a_seed():
    first, second, other = build_planted_model(seed=5), build_planted_model(seed=5), build_planted_model(seed=6)
    assert all((a == b).all() for a, b in zip(first.parameters(), second.parameters()))
    assert any((a != b).any() for a, b in zip(first.parameters(), other.parameters()))


def test_the_planted_model_is_a_registered_checkpoint_loaded_like_the_others(tmp_path):
    """`load_tt_model("planted")`, the torch.hub entry and the CLI's MODEL take the one path of every named
    checkpoint: its loader, with the planted neurons as its shipped index unless an index is given."""
    import torch

    from ttreg_cli import parse_model_spec
    from ttreg_hf import load_tt_model, register_checkpoint
    from ttreg_hf.errors import TTRegError
    from ttreg_hf.hub import checkpoint_preprocessor, entry_points
    from ttreg_hf.planted import PLANTED

    model = load_tt_model("planted")
    assert model.config.register_neuron_index == planted_index() and not model.training
    built = build_planted_model()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), built.state_dict().values(), strict=True))
    assert load_tt_model("planted", register_neurons={1: [2]}).config.register_neuron_index == {1: (2,)}
    assert load_tt_model("planted", num_test_time_registers=0).config.num_test_time_registers == 0
    assert parse_model_spec("planted").kind == "name" and "planted_tt_reg" in entry_points()
    assert checkpoint_preprocessor("planted", model, 112).mean == tuple(IMAGENET_DEFAULT_MEAN)
    with pytest.raises(TTRegError, match="takes no weights"):
        load_tt_model("planted", weights=tmp_path)
    with pytest.raises(TTRegError, match="names a checkpoint of a family"):
        register_checkpoint(PLANTED.__class__("dinov2_vits14", "", PLANTED.load))
