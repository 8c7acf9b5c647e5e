"""The numbers of `ttreg evaluate`, each a plain function of tensors: paired bootstrap intervals, k-NN and
linear-probe predictions, box IoU and CorLoc, and the mean IoU of a confusion matrix."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import TTRegValueError

# statistic(per-image values (images, ...), resampling weights (resamples, images)) -> one number per resample
Statistic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of per-image ``values`` ``(images,)`` under each row of ``weights`` ``(resamples, images)``."""
    return weights @ values.double() / weights.sum(dim=1)


@dataclass(frozen=True)
class Comparison:
    """One number without (``off``) and with (``on``) the test-time register, each with its bootstrap interval, and
    the interval of their difference ``on - off``, resampled over the same images (paired)."""

    off: float
    on: float
    off_interval: tuple[float, float]
    on_interval: tuple[float, float]
    difference_interval: tuple[float, float]

    @property
    def difference(self) -> float:
        return self.on - self.off

    @property
    def significant(self) -> bool:
        """Whether the difference's interval leaves out zero."""
        low, high = self.difference_interval
        return low > 0 or high < 0


def paired_bootstrap(
    off: torch.Tensor,
    on: torch.Tensor,
    statistic: Statistic = weighted_mean,
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 100,
) -> Comparison:
    """``statistic`` of per-image ``off`` and ``on`` values (``(images, ...)``, image ``i`` the same in both), with
    percentile bootstrap intervals: the images are resampled with replacement, the same draw for both, so the interval
    of the difference is that of a paired comparison. Deterministic for a seed."""
    if off.shape != on.shape or not len(off):
        raise TTRegValueError(
            f"Paired values need the same images, at least one: got shapes {off.shape} and {on.shape}."
        )
    if not 0 < confidence < 1:
        raise TTRegValueError(f"confidence must be between 0 and 1, got {confidence}.")
    num_images = len(off)
    generator = torch.Generator().manual_seed(seed)
    draws = {"off": [], "on": [], "difference": []}
    for start in range(0, num_resamples, chunk):
        rows = min(chunk, num_resamples - start)
        picks = torch.randint(num_images, (rows, num_images), generator=generator)
        weights = torch.zeros(rows, num_images, dtype=torch.float64).scatter_add_(
            1, picks, torch.ones(rows, num_images, dtype=torch.float64)
        )
        off_draw, on_draw = statistic(off, weights), statistic(on, weights)
        for name, draw in zip(draws, (off_draw, on_draw, on_draw - off_draw)):
            draws[name].append(draw)
    tail = (1 - confidence) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.float64)

    def interval(name: str) -> tuple[float, float]:
        low, high = torch.quantile(torch.cat(draws[name]).double(), quantiles).tolist()
        return low, high

    all_images = torch.ones(1, num_images, dtype=torch.float64)
    return Comparison(
        float(statistic(off, all_images)[0]),
        float(statistic(on, all_images)[0]),
        interval("off"),
        interval("on"),
        interval("difference"),
    )


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """The weighted k-NN classifier of DINO's evaluation: the ``k`` training features most cosine-similar to each of
    ``features`` vote for their label with weight ``exp(similarity / temperature)``; the label with the most weight
    wins. Returns ``(len(features),)`` labels."""
    k = min(k, len(train_features))
    train = torch.nn.functional.normalize(train_features.float(), dim=-1)
    predictions = []
    for rows in torch.nn.functional.normalize(features.float(), dim=-1).split(chunk):
        similarity, neighbours = (rows @ train.T).topk(k, dim=-1)
        votes = torch.zeros(len(rows), num_classes).scatter_add_(
            1, train_labels[neighbours], (similarity / temperature).exp()
        )
        predictions.append(votes.argmax(dim=-1))
    return torch.cat(predictions)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    max_iterations: int = 200,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A multinomial logistic regression on standardized features: minimizes the mean cross-entropy plus
    ``weight_decay / 2 * ||W||^2`` (bias not penalized) with L-BFGS, from zero, in float64 (deterministic). Returns
    ``predict(features) -> labels``."""
    features = train_features.double()
    mean, std = features.mean(dim=0), features.std(dim=0, correction=0).clamp(min=1e-8)
    features = (features - mean) / std
    weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iterations, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(features @ weight + bias, train_labels)
        value = value + weight_decay / 2 * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    weight, bias = weight.detach(), bias.detach()
    return lambda rows: (((rows.double() - mean) / std) @ weight + bias).argmax(dim=-1)


def box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``boxes`` ``(n, 4)`` with every one of ``others`` ``(m, 4)``; boxes are ``(x0, y0, x1,
    y1)`` in pixels, ``x1`` and ``y1`` exclusive."""
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=-1)
    other_area = (others[:, 2:] - others[:, :2]).prod(dim=-1)
    return intersection / (area[:, None] + other_area[None, :] - intersection)


def corloc_hit(box: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5) -> bool:
    """CorLoc's test for one image: the predicted ``box`` ``(4,)`` overlaps one of the ``truth`` boxes ``(m, 4)``
    with IoU at least ``threshold``."""
    return bool((box_iou(box[None].float(), truth.float()) >= threshold).any())


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore: int = 255):
    """``(num_classes, num_classes)`` counts, rows the true class, columns the predicted one; ``ignore`` labels
    are left out."""
    keep = labels != ignore
    pairs = labels[keep].long() * num_classes + predictions[keep].long()
    return torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> torch.Tensor:
    """The mean over classes of ``TP / (TP + FP + FN)`` of a confusion matrix (or a stack of them, ``(..., C,
    C)``); classes absent from both the truth and the predictions are left out."""
    confusion = confusion.double()
    true_positive = confusion.diagonal(dim1=-2, dim2=-1)
    union = confusion.sum(dim=-1) + confusion.sum(dim=-2) - true_positive
    present = union > 0
    iou = torch.where(present, true_positive / union.clamp(min=1), 0.0)
    return iou.sum(dim=-1) / present.sum(dim=-1).clamp(min=1)


def resampled_mean_iou(confusions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A `Statistic`: the mean IoU of the per-image confusion matrices ``(images, C, C)`` summed with each row of
    ``weights``."""
    return mean_iou(torch.einsum("ri,icd->rcd", weights, confusions.double()))


def lost_box(keys: torch.Tensor, rows: int, columns: int, num_candidates: int = 100) -> tuple[int, int, int, int]:
    """LOST (Siméoni et al., 2021): the box of the object around the seed patch, from the last layer's keys of an
    image's patches ``(rows * columns, dim)`` (row-major), in patch units ``(column0, row0, column1, row1)``, the
    ends exclusive.

    Patches correlate when their keys' dot product is positive; the seed is the patch with the fewest correlated
    patches (objects cover less of an image than the background); the seed's correlated patches among the
    ``num_candidates`` with the fewest are the object's seeds; a patch is the object's when its summed similarity to
    them is positive; the box bounds the 4-connected region of such patches that holds the seed."""
    keys = keys.double()
    similarity = keys @ keys.T
    order = (similarity > 0).sum(dim=-1).argsort(stable=True)
    seed, candidates = int(order[0]), order[:num_candidates]
    seeds = candidates[similarity[seed, candidates] > 0]
    mask = (similarity[seeds].sum(dim=0) > 0).view(rows, columns)
    region = _connected_region(mask, divmod(seed, columns))
    found_rows, found_columns = region.nonzero(as_tuple=True)
    return (
        int(found_columns.min()),
        int(found_rows.min()),
        int(found_columns.max()) + 1,
        int(found_rows.max()) + 1,
    )


def _connected_region(mask: torch.Tensor, start: tuple[int, int]) -> torch.Tensor:
    """The 4-connected region of true cells of ``mask`` that holds ``start`` (which is set, as the seed always is)."""
    rows, columns = mask.shape
    cells, region, frontier = mask.tolist(), {start}, [start]
    while frontier:
        row, column = frontier.pop()
        for r, c in ((row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)):
            if 0 <= r < rows and 0 <= c < columns and cells[r][c] and (r, c) not in region:
                region.add((r, c))
                frontier.append((r, c))
    found = torch.zeros_like(mask)
    found[tuple(torch.tensor(sorted(region)).T)] = True
    return found
