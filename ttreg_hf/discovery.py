"""Find a checkpoint's register neurons (Algorithm 1 of "Vision Transformers Don't Need Trained Registers").

Outlier tokens are the patch tokens whose norm at a detection layer exceeds a threshold; every MLP neuron up to a
highest layer is scored by its mean |activation| at the outlier positions, over the images that have outliers; the
top k are the register neurons. One forward per image gives the threshold, the outliers and the scores; statistics are
streamed (memory does not grow with the number of images) and summed across processes under ``torchrun`` /
``accelerate launch``.
"""

import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .analysis.capture import capture
from .analysis.distributed import all_reduce, is_main_process, rank_and_world_size
from .analysis.interventions import with_register_neurons
from .analysis.metrics import MAD_FACTOR, MIN_NORM_RATIO, NormHistogram, patch_mask, patch_norms
from .analysis.towers import consumer_layer, register_tower
from .errors import TTRegValueError
from .index import RegisterNeuronIndex, weights_fingerprint
from .modeling.registers import TestTimeRegisterMixin, check_pixel_values

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
    detection_layer_rule: str
    highest_layer: int
    threshold: float
    threshold_rule: str
    median_norm: float
    max_norm: float
    ranked: list[tuple[int, int, float]] = field(default_factory=list)
    top_k: int = 0
    eval_outlier_ratio: tuple[float, float] | None = None
    num_eval_images: int = 0

    @property
    def found(self) -> bool:
        return self.index is not None

    @property
    def outlier_ratio(self) -> float:
        return self.num_outlier_tokens / max(self.num_patch_tokens, 1)

    def summary(self) -> str:
        norms = (
            f"patch norms at layer {self.detection_layer} ({self.detection_layer_rule}): median {self.median_norm:.4g}, max {self.max_norm:.4g} "
            f"(max/median {self.max_norm / self.median_norm:.3g}); threshold {self.threshold:.4g} ({self.threshold_rule})"
        )
        if not self.found:
            return (
                f"No outliers found in {self.num_images} images: no patch token exceeds the threshold.\n  {norms}\n"
                "  The model has no high-norm outlier tokens, so it has no register neurons to find; no index written."
            )
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
            + (
                "  outlier ratio: not measured (no evaluation images)"
                if self.eval_outlier_ratio is None
                else f"  outlier ratio on the {self.num_eval_images} evaluation images: "
                f"{100 * self.eval_outlier_ratio[0]:.2f} % before, {100 * self.eval_outlier_ratio[1]:.2f} % with the edit"
            )
        )


def _batches(
    images: Images, selected: list[int], positions: list[int], batch_size: int, model: torch.nn.Module, desc: str
) -> Iterator[tuple[list[int], Inputs]]:
    """``positions`` (into ``selected``) in batches: each batch's positions and its inputs on the model's device."""
    parameter = next(model.parameters())
    show_progress = is_main_process() and sys.stderr.isatty()  # no bars in logs and pipes
    for start in tqdm(range(0, len(positions), batch_size), desc=desc, disable=not show_progress, leave=False):
        chunk = positions[start : start + batch_size]
        indices = [selected[p] for p in chunk]
        if isinstance(images, torch.Tensor):  # a view where the images are evenly spaced: no copy
            steps = {b - a for a, b in zip(indices, indices[1:])}
            step = steps.pop() if len(steps) == 1 else 1 if len(indices) == 1 else None
            if step and step > 0:
                batch = images[indices[0] : indices[-1] + 1 : step]
            else:  # one copy (faster than indexing with a list)
                batch = images.index_select(0, torch.tensor(indices, device=images.device))
            yield chunk, _to_model("pixel_values", batch, parameter)
            continue
        chosen = [images[i] for i in indices]
        if isinstance(chosen[0], Mapping):  # one image's keyword inputs: stacked key by key
            yield (
                chunk,
                {key: _to_model(key, _stack(key, [image[key] for image in chosen]), parameter) for key in chosen[0]},
            )
        else:
            yield chunk, _to_model("pixel_values", _stack("pixel_values", chosen), parameter)


def _stack(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(tensor.shape) for tensor in tensors}
    if len(shapes) > 1:
        raise TTRegValueError(
            f"The images' {name} have different shapes {sorted(shapes)} and cannot share a batch: pad them to one "
            "shape (SigLIP2's image processor does, with a pixel_attention_mask), or pass batch_size=1."
        )
    return torch.stack(tensors)


def _to_model(name: str, tensor: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """One input of a batch on the model's device: pixel values in the model's dtype (integer ones are refused, as
    the models refuse them: no silent cast of 0-255 images), masks and shapes in their own."""
    if name == "pixel_values":
        check_pixel_values(tensor, patch_size=1)  # the dtype; the sizes are the model's to check
    return tensor.to(parameter.device, parameter.dtype if tensor.is_floating_point() else tensor.dtype)


def _forward(model: torch.nn.Module, inputs: Inputs):
    """``model(pixel_values)``, or ``model(**inputs)`` for a dict of keyword inputs."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


@dataclass
class _Tokens:
    """Patch tokens of one batch above a norm bound (all of them, of real patches): the image each belongs to, its
    norm, and where its MLP activations are: row ``rows[i]`` of each searched layer's ``activations``."""

    positions: list[int]  # the batch's images, as positions in the selected images
    image: torch.Tensor  # (tokens,): index into positions
    norms: torch.Tensor  # (tokens,)
    activations: list[torch.Tensor]  # per searched layer, (rows, mlp_width) in the model's dtype
    rows: torch.Tensor  # (tokens,): index into each layer's rows
    bound: float

    def above(self, bound: float) -> "_Tokens":
        """The tokens above a higher ``bound``, in the same order (no activation is copied)."""
        if bound == self.bound:
            return self
        keep = (self.norms > bound).nonzero().flatten()
        return _Tokens(self.positions, self.image[keep], self.norms[keep], self.activations, self.rows[keep], bound)

    def kept(self) -> "_Tokens":
        """The same tokens with a copy of their own rows only, so that the batch's activations can go."""
        width = self.activations[0].shape[-1]
        rows = self.activations[0].new_empty(len(self.activations), len(self.rows), width)
        for layer, activations in enumerate(self.activations):
            torch.index_select(activations, 0, self.rows, out=rows[layer])
        everyone = torch.arange(len(self.rows), device=self.rows.device)
        return _Tokens(self.positions, self.image, self.norms, list(rows), everyone, self.bound)


def _scoring_forward(
    model: TestTimeRegisterMixin, inputs: Inputs, detection: int, highest: int
) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[float, list[int]], _Tokens]]:
    """One forward: the detection layer's patch norms, the patch mask, and a function that finds the tokens above a
    bound (their MLP activations are the batch's, referenced, not copied)."""
    with capture(model, mlp=range(highest + 1), blocks=[detection]) as cache:
        _forward(model, inputs)
    norms, mask = patch_norms(cache.block_outputs[detection], cache.layout), patch_mask(inputs, model)
    layers = [cache.mlp_activations[layer] for layer in range(highest + 1)]  # (batch, tokens, mlp_width) each
    num_tokens, width = layers[0].shape[1:]

    def tokens_above(bound: float, positions: list[int]) -> _Tokens:
        above = norms > bound
        image, patch = (above if mask is None else above & mask).nonzero(as_tuple=True)
        rows = image * num_tokens + cache.layout.num_prefix_tokens + patch  # of the (batch x tokens, width) rows
        return _Tokens(
            positions, image, norms[image, patch], [layer.reshape(-1, width) for layer in layers], rows, bound
        )

    return norms, mask, tokens_above


class _Statistics:
    """What the pass sums: the norm histogram (and the calibration images' own), each image's outliers and patches,
    and every searched neuron's score (per image, its mean |activation| at the image's outliers, summed)."""

    def __init__(self, device: torch.device, num_images: int, num_layers: int, mlp_width: int):
        self.histogram, self.calibration = NormHistogram(device), NormHistogram(device)
        self.outliers = torch.zeros(num_images, dtype=torch.float64, device=device)
        self.patches = torch.zeros(num_images, dtype=torch.float64, device=device)
        self.scores = torch.zeros(num_layers, mlp_width, dtype=torch.float64, device=device)

    def count_patches(self, positions: list[int], norms: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.patches[positions] = float(norms.shape[1]) if mask is None else mask.sum(dim=-1).double()

    def score(self, outliers: _Tokens) -> None:
        """Add the scores of the images of ``outliers`` (every outlier of these images, and nothing else)."""
        counts = torch.bincount(outliers.image, minlength=len(outliers.positions)).double()
        weights = 1 / counts[outliers.image]  # each image's outliers weigh 1 / its number of outliers: their mean
        # one layer at a time, through two buffers reused across layers (they stay in cache); in float64, so that how the
        # images are batched (in one process or several) changes the sums by rounding only
        rows = outliers.activations[0].new_empty(len(outliers.rows), outliers.activations[0].shape[-1])
        magnitudes = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
        for layer, activations in enumerate(outliers.activations):
            torch.index_select(activations, 0, outliers.rows, out=rows)
            self.scores[layer].addmv_(magnitudes.copy_(rows.abs_()).T, weights)
        self.outliers[outliers.positions] = counts

    def all_reduce(self) -> None:
        """Sum over processes (the calibration histogram is summed when the threshold is settled)."""
        self.histogram.all_reduce()
        self.histogram += self.calibration
        for tensor in (self.outliers, self.patches, self.scores):
            all_reduce(tensor)


# The provisional bound of a calibration batch, as a fraction of the least threshold the automatic rule can give from a
# median like the batch's (MIN_NORM_RATIO x its median): settled thresholds fall below it only when a batch's median
# is over 1 / CANDIDATE_FRACTION times the calibration set's, and such a batch is scored again. The bound lies above
# the batch's median, so fewer than half of its tokens are kept: room for half of the calibration images' tokens never
# runs out, however many outliers the images have.
CANDIDATE_FRACTION = 0.5


@torch.no_grad()
def _scan(
    model: TestTimeRegisterMixin,
    images: Images,
    selected: list[int],
    calibration: list[int] | None,
    detection: int,
    highest: int,
    threshold: float | None,
    batch_size: int,
) -> tuple[_Statistics, float]:
    """One forward per selected image: the norms, the outliers and the scores (and, for an automatic threshold, the
    threshold) of every image; ``calibration``: positions of the calibration images in ``selected``.

    The calibration images go first, each batch keeping the tokens above a provisional bound (bounded memory: at
    most the tokens of half the calibration images, or of one batch if that is more; a few percent of them where
    outliers are rare); the threshold is settled from their norms, their kept tokens are scored, and the other images
    stream with the threshold known. A batch whose bound came out above the threshold, or whose tokens did not fit
    (padded batches of other lengths), is run again.
    """
    rank, world_size = rank_and_world_size()
    device = next(model.parameters()).device
    stats = _Statistics(device, len(selected), highest + 1, model.config.mlp_width)
    others = list(range(len(selected)))
    if threshold is None:
        kept, again, room, share = [], [], None, calibration[rank::world_size]
        for positions, inputs in _batches(images, selected, share, batch_size, model, "calibration"):
            norms, mask, tokens_above = _scoring_forward(model, inputs, detection, highest)
            batch = NormHistogram(device).add(norms, mask)
            stats.calibration += batch
            stats.count_patches(positions, norms, mask)
            tokens = tokens_above(CANDIDATE_FRACTION * MIN_NORM_RATIO * batch.median(), positions)
            room = max(batch_size, math.ceil(len(share) / 2)) * norms.shape[1] if room is None else room
            if len(tokens.image) <= room:
                kept.append(tokens.kept())
                room -= len(tokens.image)
            else:
                again += positions
        threshold = stats.calibration.all_reduce().threshold()
        for tokens in kept:
            if tokens.bound <= threshold:
                stats.score(tokens.above(threshold))
            else:
                again += tokens.positions
        del kept
        for positions, inputs in _batches(images, selected, sorted(again), batch_size, model, "calibration again"):
            stats.score(_scoring_forward(model, inputs, detection, highest)[2](threshold, positions))
        in_calibration = set(calibration)
        others = [position for position in others if position not in in_calibration]
    for positions, inputs in _batches(images, selected, others[rank::world_size], batch_size, model, "scores"):
        norms, mask, tokens_above = _scoring_forward(model, inputs, detection, highest)
        stats.histogram.add(norms, mask)
        stats.count_patches(positions, norms, mask)
        stats.score(tokens_above(threshold, positions))
    stats.all_reduce()
    return stats, threshold


class _Evaluation:
    """Outlier tokens left on the evaluation images with the top k ranked neurons attached, counted in chunks over all
    processes: a count that passes a limit stops early (a k that leaves too many outliers costs about one image)."""

    def __init__(self, model, images, selected, positions, detection, threshold, batch_size, ranked, num_registers):
        self.model, self.images, self.selected, self.positions = model, images, selected, positions
        self.detection, self.threshold, self.batch_size = detection, threshold, batch_size
        self.ranked, self.num_registers = ranked, num_registers
        self.counts: dict[int, int] = {}  # k -> outliers left, for the ks counted to the end

    def count(self, k: int, limit: float | None = None) -> int | None:
        """Outliers left with the top ``k`` neurons; `None` as soon as more than ``limit`` are."""
        if k in self.counts:
            return self.counts[k]
        rank, world_size = rank_and_world_size()
        model, device = self.model, next(self.model.parameters()).device
        model.set_register_neurons(_neurons_of(self.ranked[:k]), num_test_time_registers=self.num_registers)
        total, start = 0, 0
        chunk = world_size if limit is not None else world_size * self.batch_size  # first one image per process
        while start < len(self.positions):
            share = self.positions[start : start + chunk][rank::world_size]
            count = torch.zeros((), dtype=torch.float64, device=device)
            for _, inputs in _batches(self.images, self.selected, share, self.batch_size, model, f"top {k}"):
                with capture(model, blocks=[self.detection]) as cache:
                    _forward(model, inputs)
                outliers = patch_norms(cache.block_outputs[self.detection], cache.layout) > self.threshold
                mask = patch_mask(inputs, model)
                count += (outliers if mask is None else outliers & mask).sum()
            total += int(all_reduce(count))
            if limit is not None and total > limit:
                return None
            start, chunk = start + chunk, world_size * self.batch_size
        self.counts[k] = total
        return total


def _smallest_k(enough: Callable[[int], bool], max_k: int, guess: int) -> int:
    """The smallest k in 1-``max_k`` that is ``enough``, assuming more neurons never bring outliers back (``enough`` is
    monotone; no k below 1 is); ``max_k`` when none is. Starts from ``guess`` and gallops away from it, down while
    ``enough``, up while not, then bisects: the same k as any other search, found with few tries near the guess."""
    low, high = 0, max_k  # not enough at low; the answer is in (low, high]
    k = min(max(guess, 1), max_k)
    if enough(k):
        high, step = k, 1
        while high - step > low:
            if not enough(high - step):
                low = high - step
                break
            high, step = high - step, 2 * step
    else:
        low, step = k, 1
        while low + step < max_k:
            if enough(low + step):
                high = low + step
                break
            low, step = low + step, 2 * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


def _largest_drop(scores: list[float]) -> int:
    """The k after which the ranked scores drop by the largest factor: a guess at how many neurons stand out."""
    ratios = [a / max(b, 1e-30) for a, b in zip(scores, scores[1:])]
    return 1 + max(range(len(ratios)), key=ratios.__getitem__) if ratios else 1


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


def _layer(name: str, layer: int, num_layers: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise TTRegValueError(
            f"{name}={layer} is out of range: the model has {num_layers} layers (0 to {num_layers - 1}, or "
            f"-{num_layers} to -1 from the end)."
        )
    return layer % num_layers


def default_eval_images(num_images: int) -> int:
    """How many images (with outliers) the k search and the before / after ratios use by default: 1/32 of the images,
    at least 8 and at most 32, so that their edited forwards cost about 3 % of the pass over the images."""
    return min(32, max(8, num_images // 32))


def check_eval_images(eval_images: int | None, top_k: int | None) -> None:
    """Refuse an ``eval_images`` discovery cannot use with ``top_k``: none leaves the automatic k nothing to choose
    on. Checked before the model loads on the command line."""
    least = 0 if top_k else 1
    if eval_images is not None and (
        isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < least
    ):
        why = "" if least == 0 else " (the automatic top_k is chosen on them)"
        raise TTRegValueError(f"eval_images must be an integer of at least {least}{why}, got {eval_images!r}.")


def _check_settings(settings: dict, images: Images, num_neurons: int) -> None:
    """Refuse settings discovery cannot use, in one line naming the argument."""
    if not len(images):
        raise TTRegValueError("No images: discovery needs at least one.")
    for name in ("batch_size", "calibration_images", "max_top_k", "num_images", "top_k"):
        value = settings[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TTRegValueError(f"{name} must be a positive integer, got {value!r}.")
    check_eval_images(settings["eval_images"], settings["top_k"])
    if settings["top_k"] is not None and settings["top_k"] > num_neurons:
        raise TTRegValueError(f"top_k={settings['top_k']} is more than the {num_neurons} neurons searched.")
    if not 0 <= settings["remaining_outliers"] < 1:
        raise TTRegValueError(f"remaining_outliers must be in [0, 1), got {settings['remaining_outliers']!r}.")
    threshold = settings["threshold"]
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise TTRegValueError(f"threshold must be a positive number, got {threshold!r}.")


def find_register_neurons(
    model: torch.nn.Module,
    images: Images,
    *,
    threshold: float | None = None,
    detection_layer: int | None = None,
    highest_layer: int | None = None,
    top_k: int | None = None,
    max_top_k: int = 32,
    remaining_outliers: float = 0.01,
    num_images: int | None = None,
    calibration_images: int = 64,
    eval_images: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    checkpoint: str = "",
) -> DiscoveryResult:
    """Find the register neurons of ``model``'s tower from ``images``: a sequence of preprocessed ``(3, H, W)`` float tensors,
    or of dicts of one image's keyword inputs for models that take more than pixel values (SigLIP2's NaFlex
    ``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``, each without the batch dimension), stacked key by
    key into batches. Padding (``pixel_attention_mask`` 0) is no patch: every statistic counts only real patches, so a
    padded batch gives what each image gives alone.

    ``model`` is any model that holds one test-time-register tower (`ttreg_hf.analysis.register_tower`): a tower, a
    classifier, a backbone host, a dual encoder, a VLM, the torch.hub DINOv2 model, an open_clip CLIP, a timm model;
    discovery runs the tower alone, and the index it finds fits the tower wherever it sits.

    Args:
        threshold: norm above which a patch token at ``detection_layer`` is an outlier (the authors use 30 for
            OpenCLIP); `None` picks it from the norm distribution (`AUTOMATIC_THRESHOLD_RULE`) of
            ``calibration_images`` images drawn with ``seed`` (all of them when there are fewer).
        detection_layer: block whose output norms define the outliers; `None`: the one ``model`` reads from its tower
            (`ttreg_hf.analysis.consumer_layer`: a VLM's ``vision_feature_layer``, LLaVA's second-to-last block;
            the last block of a tower alone, the authors' default). Recorded with its reason in the index's details.
        highest_layer: last layer searched for neurons, at most the detection layer (default: the detection layer).
        top_k: number of neurons to keep; `None` picks the smallest k whose edit leaves at most
            ``remaining_outliers`` of the outliers on the first ``eval_images`` images that have them
            (k <= ``max_top_k``). The outlier ratio before and after the edit is measured on these images.
        eval_images: default: `default_eval_images` of the number of images (8 to 32).
        num_images: use a random subset of this many images, drawn with ``seed`` (default: all).
        batch_size: images per forward; the scoring forward keeps one batch's MLP activations of the searched
            layers (``batch_size x layers x tokens x mlp_width``), so lower it if memory is short.
        checkpoint: checkpoint id recorded in the index.

    One forward per image finds the threshold, the outliers and the scores (`_scan`); the edited forwards of the
    k search run on the evaluation images only, and a k that leaves too many outliers stops after about one image.
    The model's own index is restored afterwards. Under ``torchrun`` every process takes its share of the images and
    every statistic is summed over processes, so all of them return the result one process would.
    """
    tower = register_tower(model)
    num_layers = len(tower.transformer_blocks)
    if detection_layer is None:
        consumer = consumer_layer(model)
        detection, detection_rule = consumer.layer, consumer.rule
    else:
        detection, detection_rule = _layer("detection_layer", detection_layer, num_layers), "given"
    model = tower
    highest = detection if highest_layer is None else _layer("highest_layer", highest_layer, num_layers)
    if highest > detection:
        raise TTRegValueError(
            f"highest_layer={highest_layer} (layer {highest}) is after the detection layer {detection}: its neurons "
            f"cannot write the outliers seen there. Search up to layer {detection}, or detect at a later layer."
        )
    config = model.config
    settings = dict(
        threshold=threshold,
        top_k=top_k,
        max_top_k=max_top_k,
        remaining_outliers=remaining_outliers,
        num_images=num_images,
        calibration_images=calibration_images,
        eval_images=eval_images,
        batch_size=batch_size,
    )
    _check_settings(settings, images, (highest + 1) * config.mlp_width)
    selected = _random_subset(list(range(len(images))), num_images, seed)
    calibration = (
        None if threshold is not None else _random_subset(list(range(len(selected))), calibration_images, seed)
    )
    num_registers = max(config.num_test_time_registers, 1)
    with with_register_neurons(model, {}):
        stats, threshold_found = _scan(model, images, selected, calibration, detection, highest, threshold, batch_size)
        rule = "given"
        if threshold is None:
            rule = AUTOMATIC_THRESHOLD_RULE + (
                "" if len(calibration) == len(selected) else f" of {len(calibration)} images"
            )
        threshold = threshold_found
        with_outliers = stats.outliers.nonzero().flatten().tolist()
        image_size = None if isinstance(images[0], Mapping) else int(images[0].shape[-1])
        facts = dict(
            num_images=len(selected),
            num_images_with_outliers=len(with_outliers),
            num_outlier_tokens=int(stats.outliers.sum()),
            num_patch_tokens=stats.histogram.total,
            detection_layer=detection,
            detection_layer_rule=detection_rule,
            highest_layer=highest,
            threshold=threshold,
            threshold_rule=rule,
            median_norm=stats.histogram.median(),
            max_norm=float(stats.histogram.maximum),
        )
        if not with_outliers:
            return DiscoveryResult(index=None, **facts)
        scores = stats.scores / len(with_outliers)
        order = scores.flatten().sort(descending=True, stable=True).indices[: max(max_top_k, top_k or 0)].tolist()
        ranked = [(i // scores.shape[1], i % scores.shape[1], float(scores.flatten()[i])) for i in order]
        evaluation = with_outliers[: default_eval_images(len(selected)) if eval_images is None else eval_images]
        outliers_before = float(stats.outliers[evaluation].sum())
        eval_patches = max(float(stats.patches[evaluation].sum()), 1.0)
        counter = _Evaluation(
            model, images, selected, evaluation, detection, threshold, batch_size, ranked, num_registers
        )
        limit = remaining_outliers * outliers_before

        def enough(k: int) -> bool:
            left = counter.count(k, limit)
            return left is not None and left <= limit

        k = top_k or _smallest_k(enough, len(ranked), _largest_drop([score for *_, score in ranked]))
        # measured on the evaluation images; none (``eval_images=0`` with ``top_k``): no ratio at all, not a zero
        ratios = (outliers_before / eval_patches, counter.count(k) / eval_patches) if evaluation else None
        details = {
            **facts,
            "top_k": k,
            "top_k_rule": "given" if top_k else f"smallest k leaving <= {remaining_outliers:g} of the outliers",
            "scores": [[layer, neuron, score] for layer, neuron, score in ranked[:k]],
            "num_eval_images": len(evaluation),
            **({} if ratios is None else dict(zip(("eval_outlier_ratio_before", "eval_outlier_ratio_after"), ratios))),
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
            index=index,
            ranked=ranked[: max(k, 8)],
            top_k=k,
            eval_outlier_ratio=ratios,
            num_eval_images=len(evaluation),
            **facts,
        )


def _package_version() -> str:
    from .version import __version__

    return __version__
