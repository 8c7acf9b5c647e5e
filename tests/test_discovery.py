"""Register-neuron discovery: recovers the planted neurons, says "no outliers" when there are none, scales out; one
pass finds what the algorithm as it was (`reference_discovery`) finds."""

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel, RegisterNeuronIndex, discovery
from ttreg_hf.analysis.metrics import NormHistogram, robust_threshold
from ttreg_hf.discovery import find_register_neurons
from ttreg_hf.images import ImageFolder, normalize, statistics_preprocessor
from ttreg_hf.index import RegisterIndexMismatchWarning
from ttreg_hf.planted import PLANTED_LAYER, PLANTED_NEURONS, build_planted_model, planted_index, textured_images

from reference_discovery import assert_same_as_reference, reference_discovery
from support import ForwardCounter


def planted_images(num_images: int, seed: int = 0) -> torch.Tensor:
    return normalize(textured_images(num_images, seed=seed), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


@pytest.fixture(scope="module")
def planted_result():
    return find_register_neurons(build_planted_model(), planted_images(48), checkpoint="planted")


def test_recovers_exactly_the_planted_neurons(planted_result):
    assert planted_result.found
    assert planted_result.index.neurons == planted_index()  # precision and recall 1.0, k chosen automatically
    before, after = planted_result.eval_outlier_ratio
    assert before > 0.01 and after == 0


NEGATIVE_LAYER, NEGATIVE_NEURON = 4, 11


@torch.no_grad()
def with_a_negative_register_neuron(model: Dinov2TTRegModel) -> Dinov2TTRegModel:
    """``model`` with a neuron of layer 4 that is large and negative at the outliers and writes nothing.

    Layer 4's MLP is made linear (GELU is never below -0.17) and the neuron reads the outlier direction, negated.
    """
    outlier_direction = model.encoder.layer[PLANTED_LAYER].mlp.fc2.weight[:, PLANTED_NEURONS[0]]
    mlp = model.encoder.layer[NEGATIVE_LAYER].mlp
    mlp.activation_fn = nn.Identity()
    mlp.fc1.weight[NEGATIVE_NEURON] = -3.0 * outlier_direction / outlier_direction.norm()
    mlp.fc1.bias[NEGATIVE_NEURON] = 0.0
    mlp.fc2.weight[:, NEGATIVE_NEURON] = 0.0
    return model


@torch.no_grad()
def hooked_activations(model, images: torch.Tensor, detection_layer: int):
    """Plain forward hooks on the parent's modules: the detection block's output and every MLP's activations (the
    input of its output projection), all tokens."""
    outputs, activations = {}, {}
    layers = model.encoder.layer
    handles = [
        layers[detection_layer].register_forward_hook(
            lambda module, args, output: outputs.__setitem__(
                "tokens", output[0] if isinstance(output, tuple) else output
            )
        )
    ]
    handles += [
        layer.mlp.fc2.register_forward_pre_hook(lambda module, args, i=i: activations.__setitem__(i, args[0]))
        for i, layer in enumerate(layers)
    ]
    model(images)
    for handle in handles:
        handle.remove()
    return outputs["tokens"], activations


def test_scores_are_mean_absolute_activations_at_the_outliers():
    """Algorithm 1 by hand: a neuron's score is its mean |activation| over an image's outlier patches, averaged over
    the images with outliers. A neuron that is large and negative there scores high."""
    model = with_a_negative_register_neuron(build_planted_model(num_test_time_registers=0))
    images = planted_images(12)
    result = find_register_neurons(model, images, threshold=40.0, top_k=6, batch_size=5, eval_images=4)
    tokens, activations = hooked_activations(model, images, detection_layer=5)
    outliers = tokens[:, 1:].norm(dim=-1) > 40.0  # patch tokens: CLS first, no test-time registers
    images_with_outliers = outliers.any(dim=-1).nonzero().flatten()
    scores = torch.stack(
        [
            torch.stack([activations[layer][i, 1:][outliers[i]].abs().mean(dim=0) for i in images_with_outliers]).mean(
                dim=0
            )
            for layer in range(6)
        ]
    )
    negative = torch.cat(
        [activations[NEGATIVE_LAYER][i, 1:][outliers[i], NEGATIVE_NEURON] for i in images_with_outliers]
    )
    assert negative.max() < -10, "the planted neuron is large and negative at every outlier"
    top = scores.flatten().topk(8)
    expected = {(i // 384, i % 384): score for i, score in zip(top.indices.tolist(), top.values.tolist())}
    assert next(iter(expected)) == (NEGATIVE_LAYER, NEGATIVE_NEURON)
    ranked = {(layer, neuron): score for layer, neuron, score in result.ranked}
    assert ranked == pytest.approx(expected, rel=1e-5)  # the planted neurons tie: compared by name, not position
    assert list(ranked.values()) == sorted(ranked.values(), reverse=True)
    assert result.num_outlier_tokens == int(outliers.sum()) and result.num_images_with_outliers == len(
        images_with_outliers
    )
    evaluated = outliers[images_with_outliers][:4]
    assert result.eval_outlier_ratio[0] == pytest.approx(float(evaluated.float().mean()))


def test_automatic_threshold_from_a_calibration_sample(planted_result):
    result = find_register_neurons(build_planted_model(), planted_images(48), calibration_images=16, top_k=4)
    assert result.index.neurons == planted_index()
    assert result.threshold_rule.endswith("of 16 images") and "of 16" not in planted_result.threshold_rule
    assert result.threshold == pytest.approx(planted_result.threshold, rel=0.1)
    assert result.num_patch_tokens == planted_result.num_patch_tokens == 48 * 256  # the facts cover every image


def test_index_records_its_metadata_and_loads_into_the_model(planted_result, tmp_path):
    index = RegisterNeuronIndex.load(planted_result.index.save(tmp_path / "index.safetensors"))
    assert index.checkpoints == {"hub": "planted"} and index.image_size == 224
    details = index.details
    assert details["detection_layer"] == 5 and details["num_images"] == 48 and details["top_k"] == 4
    assert details["threshold"] == pytest.approx(planted_result.threshold)
    assert {"weights_fingerprint", "package_version", "threshold_rule", "scores"} <= set(details)
    model = build_planted_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fingerprint is this model's: no warning of other weights
        assert model.set_register_neurons(index).token_layout.num_registers == 1


def test_discovery_leaves_the_model_as_it_was(planted_result):
    model = build_planted_model(register_neurons={PLANTED_LAYER: [1]}, num_test_time_registers=2)
    find_register_neurons(model, planted_images(8), top_k=4)
    assert model.config.register_neuron_index == {PLANTED_LAYER: (1,)}
    assert model.token_layout.num_registers == 2


def test_summary_states_the_numbers(planted_result):
    summary = planted_result.summary()
    assert "layer 3: 37, 101, 222, 300" in summary and "0.00 % with the edit" in summary


def test_index_for_other_weights_warns(planted_result):
    with pytest.warns(RegisterIndexMismatchWarning, match="found on other weights"):
        build_planted_model(seed=1).set_register_neurons(planted_result.index)


def test_model_without_outliers_gets_no_outliers_found():
    config = Dinov2TTRegConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=14, image_size=112
    )
    result = find_register_neurons(Dinov2TTRegModel(config).eval(), torch.randn(6, 3, 112, 112))
    assert not result.found and result.index is None
    assert result.max_norm < result.threshold
    assert "No outliers found in 6 images" in result.summary()


def test_real_vits14_is_a_negative_control(shared_dir):
    from ttreg_hf.hub import load_tt_model

    weights = shared_dir / "weights" / "dinov2_vits14_imgfocus.safetensors"
    model = load_tt_model("dinov2_vits14", weights=weights, num_test_time_registers=0)
    images = ImageFolder(
        shared_dir / "images", statistics_preprocessor(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "ImageNet")
    )
    result = find_register_neurons(model, images)
    assert not result.found
    assert result.max_norm / result.median_norm < 2
    assert "No outliers found in 7 images" in result.summary()


def test_two_processes_find_the_same_index_as_one(tmp_path):
    """`ttreg find-neurons` under torchrun with 2 processes (25 images, 9 of them for the threshold: uneven shares),
    against one process: every recorded fact the same, the scores to float64 rounding (summed in another order)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(textured_images(25, seed=0)):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i:02d}.png")
    out = tmp_path / "index.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "ttreg_cli", "find-neurons", "planted", str(folder), "--out", str(out)]
    command += ["--batch-size", "4", "--calibration-images", "9"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
    two = RegisterNeuronIndex.load(out)
    model = build_planted_model(num_test_time_registers=0)
    images = ImageFolder(folder, statistics_preprocessor(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "ImageNet"))
    one = find_register_neurons(model, images, batch_size=4, calibration_images=9, checkpoint="planted").index
    assert two.neurons == one.neurons == planted_index()
    scores = [score for *_, score in two.details.pop("scores")]
    assert scores == pytest.approx([score for *_, score in one.details.pop("scores")], rel=1e-12)
    assert two.details == one.details  # threshold, counts, median and max norm, k, ratios, fingerprint
    assert one.details["threshold_rule"].endswith("of 9 images") and one.details["num_eval_images"] > 0


@pytest.mark.parametrize(
    "settings",
    [dict(calibration_images=16, eval_images=16), dict(threshold=40.0, top_k=6, eval_images=5)],
    ids=["automatic", "given"],
)
def test_one_pass_finds_what_the_algorithm_as_it_was_finds(settings):
    """Automatic threshold from 16 of the 48 images (their batches first, then the others), and everything given."""
    model, images = build_planted_model(), planted_images(48)
    result = find_register_neurons(model, images, batch_size=8, **settings)
    assert_same_as_reference(result, reference_discovery(model, images, batch_size=8, **settings))


def test_automatic_threshold_and_k_run_each_image_once_and_edit_only_evaluation_images():
    model, images = build_planted_model(), planted_images(48)
    with ForwardCounter(model) as forwards:
        result = find_register_neurons(model, images, calibration_images=16, batch_size=8)
    assert result.index.neurons == planted_index() and result.num_eval_images == 8  # 48 / 32, at least 8
    assert forwards.unedited == 48  # the calibration images' forward is their scoring forward
    # k = 4 (the guess: the largest drop of the ranked scores) on every evaluation image; k = 3 stops after one
    assert forwards.ks == [4, 3] and forwards.edited == 8 + 1
    assert [discovery.default_eval_images(n) for n in (1, 256, 500, 1024, 5000)] == [8, 8, 15, 32, 32]


@pytest.mark.parametrize(
    ("fraction", "again"),
    [(100.0, 16), (1e-9, 8)],
    ids=["bound-above-the-threshold", "no-room-for-the-tokens"],
)
def test_calibration_batches_are_scored_again_when_their_tokens_fall_short(monkeypatch, fraction, again):
    """A provisional bound above the settled threshold (every batch), or more tokens above it than half the
    calibration images hold (every batch after the second): those batches run again, and nothing changes."""
    model, images = build_planted_model(), planted_images(24)
    expected = find_register_neurons(model, images, calibration_images=16, batch_size=4, top_k=4, eval_images=0)
    monkeypatch.setattr(discovery, "CANDIDATE_FRACTION", fraction)
    with ForwardCounter(model) as forwards:
        result = find_register_neurons(model, images, calibration_images=16, batch_size=4, top_k=4, eval_images=0)
    assert forwards.unedited == 24 + again
    assert result.index.details == expected.index.details


def test_the_automatic_threshold_rule_by_hand():
    """max(median + 6 x 1.4826 x MAD, 3 x median) of the binned norms. A power of two sits on the lower edge of its
    bin (64 bins per octave), which the histogram reads at its centre: c = 2^(1/128) times the value."""
    c = 2 ** (1 / 128)
    spread = NormHistogram().add(torch.tensor([1.0, 1, 2, 2, 2, 4, 64]))
    # median 2c; deviations from it 0, 0, 0, c, c, 2c, 62c: MAD c; the robust spread wins over 3 x median
    assert (spread.median(), spread.mad()) == pytest.approx((2 * c, c), rel=1e-12)
    assert robust_threshold(spread.median(), spread.mad()) == pytest.approx(2 * c + 6 * 1.4826 * c, rel=1e-12)
    tight = NormHistogram().add(torch.tensor([4.0, 4, 4, 4, 8]))  # MAD 0: 3 x median wins
    assert robust_threshold(tight.median(), tight.mad()) == pytest.approx(3 * 4 * c, rel=1e-12)
    padded = NormHistogram().add(
        torch.tensor([[1.0, 1, 2, 2, 2, 4, 64, 1e4, 0]]), torch.tensor([[1] * 7 + [0, 0]]).bool()
    )
    assert (padded.total, float(padded.maximum), padded.threshold()) == (7, 64.0, spread.threshold())


def test_discovery_threshold_is_the_rule_of_the_calibration_images_norms():
    """The threshold discovery reports, against the rule applied by hand to the raw norms of the calibration images
    (the seeded sample of 8 of the 24), within the histogram's bin width (1.1 %)."""
    model, images = build_planted_model(num_test_time_registers=0), planted_images(24)
    result = find_register_neurons(model, images, calibration_images=8, batch_size=4, top_k=4, eval_images=0)
    calibration = sorted(torch.randperm(24, generator=torch.Generator().manual_seed(0))[:8].tolist())
    tokens, _ = hooked_activations(model, images[calibration], detection_layer=5)
    norms = tokens[:, 1:].norm(dim=-1).flatten().double()
    median = norms.median()
    mad = (norms - median).abs().median()
    assert result.threshold == pytest.approx(float(max(median + 6 * 1.4826 * mad, 3 * median)), rel=0.012)
    assert result.threshold_rule.endswith("of 8 images")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(detection_layer=6), "detection_layer=6 is out of range: the model has 6 layers (0 to 5, or -6 to -1"),
        (dict(detection_layer=-7), "detection_layer=-7 is out of range"),
        (dict(highest_layer=9), "highest_layer=9 is out of range"),
        (dict(detection_layer=2, highest_layer=-2), "highest_layer=-2 (layer 4) is after the detection layer 2"),
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(calibration_images=0), "calibration_images must be a positive integer, got 0"),
        (dict(num_images=0), "num_images must be a positive integer, got 0"),
        (dict(top_k=0), "top_k must be a positive integer, got 0"),
        (dict(top_k=6 * 384 + 1), "top_k=2305 is more than the 2304 neurons searched"),
        (dict(highest_layer=1, top_k=769), "top_k=769 is more than the 768 neurons searched"),
        (dict(eval_images=0), "eval_images must be an integer of at least 1 (the automatic top_k is chosen on them)"),
        (dict(eval_images=True, top_k=4), "eval_images must be an integer of at least 0, got True"),
        (dict(remaining_outliers=1.0), "remaining_outliers must be in [0, 1), got 1.0"),
        (dict(threshold=-1.0), "threshold must be a positive number, got -1.0"),
        (dict(threshold=float("nan")), "threshold must be a positive number, got nan"),
    ],
)
def test_settings_discovery_cannot_use_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        find_register_neurons(build_planted_model(), planted_images(2), **settings)
    with pytest.raises(ValueError, match="No images"):
        find_register_neurons(build_planted_model(), [])


@pytest.mark.parametrize("max_k", [1, 2, 7, 32])
def test_the_k_search_finds_the_smallest_enough_k_from_any_guess(max_k):
    for answer in range(1, max_k + 2):  # max_k + 1: no k is enough, and the search says max_k, as it always did
        for guess in range(0, max_k + 2):
            tried = []

            def enough(k, answer=answer, tried=tried):
                tried.append(k)
                return k >= answer

            assert discovery._smallest_k(enough, max_k, guess) == min(answer, max_k), (answer, guess)
            assert len(set(tried)) == len(tried) and all(1 <= k <= max_k for k in tried)
    tried = []
    discovery._smallest_k(lambda k: tried.append(k) or k >= 5, 32, guess=5)
    assert tried == [5, 4]  # a right guess costs two tries, one of them (not enough) stopped early


def test_same_seed_same_result_another_seed_another_sample():
    model, images = build_planted_model(), planted_images(40)
    runs = [
        find_register_neurons(model, images, num_images=30, calibration_images=12, batch_size=8, seed=seed)
        for seed in (3, 3, 4)
    ]
    assert runs[0].index.details == runs[1].index.details
    assert runs[0].index.neurons == runs[2].index.neurons == planted_index()
    assert runs[0].threshold != runs[2].threshold  # another calibration sample
