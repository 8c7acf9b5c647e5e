"""Find a checkpoint's register neurons (Algorithm 1 of "Vision Transformers Don't Need Trained Registers").

Outlier tokens are the patch tokens whose norm at a detection layer exceeds a threshold; every MLP neuron up to a
highest layer is scored by its mean |activation| at the outlier positions, over the images that have outliers; the
top k are the register neurons. Statistics are streamed (memory does not grow with the number of images) and summed
across processes under ``torchrun`` / ``accelerate launch``.
"""

import functools
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .analysis.capture import capture, resolve_layers
from .analysis.distributed import all_reduce, is_main_process, rank_and_world_size
from .analysis.interventions import with_register_neurons
from .analysis.metrics import MAD_FACTOR, MIN_NORM_RATIO, NormHistogram, patch_norms, robust_threshold
from .index import RegisterNeuronIndex, RegisterNeuronIndexError, weights_fingerprint
from .modeling.registers import TestTimeRegisterMixin

AUTOMATIC_THRESHOLD_RULE = f"automatic: max(median + {MAD_FACTOR:g} robust std, {MIN_NORM_RATIO:g} x median)"
Images = Sequence[torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]
Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class DiscoveryResult:
    """What discovery found, with the numbers behind it; ``index`` is `None` when the model has no outliers."""

    index: RegisterNeuronIndex | None
    num_images: int
    num_images_with_outliers: int
    num_outlier_tokens: int
    num_patch_tokens: int
    detection_layer: int
    highest_layer: int
    threshold: float
    threshold_rule: str
    median_norm: float
    max_norm: float
    ranked: list[tuple[int, int, float]] = field(default_factory=list)
    top_k: int = 0
    eval_outlier_ratio: tuple[float, float] | None = None

    @property
    def found(self) -> bool:
        return self.index is not None

    @property
    def outlier_ratio(self) -> float:
        return self.num_outlier_tokens / max(self.num_patch_tokens, 1)

    def summary(self) -> str:
        norms = (
            f"patch norms at layer {self.detection_layer}: median {self.median_norm:.4g}, max {self.max_norm:.4g} "
            f"(max/median {self.max_norm / self.median_norm:.3g}); threshold {self.threshold:.4g} ({self.threshold_rule})"
        )
        if not self.found:
            return (
                f"No outliers found in {self.num_images} images: no patch token exceeds the threshold.\n  {norms}\n"
                "  The model has no high-norm outlier tokens, so it has no register neurons to find; no index written."
            )
        before, after = self.eval_outlier_ratio
        neurons = "\n".join(
            f"    layer {layer}: {', '.join(map(str, ids))}" for layer, ids in self.index.neurons.items()
        )
        ranked = ", ".join(f"L{layer}/N{neuron} {score:.3g}" for layer, neuron, score in self.ranked)
        return (
            f"Register-neuron discovery on {self.num_images} images\n  {norms}\n"
            f"  outliers: {self.num_outlier_tokens} of {self.num_patch_tokens} patch tokens ({100 * self.outlier_ratio:.2f} %) "
            f"in {self.num_images_with_outliers} images\n"
            f"  register neurons (top {self.top_k} of layers 0-{self.highest_layer}):\n{neurons}\n"
            f"  best scores (mean |activation| at outliers): {ranked}\n"
            f"  outlier ratio on the evaluation images: {100 * before:.2f} % before, {100 * after:.2f} % with the edit"
        )


def check_index_matches(index: RegisterNeuronIndex, model: TestTimeRegisterMixin) -> None:
    """Raise unless ``index`` fits ``model``'s shape and, when it records one, its weights fingerprint."""
    index.check_fits(model.config.num_hidden_layers, model.config.mlp_width)
    made_for = index.details.get("weights_fingerprint")
    if made_for and made_for != weights_fingerprint(model):
        checkpoint = ", ".join(index.checkpoints.values()) or "another checkpoint"
        raise RegisterNeuronIndexError(
            f"This register-neuron index was made for other weights ({checkpoint}, fingerprint {made_for}; this model's "
            f"is {weights_fingerprint(model)}). Find the neurons of this checkpoint with `ttreg find-neurons`."
        )


def _batches(
    images: Images, indices: list[int], batch_size: int, model: torch.nn.Module, desc: str
) -> Iterator[Inputs]:
    parameter = next(model.parameters())
    starts = range(0, len(indices), batch_size)
    show_progress = is_main_process() and sys.stderr.isatty()  # no bars in logs and pipes
    for start in tqdm(starts, desc=desc, disable=not show_progress, leave=False):
        chosen = [images[i] for i in indices[start : start + batch_size]]
        if isinstance(chosen[0], Mapping):  # one image's keyword inputs: stacked key by key
            yield {key: _to_model(torch.stack([image[key] for image in chosen]), parameter) for key in chosen[0]}
        else:
            yield _to_model(torch.stack(chosen), parameter)


def _to_model(tensor: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the model's device; floating-point ones in its dtype (masks and shapes keep theirs)."""
    return tensor.to(parameter.device, parameter.dtype if tensor.is_floating_point() else tensor.dtype)


def _forward(model: torch.nn.Module, inputs: Inputs):
    """``model(pixel_values)``, or ``model(**inputs)`` for a dict of keyword inputs."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _detection_norms(model: TestTimeRegisterMixin, inputs: Inputs, layer: int) -> torch.Tensor:
    with capture(model, blocks=[layer]) as cache:
        _forward(model, inputs)
    return patch_norms(cache.block_outputs[layer], cache.layout)


@torch.no_grad()
def _norm_histogram(model, images: Images, indices: list[int], layer: int, batch_size: int) -> NormHistogram:
    histogram = NormHistogram(next(model.parameters()).device)
    for inputs in _batches(images, indices, batch_size, model, "patch norms"):
        histogram.add(_detection_norms(model, inputs, layer))
    return histogram.all_reduce()


@dataclass
class _Scan:
    """What one pass over the images sums: patch norms, outliers per image, and the neurons' scores."""

    histogram: NormHistogram
    outliers_per_image: torch.Tensor
    scores: torch.Tensor  # (highest + 1, mlp_width): per image, mean |activation| at its outliers, summed


@torch.no_grad()
def _scan(
    model, images: Images, indices: list[int], detection: int, highest: int, threshold: float, batch_size: int
) -> _Scan:
    """One forward per batch: the detection layer's norms give the outliers, the same forward's MLP activations
    (kept for one batch) are read at them."""
    device = next(model.parameters()).device
    histogram = NormHistogram(device)
    scores = torch.zeros(highest + 1, model.config.mlp_width, dtype=torch.float64, device=device)
    outliers_per_image = [torch.zeros(0, device=device, dtype=torch.long)]
    for inputs in _batches(images, indices, batch_size, model, "neuron scores"):
        with capture(model, mlp=range(highest + 1), blocks=[detection]) as cache:
            _forward(model, inputs)
        norms = patch_norms(cache.block_outputs[detection], cache.layout)
        histogram.add(norms)
        outliers = norms > threshold
        counts = outliers.sum(dim=-1)
        weights = outliers / counts.clamp(min=1).unsqueeze(-1)  # rows of images without outliers are zero
        for layer, activations in cache.mlp_activations.items():
            patches = cache.layout.patches(activations).abs().float()
            scores[layer] += torch.einsum("bp,bpn->n", weights, patches).double()
        outliers_per_image.append(counts)
    return _Scan(histogram.all_reduce(), torch.cat(outliers_per_image), all_reduce(scores))


@torch.no_grad()
def _outlier_ratio(model, images: Images, indices: list[int], layer: int, threshold: float, batch_size: int) -> float:
    counts = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for inputs in _batches(images, indices, batch_size, model, "outlier ratio"):
        outliers = _detection_norms(model, inputs, layer) > threshold
        counts += torch.tensor((outliers.sum(), outliers.numel()), dtype=torch.float64, device=counts.device)
    all_reduce(counts)
    return float(counts[0] / counts[1].clamp(min=1))


def _smallest_k(ratio_with, max_k: int, before: float, remaining_outliers: float) -> int:
    """The smallest k whose edit leaves at most ``remaining_outliers`` of the outliers: doubling, then bisection.

    Assumes more neurons never bring more outliers back; returns ``max_k`` when none is enough.
    """

    def enough(k: int) -> bool:
        return ratio_with(k) <= remaining_outliers * before

    low, high = 0, 1
    while high < max_k and not enough(high):
        low, high = high, min(2 * high, max_k)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


def _random_subset(indices: list[int], size: int | None, seed: int) -> list[int]:
    """``size`` of ``indices`` drawn with ``seed``, in their order (all of them when there are not more)."""
    if size is None or size >= len(indices):
        return indices
    chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:size]
    return [indices[i] for i in sorted(chosen.tolist())]


def _neurons_of(ranked: list[tuple[int, int, float]]) -> dict[int, list[int]]:
    neurons: dict[int, list[int]] = {}
    for layer, neuron, _ in ranked:
        neurons.setdefault(layer, []).append(neuron)
    return neurons


def find_register_neurons(
    model: TestTimeRegisterMixin,
    images: Images,
    *,
    threshold: float | None = None,
    detection_layer: int = -1,
    highest_layer: int | None = None,
    top_k: int | None = None,
    max_top_k: int = 32,
    remaining_outliers: float = 0.01,
    num_images: int | None = None,
    calibration_images: int = 64,
    eval_images: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    checkpoint: str = "",
) -> DiscoveryResult:
    """Find the register neurons of ``model`` from ``images``: a sequence of preprocessed ``(3, H, W)`` tensors, or of
    dicts of one image's keyword inputs for models that take more than pixel values (SigLIP2's NaFlex
    ``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``, each without the batch dimension), stacked key by
    key into batches.

    Args:
        threshold: norm above which a patch token at ``detection_layer`` is an outlier (the authors use 30 for
            OpenCLIP); `None` picks it from the norm distribution (`AUTOMATIC_THRESHOLD_RULE`) of
            ``calibration_images`` images drawn with ``seed`` (all of them when there are fewer).
        detection_layer: block whose output norms define the outliers (the authors' default: the last, -1).
        highest_layer: last layer searched for neurons (default: the detection layer).
        top_k: number of neurons to keep; `None` picks the smallest k whose edit leaves at most
            ``remaining_outliers`` of the outliers on up to ``eval_images`` images that have them (k <= ``max_top_k``).
        num_images: use a random subset of this many images, drawn with ``seed`` (default: all).
        batch_size: images per forward; the scoring forward keeps one batch's MLP activations of the searched
            layers (``batch_size x layers x tokens x mlp_width``), so lower it if memory is short.
        checkpoint: checkpoint id recorded in the index.

    One forward per image scores the neurons (plus one per calibration image for an automatic threshold, and the
    automatic-k evaluation). The model's own index is restored afterwards. Under ``torchrun`` every process takes its
    share of the images and every statistic is summed over processes, so all of them return the same result as one
    process would.
    """
    num_layers = len(model.transformer_blocks)
    detection = resolve_layers([detection_layer], num_layers)[0]
    highest = detection if highest_layer is None else resolve_layers([highest_layer], num_layers)[0]
    selected = _random_subset(list(range(len(images))), num_images, seed)
    rank, world_size = rank_and_world_size()
    config = model.config
    num_registers = max(config.num_test_time_registers, 1)
    with with_register_neurons(model, {}):
        rule = "given"
        if threshold is None:
            calibration = _random_subset(selected, calibration_images, seed)
            histogram = _norm_histogram(model, images, calibration[rank::world_size], detection, batch_size)
            threshold = robust_threshold(histogram.median(), histogram.mad())
            rule = AUTOMATIC_THRESHOLD_RULE + (
                "" if len(calibration) == len(selected) else f" of {len(calibration)} images"
            )
        scan = _scan(model, images, selected[rank::world_size], detection, highest, threshold, batch_size)
        outliers_per_image = torch.zeros(len(selected), dtype=torch.float64, device=scan.scores.device)
        outliers_per_image[rank::world_size] = scan.outliers_per_image.double()
        all_reduce(outliers_per_image)
        with_outliers = outliers_per_image.nonzero().flatten().tolist()
        scores = scan.scores
        image_size = None if isinstance(images[0], Mapping) else int(images[0].shape[-1])
        facts = dict(
            num_images=len(selected),
            num_images_with_outliers=len(with_outliers),
            num_outlier_tokens=int(outliers_per_image.sum()),
            num_patch_tokens=scan.histogram.total,
            detection_layer=detection,
            highest_layer=highest,
            threshold=threshold,
            threshold_rule=rule,
            median_norm=scan.histogram.median(),
            max_norm=float(scan.histogram.maximum),
        )
        if not with_outliers:
            return DiscoveryResult(index=None, **facts)
        scores /= len(with_outliers)
        order = scores.flatten().sort(descending=True, stable=True).indices[: max(max_top_k, top_k or 0)].tolist()
        ranked = [(i // scores.shape[1], i % scores.shape[1], float(scores.flatten()[i])) for i in order]
        evaluation = with_outliers[:eval_images]
        patches_per_image = scan.histogram.total // len(selected)
        before = float(outliers_per_image[evaluation].sum()) / max(len(evaluation) * patches_per_image, 1)

        @functools.cache
        def ratio_with(k: int) -> float:
            if k == 0:
                return before  # known from the scan
            model.set_register_neurons(_neurons_of(ranked[:k]), num_test_time_registers=num_registers)
            return _outlier_ratio(
                model, images, [selected[i] for i in evaluation][rank::world_size], detection, threshold, batch_size
            )

        k = top_k or _smallest_k(ratio_with, len(ranked), before, remaining_outliers)
        after = ratio_with(k)
        details = {
            **facts,
            "top_k": k,
            "top_k_rule": "given" if top_k else f"smallest k leaving <= {remaining_outliers:g} of the outliers",
            "scores": [[layer, neuron, score] for layer, neuron, score in ranked[:k]],
            "eval_outlier_ratio_before": before,
            "eval_outlier_ratio_after": after,
            "seed": seed,
            "weights_fingerprint": weights_fingerprint(model),
            "package_version": _package_version(),
        }
        index = RegisterNeuronIndex(
            neurons=_neurons_of(ranked[:k]),
            num_layers=config.num_hidden_layers,
            mlp_width=config.mlp_width,
            semantics=config.register_semantics,
            checkpoints={"hub": checkpoint} if checkpoint else {},
            image_size=image_size,
            source=f"ttreg find-neurons (ttreg_hf {_package_version()})",
            details=details,
        )
        return DiscoveryResult(
            index=index, ranked=ranked[: max(k, 8)], top_k=k, eval_outlier_ratio=(before, after), **facts
        )


def _package_version() -> str:
    from . import __version__

    return __version__
