"""Capture, metrics and interventions, on the planted model and a small random DINOv2."""

import pytest
import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel
from ttreg_hf.analysis import (
    ablate_neurons,
    capture,
    patch_norms,
    rewrite_activations,
    run_with_cache,
    shift_outliers,
    summarize_layers,
    with_register_neurons,
)
from ttreg_hf.analysis.metrics import NormHistogram
from ttreg_hf.images import normalize
from ttreg_hf.planted import build_planted_model, planted_index, textured_images


@pytest.fixture(scope="module")
def planted():
    return build_planted_model()


@pytest.fixture(scope="module")
def pixel_values():
    return normalize(textured_images(4, seed=7), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_gives_tensors_and_leaves_no_hooks(planted, pixel_values):
    before = hook_count(planted)
    with capture(planted, mlp=[3], blocks="all", attentions=[-1]) as cache:
        planted(pixel_values)
    assert hook_count(planted) == before
    assert cache.mlp_activations[3].shape == (4, 257, 384)
    assert sorted(cache.block_outputs) == list(range(6)) and cache.block_outputs[5].shape == (4, 257, 96)
    assert cache.attentions[5].shape == (4, 4, 257, 257)
    torch.testing.assert_close(cache.attentions[5].sum(-1), torch.ones(4, 4, 257))


def test_capture_removes_hooks_after_an_error(planted):
    before = hook_count(planted)
    with pytest.raises(ValueError), capture(planted, blocks="all"):
        planted(torch.zeros(1, 3, 100, 100))
    assert hook_count(planted) == before


def test_recomputed_attention_equals_the_eager_attention():
    config = Dinov2TTRegConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56)
    config._attn_implementation = "eager"
    model = Dinov2TTRegModel(config).eval()
    pixel_values = torch.randn(2, 3, 56, 56)
    _, cache = run_with_cache(model, pixel_values, attentions="all")
    with torch.no_grad():
        eager = model(pixel_values, output_attentions=True).attentions
    for layer in range(2):
        torch.testing.assert_close(cache.attentions[layer], eager[layer])


def test_run_with_cache_returns_the_forwards_output_and_its_internals(planted, pixel_values):
    output, cache = run_with_cache(planted, pixel_values, mlp=[0])
    with torch.no_grad():
        expected = planted(pixel_values)
    assert torch.equal(output.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(planted.layernorm(cache.block_outputs[5]), expected.last_hidden_state)
    assert (
        cache.mlp_activations[0].shape == (len(pixel_values), 257, 384) and not cache.mlp_activations[0].requires_grad
    )


def test_run_with_cache_keeps_gradients_when_asked(planted, pixel_values):
    output, cache = run_with_cache(planted, pixel_values[:1], mlp=[2], blocks=[2], keep_grad=True)
    activations = cache.mlp_activations[2]
    assert activations.requires_grad and cache.block_outputs[2].requires_grad
    (gradient,) = torch.autograd.grad(output.last_hidden_state.pow(2).sum(), activations)
    assert gradient.shape == activations.shape and gradient.abs().sum() > 0


def test_rewrite_activations_is_a_public_intervention_point(planted, pixel_values):
    """A new intervention needs only `rewrite_activations`: doubling layer 0's activations changes the output,
    and nothing is left registered afterwards."""
    with torch.no_grad():
        before = planted(pixel_values).last_hidden_state
        with rewrite_activations(planted, {0: lambda activations: 2 * activations}):
            doubled = planted(pixel_values).last_hidden_state
        after = planted(pixel_values).last_hidden_state
    assert not torch.allclose(doubled, before) and torch.equal(after, before) and hook_count(planted) == 0


def test_layer_summaries_see_the_outliers_appear_at_the_planted_layer(planted, pixel_values):
    summaries = summarize_layers(run_with_cache(planted, pixel_values)[1])
    assert [s.max_median_ratio > 10 for s in summaries] == [False, False, False, True, True, True]


def test_shift_moves_the_outlier_and_the_attention_to_the_chosen_patch(planted, pixel_values):
    position = 5
    _, original = run_with_cache(planted, pixel_values, blocks=[-1])
    with_outliers = pixel_values[patch_norms(original.block_outputs[5], original.layout).amax(dim=-1) > 100]
    with shift_outliers(planted, planted_index(), position):
        _, cache = run_with_cache(planted, with_outliers, blocks=[-1], attentions=[-1])
    norms = patch_norms(cache.block_outputs[5], cache.layout)
    assert len(with_outliers) >= 2 and (norms.argmax(dim=-1) == position).all()
    assert (norms[:, position] > 10 * norms.median(dim=-1).values).all()
    assert summarize_layers(cache)[0].cls_top_patch_share > 0.5


def test_shift_refuses_a_model_with_its_edit_on(pixel_values):
    model = build_planted_model(register_neurons=planted_index())
    with pytest.raises(ValueError, match="edit off"), shift_outliers(model, planted_index(), 0):
        pass


def test_ablating_the_planted_neurons_removes_the_outliers(planted, pixel_values):
    with ablate_neurons(planted, planted_index()):
        summary = summarize_layers(run_with_cache(planted, pixel_values, blocks=[-1])[1])[0]
    assert summary.max_median_ratio < 2 and hook_count(planted) == 0


def test_with_register_neurons_restores_the_index(planted):
    with with_register_neurons(planted, planted_index(), num_test_time_registers=2):
        assert planted.token_layout.num_registers == 2
    assert planted.token_layout.num_registers == 0 and planted.config.num_test_time_registers == 1


def test_norm_histogram_matches_exact_statistics():
    norms = torch.randn(5000).abs() * 10 + 1
    histogram = NormHistogram()
    for chunk in norms.split(1000):
        histogram.add(chunk)
    median = norms.median()
    assert histogram.total == 5000 and float(histogram.maximum) == pytest.approx(float(norms.max()))
    assert histogram.median() == pytest.approx(float(median), rel=0.02)
    assert histogram.mad() == pytest.approx(float((norms - median).abs().median()), rel=0.05)
