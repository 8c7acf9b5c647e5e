"""`evaluate`: a model with its test-time register off and on, side by side, on a user's own images.

Every batch runs twice, edit off (``register_neurons={}``) and on (the model's own index), through the analysis hooks
(`ttreg_hf.analysis.observe` / `capture`); each forward is reduced at once to per-image numbers (patch norms and the CLS
attention per layer, pooled features), so memory stays flat in the number of images. The outlier threshold of each
layer is the automatic one of the first ``calibration_images`` images without the edit (or the one given), the same
for both runs. Under ``torchrun`` each process takes every world-size-th image and the per-image numbers are summed
across processes, as discovery does. Every number comes with paired bootstrap intervals over the images.
"""

import functools
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis.capture import capture, observe
from ..analysis.distributed import all_reduce, is_main_process, rank_and_world_size
from ..analysis.interventions import with_register_neurons
from ..analysis.metrics import NormHistogram, cls_attention, real_patches
from ..errors import TTRegValueError
from ..images import Preprocessor, open_rgb, patch_grids
from ..modeling.registers import TestTimeRegisterMixin
from ..version import __version__
from .boxes import box_in_image, patch_centers, read_boxes
from .data import Dataset, fingerprint, read_dataset, read_mask
from .statistics import (
    Comparison,
    confusion_matrix,
    corloc_hit,
    knn_predict,
    linear_probe,
    lost_box,
    paired_bootstrap,
    resampled_mean_iou,
)
from .zero_shot import TEMPLATE, vision_tower, zero_shot_classifier

FORMAT = "ttreg-evaluate/1"
TASKS = ("outliers", "knn", "linear", "zero-shot", "lost", "segmentation")
SETTINGS = ("off", "on")
LAYER_MEASURES = {  # name: what it is, per image and layer
    "outlier_ratio": "fraction of the patches above the layer's outlier threshold",
    "max_norm": "largest patch norm",
    "median_norm": "median patch norm",
    "max_median_ratio": "largest over median patch norm",
    "attention_entropy": "entropy (nats) of the CLS attention over the patches, renormalized to sum to 1",
    "outlier_attention_share": "share of the CLS attention on the outlier patches",
    "register_attention_share": "share of the CLS attention on the test-time registers",
}
FEATURES = ("cls", "patch_mean")  # the last block's CLS token, the mean of its patch tokens (registers never in it)


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` measured: ``layers[layer][measure]`` and ``tasks[task]`` are `Comparison`s (edit off vs on,
    paired bootstrap intervals); ``thresholds`` the outlier threshold of each layer; ``info`` the provenance (package
    version, model, index, data fingerprint, settings). ``examples`` holds a few images' last-layer maps for
    `save_figure`; it is not written to JSON."""

    layers: list[dict[str, Comparison]]
    tasks: dict[str, Comparison]
    thresholds: list[float]
    info: dict
    examples: dict = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            **self.info,
            "thresholds": self.thresholds,
            "layers": [{name: _comparison_json(c) for name, c in layer.items()} for layer in self.layers],
            "tasks": {name: _comparison_json(c) for name, c in self.tasks.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "EvaluationResult":
        """The result a `to_json` dict describes; a dict of another format is refused."""
        if data.get("format") != FORMAT:
            raise TTRegValueError(f"Not a ttreg evaluate result (format {data.get('format')!r}, expected {FORMAT!r}).")
        info = {key: value for key, value in data.items() if key not in ("format", "thresholds", "layers", "tasks")}
        return cls(
            [{name: _comparison(c) for name, c in layer.items()} for layer in data["layers"]],
            {name: _comparison(c) for name, c in data["tasks"].items()},
            list(data["thresholds"]),
            info,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def table(self) -> str:
        """The printed report: the last layer's measures and the tasks, then the per-layer outlier curve."""
        level = round(100 * self.info["settings"]["confidence"])
        rows = [(f"{name} (layer {len(self.layers) - 1})", c) for name, c in self.layers[-1].items()]
        rows += list(self.tasks.items())
        width = max(len(name) for name, _ in rows)
        lines = [
            f"{self.info['model']} on {self.info['data']['folder']} ({self.info['data']['num_images']} images): edit "
            f"off vs on, {level} % paired bootstrap intervals",
            f"{'measure':<{width}}  {'off':>10}  {'on':>10}  on - off [{level} % interval]",
        ]
        for name, c in rows:
            low, high = c.difference_interval
            mark = " *" if c.significant else ""
            lines.append(
                f"{name:<{width}}  {c.off:>10.4g}  {c.on:>10.4g}  {c.difference:+.4g} [{low:+.4g}, {high:+.4g}]{mark}"
            )
        lines += [
            "(* the interval leaves out 0)",
            "",
            "layer  outlier ratio off / on   outlier attention share off / on",
        ]
        for layer, measures in enumerate(self.layers):
            ratio, share = measures["outlier_ratio"], measures["outlier_attention_share"]
            lines.append(f"{layer:>5}  {ratio.off:>8.4f} / {ratio.on:<8.4f}   {share.off:>10.4f} / {share.on:.4f}")
        return "\n".join(lines)

    def save_figure(self, path: str | Path) -> Path:
        from .figure import save_figure

        return save_figure(self, path)


def _comparison_json(comparison: Comparison) -> dict:
    return {**asdict(comparison), "difference": comparison.difference}


def _comparison(data: dict) -> Comparison:
    fields = {key: value for key, value in data.items() if key != "difference"}
    return Comparison(**{key: tuple(v) if isinstance(v, list) else v for key, v in fields.items()})


@dataclass
class _Forward:
    """One batch through one setting, reduced: per layer the patch norms and the patches' CLS attention ``(batch,
    layers, patches)``, the registers' attention share ``(batch, layers)``, which patches are real ``(batch,
    patches)``, the pooled features ``(batch, width)`` (these on the model's device), and for LOST and the
    segmentation probe each image's patch grid and LOST box (in patches) and the last block's patch tokens ``(batch,
    patches, width)``."""

    norms: torch.Tensor
    attention: torch.Tensor | None
    register_share: torch.Tensor | None
    real: torch.Tensor
    features: dict[str, torch.Tensor]
    grids: list[tuple[int, int]]
    lost_boxes: list[tuple[int, int, int, int]]
    patch_tokens: torch.Tensor | None


def _forward(model: TestTimeRegisterMixin, inputs: dict, tasks: Sequence[str] = (), zero_shot=None) -> _Forward:
    """Run ``inputs`` once through ``model``, or through ``zero_shot.embed_images`` (which runs it inside), for
    ``tasks``; every layer's tensors are reduced as they come, so no layer's tokens are kept. With a CLS token only
    the CLS row of each attention map is computed; what the outlier measures need stays on the model's device (no
    host synchronisation)."""
    attentions, lost = "outliers" in tasks, "lost" in tasks
    layers = range(len(model.transformer_blocks))
    norms, rows = {}, {}
    cls_only = model.token_layout.num_prefix_tokens > 0  # else every row, averaged (SigLIP)

    def keep_norms(layer: int):
        return lambda tokens: norms.__setitem__(layer, tokens.float().norm(dim=-1))

    def keep_attention(layer: int):
        def keep(probabilities: torch.Tensor) -> None:
            rows[layer] = probabilities[:, :, :1] if cls_only else probabilities.float().mean(1, keepdim=True)

        return keep

    observers = {"blocks": {layer: keep_norms(layer) for layer in layers}}
    if attentions:
        observers["attentions"] = {layer: keep_attention(layer) for layer in layers}
        observers["attention_rows"] = 1 if cls_only else None
    keys = [-1] if lost else None
    with torch.no_grad(), capture(model, blocks=[-1], keys=keys) as cache, observe(model, **observers):
        if zero_shot:
            embeddings = zero_shot.embed_images(inputs)
        else:  # pixel values first: open_clip's and timm's towers name them otherwise
            model(inputs["pixel_values"], **{key: value for key, value in inputs.items() if key != "pixel_values"})
    layout, last = cache.layout, cache.block_outputs[layers[-1]]
    real = real_patches(cache, last)
    stacked = torch.stack([norms[layer] for layer in layers], dim=1)  # (batch, layers, tokens)
    patches = layout.patches(last)
    mean = (patches.float() * real.unsqueeze(-1)).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)
    features = {"patch_mean": mean}
    if layout.num_prefix_tokens:
        features["cls"] = last[:, 0].float()
    if zero_shot:
        features["zero_shot"] = embeddings.float()
    attention = register_share = None
    if attentions:
        cls = torch.stack([cls_attention(rows[layer], layout, cache.token_mask) for layer in layers], dim=1)
        attention = layout.patches(cls.transpose(1, 2)).transpose(1, 2)
        register_share = layout.registers(cls.transpose(1, 2)).sum(dim=1)
    patch_norms = layout.patches(stacked.transpose(1, 2)).transpose(1, 2)
    grids, lost_boxes, tokens = [], [], None
    if lost or "segmentation" in tasks:  # these read on the host
        grids = patch_grids(inputs, patch_norms.shape[-1])
    if lost:
        patch_keys = layout.patches(cache.keys[layers[-1]])
        lost_boxes = [lost_box(k[: rows * columns], rows, columns) for k, (rows, columns) in zip(patch_keys, grids)]
    if "segmentation" in tasks:
        tokens = patches.float().cpu()
    return _Forward(patch_norms, attention, register_share, real, features, grids, lost_boxes, tokens)


def _layer_measures(forward: _Forward, thresholds: torch.Tensor) -> torch.Tensor:
    """Per image and layer, the `LAYER_MEASURES` ``(batch, layers, measures)``, over the real patches."""
    real = forward.real.unsqueeze(1).expand_as(forward.norms)
    count = real.sum(dim=-1).clamp(min=1)
    outliers = (forward.norms > thresholds.view(1, -1, 1)) & real
    maxima = forward.norms.masked_fill(~real, float("-inf")).amax(dim=-1)
    medians = forward.norms.masked_fill(~real, float("nan")).nanmedian(dim=-1).values
    attention = forward.attention * real
    shares = attention / attention.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    entropy = -(shares * shares.clamp(min=1e-30).log()).sum(dim=-1)
    measures = [
        outliers.sum(dim=-1) / count,
        maxima,
        medians,
        maxima / medians,
        entropy,
        (attention * outliers).sum(dim=-1),
        forward.register_share,
    ]
    return torch.stack(measures, dim=-1)


def _batches(paths: Sequence[Path], indices: Sequence[int], preprocessor: Preprocessor, batch_size: int, desc: str):
    """``(indices, inputs, sizes)`` of ``indices`` into ``paths``, ``batch_size`` at a time, with a progress bar;
    ``sizes`` are the images' (width, height)."""
    show = is_main_process() and sys.stderr.isatty()
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, disable=not show, leave=False):
        chunk = list(indices[start : start + batch_size])
        images = [open_rgb(paths[i]) for i in chunk]
        yield chunk, preprocessor(images), [image.size for image in images]


def _on_device(inputs: dict, model: torch.nn.Module) -> dict:
    """``inputs`` on ``model``'s device, floating-point ones in its dtype; to a GPU through pinned memory, without
    waiting for it (no host synchronisation)."""
    parameter = next(model.parameters())
    pinned = parameter.device.type == "cuda"
    return {
        key: (value.pin_memory() if pinned else value).to(
            parameter.device, parameter.dtype if value.is_floating_point() else value.dtype, non_blocking=pinned
        )
        for key, value in inputs.items()
    }


def _settings(model: TestTimeRegisterMixin) -> Iterator[tuple[str, TestTimeRegisterMixin]]:
    """The model with its edit off, then on: with its own index, as it came (one switch and back per batch)."""
    with with_register_neurons(model, {}):
        yield SETTINGS[0], model
    yield SETTINGS[1], model


class _Collector:
    """Per-image numbers of every image, filled by each process at its own images and summed across processes. A
    GPU's values are copied to the host as they come, without waiting for them: the copies are waited for once, in
    `gathered`."""

    def __init__(self, num_images: int):
        self.num_images, self.parts = num_images, {}

    def put(self, name: str, indices: list[int], values: torch.Tensor) -> None:
        values = values.detach().double()
        self.parts.setdefault(name, []).append((indices, values.to("cpu", non_blocking=values.is_cuda)))

    def gathered(self) -> dict[str, torch.Tensor]:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        tensors = {}
        for name, parts in self.parts.items():
            tensors[name] = torch.zeros(self.num_images, *parts[0][1].shape[1:], dtype=torch.float64)
            for indices, values in parts:
                tensors[name][indices] = values
            all_reduce(tensors[name])
        return tensors


def evaluate(
    model: torch.nn.Module,
    preprocessor: Preprocessor,
    data: str | Path | Dataset,
    *,
    tasks: Sequence[str] | None = None,
    tokenizer=None,
    template: str = TEMPLATE,
    boxes: str | Path | None = None,
    masks: str | Path | None = None,
    patches_per_image: int = 64,
    batch_size: int = 16,
    threshold: float | None = None,
    calibration_images: int = 64,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    knn_k: int = 20,
    num_examples: int = 3,
    model_name: str | None = None,
) -> EvaluationResult:
    """``model`` (with its register-neuron index attached) edit off vs on, on the images of ``data``: a vision tower
    with test-time registers, or a dual encoder holding one (a `transformers` CLIP / SigLIP model, an open_clip CLIP).

    ``tasks``: among `TASKS` (default: all that ``data`` allows): ``"outliers"`` (`LAYER_MEASURES` per layer),
    ``"knn"`` and ``"linear"`` (k-NN and linear-probe accuracy on the CLS token and on the mean patch token of the last
    block, on a ``train/`` / ``val/`` split, see `ttreg_hf.evaluation.data`), ``"zero-shot"`` (the accuracy of
    ``model``, a dual encoder, with its ``tokenizer`` and the prompt ``template``, on class folders, see
    `zero_shot_classifier`), ``"lost"`` (LOST's CorLoc on the images with ``boxes``: Pascal VOC XML files or a COCO
    JSON file, see `read_boxes`), ``"segmentation"`` (a linear probe on the last block's patch tokens, trained on
    ``patches_per_image`` random patches of each ``train/`` image, its mIoU on ``val/``, with ``masks``: a folder of
    PNG masks, see `read_mask`). ``threshold``: one outlier norm for
    every layer (default: each layer's automatic one). ``seed`` fixes the bootstrap."""
    tower = vision_tower(model)
    if not tower.config.register_neurons:
        raise TTRegValueError(
            "The model has no register-neuron index, so the edit cannot be turned on: attach one first."
        )
    if not tower.config.num_test_time_registers:
        raise TTRegValueError(
            "The model runs without test-time registers (num_test_time_registers=0), so the edit cannot be turned "
            "on: load it with num_test_time_registers=1."
        )
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    tasks = check_tasks(tasks, dataset, tokenizer is not None, boxes is not None, masks is not None)
    truth = read_boxes(boxes) if "lost" in tasks else {}
    if "lost" in tasks and not any(path.stem in truth for path in dataset.images):
        raise TTRegValueError(
            f"None of the images of {dataset.folder} has boxes in {boxes} (matched by file name stem)."
        )
    zero_shot = None
    if "zero-shot" in tasks:
        zero_shot = zero_shot_classifier(model, tokenizer, dataset.val.classes, template)
    model = tower
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise TTRegValueError(f"threshold must be a finite norm above 0 (or None: automatic), got {threshold!r}.")
    rank, world_size = rank_and_world_size()
    if len(dataset.images) < world_size:
        raise TTRegValueError(f"{len(dataset.images)} images cannot be shared by {world_size} processes: use fewer.")
    num_layers = len(model.transformer_blocks)
    collector = _Collector(len(dataset.images))
    device = next(model.parameters()).device
    histograms = [NormHistogram(device) for _ in range(num_layers)]
    pending: list[tuple[list[int], dict[str, _Forward]]] = []
    thresholds = None if threshold is None else torch.full((num_layers,), float(threshold), device=device)
    quota = math.ceil(calibration_images / world_size)
    shard = list(range(rank, len(dataset.images), world_size))
    examples = {}
    centers = functools.cache(functools.partial(patch_centers, preprocessor))  # by image size and patch grid
    if "segmentation" in tasks:
        segmentation = _segmentation_probes(
            model, preprocessor, dataset, Path(masks), batch_size, centers, seed, patches_per_image
        )

    def flush() -> None:
        for indices, forwards in pending:
            for name, forward in forwards.items():
                collector.put(f"layers/{name}", indices, _layer_measures(forward, thresholds))
        pending.clear()

    batches = _batches(dataset.images, shard, preprocessor, batch_size, "evaluate")
    for position, (indices, inputs, sizes) in enumerate(batches):
        inputs, forwards = _on_device(inputs, model), {}
        for name, tower in _settings(model):
            forwards[name] = forward = _forward(tower, inputs, tasks, zero_shot)
            if "segmentation" in tasks:
                confusions = _confusions(forward, [dataset.images[i] for i in indices], sizes, segmentation[name])
                collector.put(f"segmentation/{name}", indices, confusions)
            if "lost" in tasks:
                hits = _corloc(forward, dataset.images, indices, sizes, truth, centers)
                collector.put(f"lost/{name}", indices, hits)
            for feature, values in forward.features.items():
                collector.put(f"features/{name}/{feature}", indices, values)
            if name == "off" and thresholds is None and "outliers" in tasks:
                for layer, histogram in enumerate(histograms):
                    histogram.add(forward.norms[:, layer], forward.real)
        if position == 0 and rank == 0:
            examples = _examples(forwards, preprocessor, inputs, num_examples)
        if "outliers" in tasks:
            pending.append((indices, forwards))
            if thresholds is None and (position + 1) * batch_size >= min(quota, len(shard)):
                thresholds = torch.tensor([h.all_reduce().threshold() for h in histograms], device=device)
            if thresholds is not None:
                flush()
    if "outliers" in tasks and thresholds is None:  # a process without images still joins the reduction
        thresholds = torch.tensor([h.all_reduce().threshold() for h in histograms], device=device)
        flush()
    gathered = collector.gathered()

    def compare(off: torch.Tensor, on: torch.Tensor, **kw) -> Comparison:
        return paired_bootstrap(off, on, num_resamples=num_resamples, confidence=confidence, seed=seed, **kw)

    layers = []
    if "outliers" in tasks:
        off, on = gathered["layers/off"], gathered["layers/on"]
        for layer in range(num_layers):
            layers.append({m: compare(off[:, layer, i], on[:, layer, i]) for i, m in enumerate(LAYER_MEASURES)})
    results = {}
    if "zero-shot" in tasks:
        labels = torch.tensor(dataset.val.labels)
        correct = [zero_shot.predict(gathered[f"features/{name}/zero_shot"]) == labels for name in SETTINGS]
        results["zero_shot_accuracy"] = compare(*(c.double() for c in correct))
    if "segmentation" in tasks:
        off, on = gathered["segmentation/off"], gathered["segmentation/on"]
        results["segmentation_miou"] = compare(off, on, statistic=resampled_mean_iou)
    if "lost" in tasks:
        boxed = torch.tensor([path.stem in truth for path in dataset.images])
        results["lost_corloc"] = compare(gathered["lost/off"][boxed], gathered["lost/on"][boxed])
    if dataset.has_split and {"knn", "linear"} & set(tasks):
        results.update(_probes(model, preprocessor, dataset, gathered, tasks, batch_size, knn_k, compare))
    info = {
        "package_version": __version__,
        "model": model_name or type(model).__name__,
        "register_neurons": {str(k): list(v) for k, v in model.config.register_neurons.items()},
        "index_provenance": model.config.register_index_provenance,
        "data": {
            "folder": str(dataset.folder),
            "fingerprint": fingerprint(dataset),
            "num_images": len(dataset.images),
            "num_train_images": len(dataset.train_images),
            "classes": list(dataset.val.classes) if dataset.val else [],
        },
        "settings": {
            "tasks": list(tasks),
            "batch_size": batch_size,
            "threshold": threshold,
            "calibration_images": calibration_images,
            "num_resamples": num_resamples,
            "confidence": confidence,
            "seed": seed,
            "knn_k": knn_k,
            "template": template if zero_shot else None,
            "boxes": str(boxes) if "lost" in tasks else None,
            "masks": str(masks) if "segmentation" in tasks else None,
            "patches_per_image": patches_per_image if "segmentation" in tasks else None,
            "preprocessing": preprocessor.description,
            "world_size": world_size,
        },
    }
    return EvaluationResult(layers, results, [] if thresholds is None else thresholds.tolist(), info, examples)


def check_tasks(
    tasks: Sequence[str] | None, dataset: Dataset, zero_shot: bool = False, boxes: bool = False, masks: bool = False
) -> tuple[str, ...]:
    """``tasks`` (default: every task ``dataset`` allows) without repeats, or a `ValueError` naming the problem;
    ``zero_shot``: a tokenizer for zero-shot classification is given; ``boxes``, ``masks``: box annotations, masks
    are."""
    needs = {
        "knn": (dataset.has_split, "a classification split: DATA/train/CLASS/IMAGE and DATA/val/CLASS/IMAGE"),
        "linear": (dataset.has_split, "a classification split: DATA/train/CLASS/IMAGE and DATA/val/CLASS/IMAGE"),
        "zero-shot": (
            zero_shot and dataset.val is not None,
            "class folders (DATA/CLASS/IMAGE or DATA/val/CLASS/IMAGE), and a CLIP / SigLIP / open_clip model with its "
            "tokenizer",
        ),
        "lost": (boxes, "box annotations: a folder of Pascal VOC XML files or a COCO JSON file (--boxes)"),
        "segmentation": (
            masks and bool(dataset.train_images),
            "a split (DATA/train/IMAGE, DATA/val/IMAGE, in class folders or not) and a folder of PNG masks (--masks)",
        ),
    }
    if tasks is None:
        return tuple(task for task in TASKS if needs.get(task, (True,))[0])
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise TTRegValueError(f"Unknown task(s) {', '.join(map(repr, unknown))}; tasks are {', '.join(TASKS)}.")
    for task in tasks:
        possible, need = needs.get(task, (True, ""))
        if not possible:
            raise TTRegValueError(f"The {task} task needs {need}.")
    return tuple(dict.fromkeys(tasks))


def _corloc(forward: _Forward, images: Sequence[Path], indices, sizes, truth: dict, centers) -> torch.Tensor:
    """Per image of a batch, whether its LOST box finds one of its true boxes (IoU >= 0.5; 0 without boxes);
    ``centers(size, grid)`` maps the patch grid to the image (`patch_centers`)."""
    hits = []
    for index, size, grid, box in zip(indices, sizes, forward.grids, forward.lost_boxes):
        boxes = truth.get(images[index].stem)
        hit = boxes is not None and corloc_hit(box_in_image(box, centers(size, grid), size), boxes)
        hits.append(float(hit))
    return torch.tensor(hits)


def _patch_labels(mask: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The mask's class at each patch's center, ``(rows * columns,)``."""
    height, width = mask.shape
    x = centers[..., 0].round().long().clamp(0, width - 1)
    y = centers[..., 1].round().long().clamp(0, height - 1)
    return mask[y, x].flatten()


@dataclass(frozen=True)
class _SegmentationProbe:
    """One setting's linear probe on patch tokens, and what labels a val image's patches."""

    predict: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    masks: Path
    centers: Callable


def _segmentation_probes(model, preprocessor, dataset, masks: Path, batch_size, centers, seed, patches_per_image):
    """Per setting, a linear probe on ``patches_per_image`` random patches (seeded; distinct where the image has as
    many) of each training image, to its mask's class there (ignored patches left out)."""
    rank, world_size = rank_and_world_size()
    paths = dataset.train_images
    train = _Collector(len(paths))
    shard = list(range(rank, len(paths), world_size))
    for indices, inputs, sizes in _batches(paths, shard, preprocessor, batch_size, "segmentation features"):
        inputs = _on_device(inputs, model)
        picks = []
        for name, tower in _settings(model):
            forward = _forward(tower, inputs, ("segmentation",))
            if not picks:  # the same patches of an image in both settings
                labels = []
                for index, size, (rows, columns) in zip(indices, sizes, forward.grids):
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
                    if rows * columns >= patches_per_image:
                        picks.append(torch.randperm(rows * columns, generator=generator)[:patches_per_image])
                    else:
                        picks.append(torch.randint(rows * columns, (patches_per_image,), generator=generator))
                    mask = read_mask(masks, paths[index])
                    labels.append(_patch_labels(mask, centers(size, (rows, columns)))[picks[-1]])
                train.put("labels", indices, torch.stack(labels))
            train.put(f"{name}/tokens", indices, torch.stack([t[p] for t, p in zip(forward.patch_tokens, picks)]))
    gathered = train.gathered()
    labels = gathered["labels"].flatten().long()
    kept = labels != 255
    if not kept.any():
        raise TTRegValueError(f"The training masks in {masks} label no patch (every one is 255, ignored).")
    num_classes = int(labels[kept].max()) + 1
    probes = {}
    for name in SETTINGS:
        tokens = gathered[f"{name}/tokens"].flatten(0, 1)[kept].float()
        probes[name] = _SegmentationProbe(linear_probe(tokens, labels[kept], num_classes), num_classes, masks, centers)
    return probes


def _confusions(forward: _Forward, paths: list[Path], sizes, probe: _SegmentationProbe) -> torch.Tensor:
    """Per image of a batch, the confusion matrix of the probe's class for each real patch against its mask's."""
    confusions = []
    for tokens, path, size, (rows, columns) in zip(forward.patch_tokens, paths, sizes, forward.grids):
        labels = _patch_labels(read_mask(probe.masks, path), probe.centers(size, (rows, columns)))
        labels = labels.masked_fill(labels >= probe.num_classes, 255)  # a class the training masks never show
        predicted = probe.predict(tokens[: rows * columns])
        confusions.append(confusion_matrix(predicted, labels, probe.num_classes))
    return torch.stack(confusions)


def _examples(forwards: dict[str, _Forward], preprocessor: Preprocessor, inputs: dict, count: int) -> dict:
    """The first ``count`` images of a batch, for the figure: each input image and, per setting, its last layer's
    patch-norm and CLS-attention maps on its patch grid (a NaFlex image's own grid, padding left out)."""
    inputs = {key: value[:count].cpu() for key, value in inputs.items()}
    images = preprocessor.to_images(inputs)
    grids = patch_grids(inputs, forwards["off"].norms.shape[-1])
    examples = []
    for i, (image, (rows, columns)) in enumerate(zip(images, grids)):
        maps = {"image": image.cpu()}
        for name, forward in forwards.items():
            for kind, values in (("norms", forward.norms), ("attention", forward.attention)):
                if values is not None and rows * columns <= values.shape[-1]:
                    maps[f"{kind}/{name}"] = values[i, -1, : rows * columns].view(rows, columns).cpu()
        examples.append(maps)
    return {"images": examples}


def _probes(model, preprocessor, dataset, gathered, tasks, batch_size, knn_k, compare) -> dict[str, Comparison]:
    """k-NN and linear-probe accuracy per feature, edit off vs on: trained on ``train/``, measured on ``val/``."""
    rank, world_size = rank_and_world_size()
    train = _Collector(len(dataset.train.paths))
    shard = list(range(rank, len(dataset.train.paths), world_size))
    for indices, inputs, _ in _batches(dataset.train.paths, shard, preprocessor, batch_size, "train features"):
        inputs = _on_device(inputs, model)
        for name, tower in _settings(model):
            for feature, values in _forward(tower, inputs).features.items():
                train.put(f"{name}/{feature}", indices, values)
    train_features = train.gathered()
    train_labels = torch.tensor(dataset.train.labels)
    val_labels = torch.tensor(dataset.val.labels)
    num_classes = len(dataset.train.classes)
    results = {}
    for feature in (f for f in FEATURES if f"off/{f}" in train_features):
        correct = {}
        for name in SETTINGS:
            fit, val = train_features[f"{name}/{feature}"].float(), gathered[f"features/{name}/{feature}"].float()
            if "knn" in tasks:
                predicted = knn_predict(fit, train_labels, val, num_classes, k=knn_k)
                correct.setdefault("knn", {})[name] = (predicted == val_labels).double()
            if "linear" in tasks:
                predicted = linear_probe(fit, train_labels, num_classes)(val)
                correct.setdefault("linear", {})[name] = (predicted == val_labels).double()
        for task, by_setting in correct.items():
            results[f"{task}_accuracy/{feature}"] = compare(by_setting["off"], by_setting["on"])
    return results
