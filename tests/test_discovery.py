"""Register-neuron discovery: recovers the planted neurons, says "no outliers" when there are none, scales out."""

import os
import subprocess
import sys

import pytest
import torch

from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel, RegisterNeuronIndex, RegisterNeuronIndexError
from ttreg_hf.analysis import patch_norms, run_with_cache
from ttreg_hf.discovery import check_index_matches, find_register_neurons
from ttreg_hf.images import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageFolder, normalize
from ttreg_hf.planted import PLANTED_LAYER, build_planted_model, planted_index, textured_images


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


def test_scores_equal_an_in_memory_computation_from_every_activation():
    model, images = build_planted_model(num_test_time_registers=0), planted_images(12)
    result = find_register_neurons(model, images, threshold=40.0, top_k=6, batch_size=5, eval_images=4)
    _, cache = run_with_cache(model, images, mlp="all", blocks=[-1])
    outliers = patch_norms(cache.block_outputs[5], cache.layout) > 40.0
    images_with_outliers = outliers.any(dim=-1)
    scores = torch.stack([
        torch.stack([cache.layout.patches(cache.mlp_activations[layer])[i][outliers[i]].abs().mean(dim=0)
                     for i in images_with_outliers.nonzero().flatten()]).mean(dim=0)
        for layer in range(6)
    ])
    expected = [(i // 384, i % 384, float(scores.flatten()[i])) for i in scores.flatten().topk(8).indices]
    assert [(layer, neuron) for layer, neuron, _ in result.ranked] == [(layer, neuron) for layer, neuron, _ in expected]
    assert [score for *_, score in result.ranked] == pytest.approx([score for *_, score in expected], rel=1e-5)
    assert result.num_outlier_tokens == int(outliers.sum()) and result.num_images_with_outliers == int(images_with_outliers.sum())
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
    config = Dinov2TTRegConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=14, image_size=112)
    result = find_register_neurons(Dinov2TTRegModel(config).eval(), torch.randn(6, 3, 112, 112))
    assert not result.found and result.index is None
    assert result.max_norm < result.threshold
    assert "No outliers found in 6 images" in result.summary()


def test_real_vits14_is_a_negative_control(shared_dir):
    from ttreg_hf.hub import load_tt_model

    weights = shared_dir / "weights" / "dinov2_vits14_imgfocus.safetensors"
    model = load_tt_model("dinov2_vits14", weights=weights, num_test_time_registers=0)
    images = ImageFolder(shared_dir / "images", 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
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
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ttreg_hf.cli", "find-neurons", "planted", str(folder), "--out", str(out), "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=240)
    two = RegisterNeuronIndex.load(out)
    model = build_planted_model(num_test_time_registers=0)
    one = find_register_neurons(model, ImageFolder(folder, 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), batch_size=8).index
    assert two.neurons == one.neurons == planted_index()
    assert [score for *_, score in two.details["scores"]] == pytest.approx([score for *_, score in one.details["scores"]])
    assert two.details["num_outlier_tokens"] == one.details["num_outlier_tokens"]
    assert two.details["threshold"] == pytest.approx(one.details["threshold"])
