"""Register-neuron discovery as it was before the one-pass rewrite (ttreg_hf 41b61b4), kept plain, for tests only.

One process, no streaming tricks: a norm-only forward over the calibration images for the automatic threshold, one
forward per image for the scores (every patch token weighted, zero off the outliers), and the k search by doubling and
bisection, each k tried with an edited forward over the evaluation images. Padding is not handled (as before): compare
padded batches with this reference run on each image alone.
"""

import functools
from collections.abc import Mapping

import pytest
import torch

from ttreg_hf.analysis import capture, patch_norms, with_register_neurons
from ttreg_hf.analysis.metrics import NormHistogram, robust_threshold


def _batches(images, indices, batch_size, model):
    parameter = next(model.parameters())
    for start in range(0, len(indices), batch_size):
        chosen = [images[i] for i in indices[start : start + batch_size]]
        if isinstance(chosen[0], Mapping):
            yield {
                key: torch.stack([image[key] for image in chosen]).to(
                    parameter.device, parameter.dtype if chosen[0][key].is_floating_point() else None
                )
                for key in chosen[0]
            }
        else:
            yield torch.stack(chosen).to(parameter.device, parameter.dtype)


def _forward(model, inputs):
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _random_subset(indices, size, seed):
    if size is None or size >= len(indices):
        return indices
    chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:size]
    return [indices[i] for i in sorted(chosen.tolist())]


def _norms(model, inputs, layer):
    with capture(model, blocks=[layer]) as cache:
        _forward(model, inputs)
    return patch_norms(cache.block_outputs[layer], cache.layout)


def _neurons_of(ranked):
    neurons = {}
    for layer, neuron, _ in ranked:
        neurons.setdefault(layer, []).append(neuron)
    return neurons


@torch.no_grad()
def reference_discovery(
    model,
    images,
    *,
    threshold=None,
    detection_layer=-1,
    highest_layer=None,
    top_k=None,
    max_top_k=32,
    remaining_outliers=0.01,
    num_images=None,
    calibration_images=64,
    eval_images=32,
    batch_size=16,
    seed=0,
) -> dict:
    """The facts the old `find_register_neurons` recorded, as a dict (``neurons`` ``None`` when no outliers)."""
    num_layers = len(model.transformer_blocks)
    detection = detection_layer % num_layers
    highest = detection if highest_layer is None else highest_layer % num_layers
    selected = _random_subset(list(range(len(images))), num_images, seed)
    width = model.config.mlp_width
    num_registers = max(model.config.num_test_time_registers, 1)
    with with_register_neurons(model, {}):
        if threshold is None:
            histogram = NormHistogram()
            for inputs in _batches(images, _random_subset(selected, calibration_images, seed), batch_size, model):
                histogram.add(_norms(model, inputs, detection))
            threshold = robust_threshold(histogram.median(), histogram.mad())
        histogram = NormHistogram()
        scores = torch.zeros(highest + 1, width, dtype=torch.float64)
        outliers_per_image = []
        for inputs in _batches(images, selected, batch_size, model):
            with capture(model, mlp=range(highest + 1), blocks=[detection]) as cache:
                _forward(model, inputs)
            norms = patch_norms(cache.block_outputs[detection], cache.layout)
            histogram.add(norms)
            outliers = norms > threshold
            counts = outliers.sum(dim=-1)
            weights = outliers / counts.clamp(min=1).unsqueeze(-1)
            for layer, activations in cache.mlp_activations.items():
                patches = cache.layout.patches(activations).abs().float()
                scores[layer] += torch.einsum("bp,bpn->n", weights, patches).double().cpu()
            outliers_per_image.append(counts.cpu())
        outliers_per_image = torch.cat(outliers_per_image).double()
        with_outliers = outliers_per_image.nonzero().flatten().tolist()
        facts = dict(
            threshold=threshold,
            num_outlier_tokens=int(outliers_per_image.sum()),
            num_patch_tokens=histogram.total,
            num_images_with_outliers=len(with_outliers),
            median_norm=histogram.median(),
            max_norm=float(histogram.maximum),
            neurons=None,
        )
        if not with_outliers:
            return facts
        scores /= len(with_outliers)
        order = scores.flatten().sort(descending=True, stable=True).indices[: max(max_top_k, top_k or 0)].tolist()
        ranked = [(i // width, i % width, float(scores.flatten()[i])) for i in order]
        evaluation = with_outliers[:eval_images]
        before = float(outliers_per_image[evaluation].sum()) / max(
            len(evaluation) * (histogram.total // len(selected)), 1
        )

        @functools.cache
        def ratio_with(k):
            if k == 0:
                return before
            model.set_register_neurons(_neurons_of(ranked[:k]), num_test_time_registers=num_registers)
            outliers = total = 0
            for inputs in _batches(images, [selected[i] for i in evaluation], batch_size, model):
                above = _norms(model, inputs, detection) > threshold
                outliers, total = outliers + int(above.sum()), total + above.numel()
            return outliers / max(total, 1)

        def enough(k):
            return ratio_with(k) <= remaining_outliers * before

        k = top_k
        if k is None:
            low, high = 0, 1
            while high < len(ranked) and not enough(high):
                low, high = high, min(2 * high, len(ranked))
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if enough(middle) else (middle, high)
            k = high
        return {
            **facts,
            "neurons": {layer: sorted(ids) for layer, ids in _neurons_of(ranked[:k]).items()},
            "top_k": k,
            "scores": ranked[:k],
            "eval_outlier_ratio": (before, ratio_with(k)),
        }


def assert_same_as_reference(result, reference: dict, same_evaluation: bool = True) -> None:
    """``result`` records what `reference_discovery` does: the same counts and neurons, the same threshold and k, the
    same ratios (where both evaluated the same images); scores to float rounding (float64 sums over the outliers here,
    float32 over every patch there)."""
    assert result.threshold == reference["threshold"]
    for name in ("num_outlier_tokens", "num_patch_tokens", "num_images_with_outliers"):
        assert getattr(result, name) == reference[name], name
    assert (result.median_norm, result.max_norm) == pytest.approx((reference["median_norm"], reference["max_norm"]))
    if reference["neurons"] is None:
        assert not result.found
        return
    assert {layer: sorted(ids) for layer, ids in result.index.neurons.items()} == reference["neurons"]
    assert result.top_k == reference["top_k"]
    if same_evaluation:
        assert result.eval_outlier_ratio == pytest.approx(reference["eval_outlier_ratio"], abs=1e-12)
    scores = {(layer, neuron): score for layer, neuron, score in result.ranked[: result.top_k]}
    assert scores == pytest.approx({(layer, neuron): score for layer, neuron, score in reference["scores"]}, rel=1e-5)
