"""`ttreg evaluate`: each number against a plain computation on constructed data, and end to end on the planted
model with generated labelled images."""

import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import BatchEncoding, CLIPConfig

from ttreg_cli import main
from ttreg_hf import CLIPTTRegModel
from ttreg_hf.analysis import observe, run_with_cache, summarize_layers, with_register_neurons
from ttreg_hf.evaluation import LAYER_MEASURES, EvaluationResult, evaluate, paired_bootstrap
from ttreg_hf.evaluation.boxes import box_in_image, patch_centers, read_boxes
from ttreg_hf.evaluation.evaluate import _forward, _layer_measures, _patch_labels
from ttreg_hf.evaluation.statistics import (
    box_iou,
    confusion_matrix,
    corloc_hit,
    knn_predict,
    linear_probe,
    lost_box,
    mean_iou,
    resampled_mean_iou,
)
from ttreg_hf.images import open_rgb, statistics_preprocessor
from ttreg_hf.modeling.open_clip import to_test_time_registers as open_clip_tt
from ttreg_hf.planted import build_planted_model, planted_index, planted_pixels, planted_preprocessor, textured_images

from family_models import LAYER, NEURONS, TINY, analysis_inputs, plant

# ---- the statistics, against plain computations ------------------------------------------------------------------


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory():
    generator = torch.Generator().manual_seed(1)
    off = torch.randn(2000, generator=generator) * 2.0 + 5.0
    result = paired_bootstrap(off, off + 0.25, num_resamples=1000, seed=3)
    standard_error = float(off.std()) / math.sqrt(len(off))
    low, high = result.off_interval
    assert result.off == pytest.approx(float(off.double().mean()))
    assert (high - low) / 2 == pytest.approx(1.96 * standard_error, rel=0.1)
    assert low < 5.0 < high
    # paired: every image moves by 0.25, so every resample's difference is 0.25 (unpaired draws would scatter)
    assert result.difference_interval == pytest.approx((0.25, 0.25), abs=1e-6)
    assert result.significant
    assert paired_bootstrap(off, off + 0.25, num_resamples=1000, seed=3) == result  # deterministic for a seed
    assert paired_bootstrap(off, off + 0.25, num_resamples=1000, seed=4).off_interval != result.off_interval


def test_bootstrap_refuses_unpaired_values():
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(torch.zeros(3), torch.zeros(4))


def test_knn_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    train, labels = torch.randn(60, 8, generator=generator), torch.randint(0, 4, (60,), generator=generator)
    queries = torch.randn(25, 8, generator=generator)
    expected = []
    for query in queries:
        similarities = [float(query @ row / (query.norm() * row.norm())) for row in train]
        nearest = sorted(range(len(train)), key=lambda i: -similarities[i])[:7]
        votes = [0.0] * 4
        for i in nearest:
            votes[int(labels[i])] += math.exp(similarities[i] / 0.07)
        expected.append(max(range(4), key=votes.__getitem__))
    assert knn_predict(train, labels, queries, 4, k=7, chunk=10).tolist() == expected


def test_linear_probe_finds_the_regularized_optimum():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(80, 5, generator=generator) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0])
    labels = (features @ torch.randn(5, 3, generator=generator)).argmax(dim=-1)
    decay = 0.05
    predict = linear_probe(features, labels, 3, weight_decay=decay)
    # the same objective by plain gradient descent in numpy, on standardized features (strongly convex: one optimum)
    x = features.double().numpy()
    mean, std = x.mean(0), x.std(0)
    x = (x - mean) / std
    weight, bias, onehot = np.zeros((5, 3)), np.zeros(3), np.eye(3)[labels.numpy()]
    for _ in range(2000):
        logits = x @ weight + bias
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        error = (probabilities / probabilities.sum(1, keepdims=True) - onehot) / len(x)
        weight -= 0.5 * (x.T @ error + decay * weight)
        bias -= 0.5 * error.sum(0)
    queries = torch.randn(300, 5, generator=generator) * 2
    expected = (((queries.double().numpy() - mean) / std) @ weight + bias).argmax(-1)
    assert predict(queries).tolist() == expected.tolist()
    assert (predict(features) == labels).float().mean() > 0.9


def test_box_iou_and_corloc_on_known_boxes():
    truth = torch.tensor([[0, 0, 10, 10], [20, 20, 40, 30]])
    assert box_iou(torch.tensor([[0, 0, 10, 5]]), truth).tolist() == [[0.5, 0.0]]
    assert box_iou(torch.tensor([[5, 0, 15, 10]]), truth)[0, 0] == pytest.approx(50 / 150)
    assert corloc_hit(torch.tensor([20, 20, 40, 25]), truth)  # IoU 0.5 with the second box
    assert not corloc_hit(torch.tensor([5, 0, 15, 10]), truth)


def test_mean_iou_of_a_known_confusion_matrix():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 255, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    confusion = confusion_matrix(predictions, labels, 4)
    assert confusion[:3, :3].tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert int(confusion.sum()) == 7  # the ignored pixel is left out; class 3 is absent everywhere
    # IoU = TP / (row + column - TP): class 0: 2 / (3 + 3 - 2), class 1: 1 / (2 + 2 - 1), class 2: 1 / (2 + 2 - 1)
    assert float(mean_iou(confusion)) == pytest.approx((2 / 4 + 1 / 3 + 1 / 3) / 3)
    per_image = torch.stack([confusion, torch.eye(4, dtype=torch.long) * 3])
    weights = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    resampled = resampled_mean_iou(per_image, weights)
    assert resampled[0] == pytest.approx(float(mean_iou(confusion)))
    assert resampled[1] == pytest.approx(float(mean_iou(2 * confusion + per_image[1])))


# ---- one forward's numbers, against the analysis tools -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """The planted model's matrices are too small to gain from threads (as `ttreg demo` knows)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    return build_planted_model(register_neurons=planted_index())


def test_layer_measures_match_summarize_layers(planted):
    pixels = planted_pixels(textured_images(3, seed=5))
    for neurons in ({}, None):
        with with_register_neurons(planted, neurons):
            forward = _forward(planted, {"pixel_values": pixels}, ["outliers"])
            _, cache = run_with_cache(planted, pixels, blocks="all", attentions="all")
        measures = _layer_measures(forward, torch.full((6,), 40.0)).mean(dim=0)
        for summary in summarize_layers(cache, threshold=40.0):
            by_name = dict(zip(LAYER_MEASURES, measures[summary.layer].tolist()))
            assert by_name["outlier_ratio"] * 256 == pytest.approx(summary.outliers_per_image, rel=1e-5)
            assert by_name["max_norm"] == pytest.approx(summary.max_norm, rel=1e-5)
            assert by_name["median_norm"] == pytest.approx(summary.median_norm, rel=1e-5)
            assert by_name["max_median_ratio"] == pytest.approx(summary.max_median_ratio, rel=1e-5)
            assert by_name["outlier_attention_share"] == pytest.approx(summary.cls_outlier_share, abs=1e-6)
            assert by_name["register_attention_share"] == pytest.approx(summary.cls_register_share or 0.0, abs=1e-6)
        attention = cache.layout.patches(cache.attentions[5].mean(1)[:, :1].transpose(1, 2))[:, :, 0].double()
        shares = attention / attention.sum(-1, keepdim=True)
        entropy = -(shares * shares.log()).sum(-1).mean()
        assert measures[5, list(LAYER_MEASURES).index("attention_entropy")] == pytest.approx(float(entropy), rel=1e-5)


def test_features_are_the_last_block_cls_and_patch_mean_without_registers(planted):
    pixels = planted_pixels(textured_images(2, seed=6))
    forward = _forward(planted, {"pixel_values": pixels})
    _, cache = run_with_cache(planted, pixels, blocks=[-1])
    tokens = cache.block_outputs[5]
    assert cache.layout.num_registers == 1
    torch.testing.assert_close(forward.features["cls"], tokens[:, 0])
    torch.testing.assert_close(forward.features["patch_mean"], tokens[:, 1:-1].mean(dim=1))  # 256 patches, no register


@pytest.mark.parametrize("family", sorted(TINY))
def test_the_cls_rows_are_those_of_the_full_attention_maps(family):
    """`evaluate` reads only the first query row of each map (``attention_rows=1``): every family's reader gives the
    rows of its full maps, at every layer, with the padding of a padded batch (SigLIP2) masked as in the full ones."""
    model, inputs = plant(TINY[family]), analysis_inputs(family)
    model.set_register_neurons({LAYER: NEURONS})  # the edit on: the register draws attention
    layers, pixels = range(len(model.transformer_blocks)), inputs.pop("pixel_values")
    full, rows = {}, {}
    with torch.no_grad():
        with observe(model, attentions={layer: functools.partial(full.__setitem__, layer) for layer in layers}):
            model(pixels, **inputs)
        for count in (1, 3):
            keep = {layer: functools.partial(rows.__setitem__, (layer, count)) for layer in layers}
            with observe(model, attentions=keep, attention_rows=count):
                model(pixels, **inputs)
    for layer in layers:
        assert full[layer].shape[-1] == full[layer].shape[-2]  # every row
        for count in (1, 3):
            assert rows[layer, count].shape == (*full[layer].shape[:2], count, full[layer].shape[-1])
            torch.testing.assert_close(rows[layer, count], full[layer][:, :, :count], rtol=1e-5, atol=1e-7)


# ---- end to end ----------------------------------------------------------------------------------------------------


def save_images(images: torch.Tensor, folder) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def labelled_data(tmp_path_factory):
    """train/ and val/ of two classes: textures with uniform regions (where the planted neurons fire) and without."""
    root = tmp_path_factory.mktemp("data")
    for split, seed in (("train", 0), ("val", 1)):
        save_images(textured_images(4, seed=seed), root / split / "regions")
        save_images(textured_images(4, seed=seed + 10, uniform_regions=False), root / split / "plain")
    return root


def test_evaluate_end_to_end_on_the_planted_model(planted, labelled_data, tmp_path):
    result = evaluate(planted, planted_preprocessor(), labelled_data, num_resamples=200, batch_size=3, seed=1)
    last = result.layers[-1]
    # the paper's picture: the edit moves the outliers, and the attention they drew, onto the register
    assert last["outlier_ratio"].off > 0.01 and last["outlier_ratio"].on == 0
    assert last["outlier_ratio"].difference_interval[1] < 0
    share = last["outlier_attention_share"]  # half the images have no uniform region, so no outlier
    assert share.off > 0.4 and share.on < 0.01 and share.difference_interval[1] < -0.2
    assert last["register_attention_share"].on > 0.5 and last["attention_entropy"].significant
    assert all(layer["outlier_ratio"].off == 0 for layer in result.layers[:3])  # before the planted layer
    assert sorted(result.tasks) == sorted(f"{t}_accuracy/{f}" for t in ("knn", "linear") for f in ("cls", "patch_mean"))
    assert all(0 <= c.off <= 1 and 0 <= c.on <= 1 for c in result.tasks.values())
    data = json.loads(result.save(tmp_path / "result.json").read_text())
    assert data["format"] == "ttreg-evaluate/1" and data["data"]["num_images"] == 8
    assert data["register_neurons"] == {"3": [37, 101, 222, 300]} and len(data["data"]["fingerprint"]) == 16
    assert EvaluationResult.from_json(data) == result
    # batched and streamed: another batch size gives the same numbers; the same seed the same JSON
    again = evaluate(planted, planted_preprocessor(), labelled_data, num_resamples=200, batch_size=8, seed=1)
    again = again.to_json()
    assert again["settings"].pop("batch_size") == 8 and data["settings"].pop("batch_size") == 3
    assert _close(again, data)


def _close(actual, expected) -> bool:
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(_close(actual[k], expected[k]) for k in expected)
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(_close(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, float):
        return math.isclose(actual, expected, rel_tol=1e-4, abs_tol=1e-6)
    return actual == expected


def test_cli_writes_the_table_json_and_figure(labelled_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["evaluate", "planted", str(labelled_data / "val"), "--out-dir", str(out), "--resamples", "50"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "outlier_ratio (layer 5)" in printed and "knn" not in printed  # no split given: outliers only
    assert json.loads((out / "evaluation.json").read_text())["settings"]["tasks"] == ["outliers"]
    assert (out / "evaluation.png").stat().st_size > 20_000
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--tasks", "knn"]) == 2
    assert "needs a classification split" in capsys.readouterr().err


def test_two_processes_measure_what_one_does(labelled_data, tmp_path):
    """`ttreg evaluate` under torchrun with 2 processes (uneven shares of 8 val and 8 train images, batches of 3):
    each process's per-image numbers, summed across processes, give the one-process JSON."""
    argv = ["evaluate", "planted", str(labelled_data), "--resamples", "50", "--batch-size", "3", "--no-figure"]
    argv += ["--calibration-images", "5"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "ttreg_cli", *argv, "--out-dir", str(tmp_path / "two")], check=True, env=env, timeout=600)
    assert main([*argv, "--out-dir", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / n / "evaluation.json").read_text()) for n in ("one", "two"))
    assert two["settings"].pop("world_size") == 2 and one["settings"].pop("world_size") == 1
    assert _close(two, one) and two["layers"][-1]["outlier_ratio"]["off"] > 0


SIZE = 96  # the tiny dual encoders' image size (tests/family_models.py)


# ---- zero-shot, against the models' own logits ---------------------------------------------------------------------


END = 98  # the fake tokenizer's end token: the highest id, where CLIP and open_clip pool the text


def fake_tokenizer(prompts, padding=None, truncation=None, return_tensors=None):
    """Token ids of the prompts' characters, then `END`, padded with 0 to 16: offline, no vocabulary needed."""
    ids = torch.zeros(len(prompts), 16, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        codes = [3 + ord(c) % 90 for c in prompt][:15] + [END]
        ids[row, : len(codes)] = torch.tensor(codes)
    return ids if padding is None else BatchEncoding({"input_ids": ids})


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    for i, name in enumerate(("red_fox", "cat", "dog")):  # unequal: a prompt matched to the wrong class shows
        save_images(textured_images(1 + 2 * i, seed=20 + i, size=SIZE), root / name)
    return root


def clip_whole_model():
    from family_models import HF, MLP, TEXT

    vision = {**HF, "intermediate_size": MLP, "register_neurons": {2: [21, 60]}}
    text = {**TEXT, "eos_token_id": END, "bos_token_id": 1, "pad_token_id": 0}
    return CLIPTTRegModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()


def open_clip_whole_model():
    from family_models import DEPTH, HEADS, MLP, PATCH, WIDTH

    vision = open_clip.CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, mlp_ratio=MLP / WIDTH)
    vision.image_size, vision.patch_size = SIZE, PATCH
    text = open_clip.CLIPTextCfg(context_length=16, vocab_size=99, width=32, heads=2, layers=1)
    model = open_clip.CLIP(16, vision, text).eval()
    return open_clip_tt(model, {2: [21, 60]}, num_test_time_registers=1)


@pytest.mark.parametrize("build", [clip_whole_model, open_clip_whole_model])
def test_zero_shot_accuracy_is_the_models_own_logits(build, class_folders):
    model = build()
    preprocessor = statistics_preprocessor(SIZE, (0.5,) * 3, (0.5,) * 3, "test")
    result = evaluate(model, preprocessor, class_folders, tokenizer=fake_tokenizer, num_resamples=20)
    assert result.info["settings"]["tasks"] == ["outliers", "zero-shot"]
    assert result.info["data"]["classes"] == ["cat", "dog", "red_fox"]  # sorted folder names
    ids = fake_tokenizer(["a photo of a cat.", "a photo of a dog.", "a photo of a red fox."])
    assert len(set(map(tuple, ids.tolist()))) == 3
    paths = sorted(class_folders.rglob("*.png"))
    labels = torch.tensor([("cat", "dog", "red_fox").index(path.parent.name) for path in paths])
    pixels = preprocessor([open_rgb(path) for path in paths])["pixel_values"]
    comparison = result.tasks["zero_shot_accuracy"]
    tower = model.visual if hasattr(model, "visual") else model.vision_model
    for neurons, accuracy in (({}, comparison.off), (None, comparison.on)):
        with torch.no_grad(), with_register_neurons(tower, neurons):
            logits = model(pixel_values=pixels, input_ids=ids) if hasattr(model, "vision_model") else None
            if logits is None:
                image, text = model(pixels, ids)[:2]
                logits = image @ text.T
            else:
                logits = logits.logits_per_image
        assert accuracy == pytest.approx(float((logits.argmax(-1) == labels).double().mean()))


# ---- LOST ----------------------------------------------------------------------------------------------------------


def test_lost_finds_the_object_whose_keys_stand_apart():
    """Background keys along one direction, the object's against it: the seed is an object patch, the box is the
    object's 4-connected region (patches of object keys apart from it, or at a corner, are left out)."""
    generator = torch.Generator().manual_seed(0)
    rows, columns = 8, 10
    background, object_key = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 2.0, 0.0])
    keys = background.repeat(rows, columns, 1)
    keys[2:5, 3:7] = object_key
    keys[7, 9] = object_key  # detached: correlated with the object, not part of its region
    keys[5, 7] = object_key  # touches the object at a corner only: not 4-connected
    keys = keys + 0.05 * torch.randn(rows, columns, 3, generator=generator)
    assert lost_box(keys.view(-1, 3), rows, columns) == (3, 2, 7, 5)


def test_patch_centers_follow_the_resize_and_crop():
    preprocessor = statistics_preprocessor(224, (0.5,) * 3, (0.5,) * 3, "test")  # shorter side to 224, center crop
    centers = patch_centers(preprocessor, (448, 300), (16, 16))
    scale, left = 224 / 300, (round(448 * 224 / 300) - 224) // 2
    model_pixels = torch.arange(16) * 14 + 7.0  # the patch centers in the model's 224 x 224 input
    expected_x = (model_pixels + left + 0.5) / scale - 0.5
    expected_y = (model_pixels + 0.5) / scale - 0.5
    torch.testing.assert_close(centers[0, :, 0], expected_x, atol=3.0, rtol=0)  # 1/255 of the side: 1.8 px
    torch.testing.assert_close(centers[:, 0, 1], expected_y, atol=3.0, rtol=0)
    box = box_in_image((0, 0, 16, 16), centers, (448, 300))  # every patch: the crop, in the image
    torch.testing.assert_close(
        box, torch.tensor([left / scale, 0, (left + 224) / scale, 300.0]).double(), atol=3.0, rtol=0
    )


def test_boxes_read_from_voc_and_coco(tmp_path):
    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><name>cat</name><bndbox><xmin>1</xmin><ymin>11</ymin>"
        "<xmax>50</xmax><ymax>60</ymax></bndbox></object></annotation>"
    )
    assert read_boxes(voc)["a"].tolist() == [[0.0, 10.0, 50.0, 60.0]]  # 1-based inclusive -> 0-based exclusive
    coco = tmp_path / "coco.json"
    images = [{"id": 7, "file_name": "val/b.jpg"}]
    annotations = [
        {"image_id": 7, "bbox": [5, 6, 10, 20], "iscrowd": 0},
        {"image_id": 7, "bbox": [0, 0, 99, 99], "iscrowd": 1},
    ]
    coco.write_text(json.dumps({"images": images, "annotations": annotations}))
    assert read_boxes(coco) == {"b": pytest.approx(torch.tensor([[5.0, 6.0, 15.0, 26.0]], dtype=torch.float64))}
    (voc / "bad.xml").write_text("<annotation><object><bndbox><xmin>x</xmin></bndbox></object></annotation>")
    with pytest.raises(ValueError, match="bad.xml"):
        read_boxes(voc)


def test_lost_corloc_end_to_end(planted, labelled_data, tmp_path):
    """Every val image boxed in its top-left quarter: the CorLoc, off and on, is the fraction of images whose LOST box
    hits it, recomputed here from the captured keys in the model's pixels (the 224 px images' own)."""
    val = labelled_data / "val"
    images = sorted(val.rglob("*.png"))
    coco = {"images": [], "annotations": []}
    for i, path in enumerate(images):
        coco["images"].append({"id": i, "file_name": path.name if i % 2 else f"x/{path.name}"})
        coco["annotations"].append({"image_id": i, "bbox": [0, 0, 112, 112]})
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(coco))
    result = evaluate(planted, planted_preprocessor(), labelled_data, boxes=boxes, num_resamples=50)
    assert sorted(result.tasks) == sorted(
        ["lost_corloc", *(f"{t}_accuracy/{f}" for t in ("knn", "linear") for f in ("cls", "patch_mean"))]
    )
    preprocessor = planted_preprocessor()
    for neurons, corloc in (({}, result.tasks["lost_corloc"].off), (None, result.tasks["lost_corloc"].on)):
        hits = []
        for path in images:
            with with_register_neurons(planted, neurons):
                _, cache = run_with_cache(planted, preprocessor([open_rgb(path)])["pixel_values"], keys=[-1])
            box = lost_box(cache.layout.patches(cache.keys[5])[0], 16, 16)
            hits.append(bool(box_iou(torch.tensor([box]) * 14.0, torch.tensor([[0.0, 0, 112, 112]])) >= 0.5))
        assert corloc == pytest.approx(sum(hits) / len(hits))


# ---- segmentation --------------------------------------------------------------------------------------------------


def test_patch_labels_read_the_mask_at_each_patch_center():
    mask = torch.arange(12).view(3, 4)
    centers = torch.tensor([[[0.2, 0.0], [3.4, 0.4]], [[1.0, 2.0], [2.6, 1.6]]])  # (x, y) of a 2 x 2 grid
    assert _patch_labels(mask, centers).tolist() == [0, 3, 9, 11]  # rounded to the nearest pixel


@pytest.fixture(scope="module")
def segmentation_data(tmp_path_factory):
    """train/ and val/ of textures (class 0) and of uniform images (class 1), whose masks say so at every pixel but a
    corner (255, ignored)."""
    root = tmp_path_factory.mktemp("segmentation")
    (root / "masks").mkdir()
    for split, seed in (("train", 0), ("val", 1)):
        textures = textured_images(3, seed=seed, uniform_regions=False)
        uniform = torch.rand(3, 3, 1, 1, generator=torch.Generator().manual_seed(seed)).expand(3, 3, 224, 224)
        for i, (image, label) in enumerate([(t, 0) for t in textures] + [(u, 1) for u in uniform]):
            mask = torch.full((224, 224), label, dtype=torch.uint8)
            mask[:50, :50] = 255
            Image.fromarray(mask.numpy()).save(root / "masks" / f"{split}{i}.png")
            (root / split).mkdir(exist_ok=True)
            Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(
                root / split / f"{split}{i}.png"
            )
    return root


def test_segmentation_miou_end_to_end(planted, segmentation_data):
    """With every patch of every training image, the mIoU is a probe on all of them: recomputed here from the
    tokens, with the labels at the patch centers (the 224 px images are the model's input)."""
    data, preprocessor = segmentation_data, planted_preprocessor()
    result = evaluate(planted, preprocessor, data, masks=data / "masks", patches_per_image=256, num_resamples=50)
    assert result.info["settings"]["tasks"] == ["outliers", "segmentation"]
    centers = torch.arange(16) * 14 + 7
    miou = result.tasks["segmentation_miou"]
    for neurons, value in (({}, miou.off), (None, miou.on)):
        tokens, labels = {}, {}
        for split in ("train", "val"):
            paths = sorted((data / split).glob("*.png"))
            with with_register_neurons(planted, neurons):
                _, cache = run_with_cache(planted, preprocessor([open_rgb(p) for p in paths])["pixel_values"])
            tokens[split] = cache.layout.patches(cache.block_outputs[5]).flatten(0, 1)
            masks = [torch.tensor(np.array(Image.open(data / "masks" / p.name))).long() for p in paths]
            labels[split] = torch.cat([mask[centers][:, centers].flatten() for mask in masks])
        kept = labels["train"] != 255
        predict = linear_probe(tokens["train"][kept], labels["train"][kept], 2)
        expected = mean_iou(confusion_matrix(predict(tokens["val"]), labels["val"], 2))
        assert value == pytest.approx(float(expected), abs=1e-3)
    (data / "masks" / "val0.png").unlink()
    with pytest.raises(FileNotFoundError, match="No mask for val0.png"):
        evaluate(planted, preprocessor, data, masks=data / "masks", tasks=["segmentation"])


def test_a_model_whose_edit_cannot_be_turned_on_is_refused(labelled_data):
    cases = (
        ({"register_neurons": {}}, "no register-neuron index"),
        ({"register_neurons": planted_index(), "num_test_time_registers": 0}, "without test-time registers"),
    )
    for settings, message in cases:
        model = build_planted_model(**settings)
        with pytest.raises(ValueError, match=message):
            evaluate(model, planted_preprocessor(), labelled_data)
