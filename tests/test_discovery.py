"""Register-neuron discovery: recovers the planted neurons, says "no outliers" when there are none, scales out."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel, RegisterNeuronIndex, RegisterNeuronIndexError
from ttreg_hf.discovery import check_index_matches, find_register_neurons
from ttreg_hf.images import ImageFolder, normalize, statistics_preprocessor
from ttreg_hf.planted import PLANTED_LAYER, PLANTED_NEURONS, build_planted_model, planted_index, textured_images


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
    check_index_matches(index, model)
    assert model.set_register_neurons(index).token_layout.num_registers == 1


def test_discovery_leaves_the_model_as_it_was(planted_result):
    model = build_planted_model(register_neurons={PLANTED_LAYER: [1]}, num_test_time_registers=2)
    find_register_neurons(model, planted_images(8), top_k=4)
    assert model.config.register_neuron_index == {PLANTED_LAYER: (1,)}
    assert model.token_layout.num_registers == 2


def test_summary_states_the_numbers(planted_result):
    summary = planted_result.summary()
    assert "layer 3: 37, 101, 222, 300" in summary and "0.00 % with the edit" in summary


def test_index_for_other_weights_is_refused(planted_result):
    with pytest.raises(RegisterNeuronIndexError, match="made for other weights"):
        check_index_matches(planted_result.index, build_planted_model(seed=1))


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
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(textured_images(24, seed=0)):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i:02d}.png")
    out = tmp_path / "index.safetensors"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ttreg_hf.cli",
        "find-neurons",
        "planted",
        str(folder),
        "--out",
        str(out),
        "--batch-size",
        "8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=240)
    two = RegisterNeuronIndex.load(out)
    model = build_planted_model(num_test_time_registers=0)
    one = find_register_neurons(
        model,
        ImageFolder(folder, statistics_preprocessor(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "ImageNet")),
        batch_size=8,
    ).index
    assert two.neurons == one.neurons == planted_index()
    assert [score for *_, score in two.details["scores"]] == pytest.approx(
        [score for *_, score in one.details["scores"]]
    )
    assert two.details["num_outlier_tokens"] == one.details["num_outlier_tokens"]
    assert two.details["threshold"] == pytest.approx(one.details["threshold"])
