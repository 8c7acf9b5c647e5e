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
