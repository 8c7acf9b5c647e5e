"""The data of `ttreg evaluate`: a folder of images, or an ImageFolder split into ``train/`` and ``val/``.

A folder with ``train/`` and ``val/`` subfolders is a split: the probes train on ``train/`` and everything is measured
on ``val/``; when both hold class folders (``val/cat/1.jpg``) it is a classification split. A folder of class folders
alone (``cat/1.jpg``) is labelled images for zero-shot classification. Any other folder is a set of images (searched
recursively) for the outlier and attention measures. The segmentation probe reads a mask per image (`read_mask`).
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TTRegValueError
from ..images import IMAGE_SUFFIXES

SPLITS = ("train", "val")


def image_paths(folder: Path) -> tuple[Path, ...]:
    """The images under ``folder`` (recursively), sorted by path."""
    return tuple(sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))


@dataclass(frozen=True)
class LabelledImages:
    """Images and their class (an index into ``classes``, the sorted class folder names)."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]


def labelled_images(folder: Path, classes: tuple[str, ...] | None = None) -> LabelledImages:
    """The images of ``folder``'s class subfolders; ``classes`` (the training split's) must name every one."""
    found = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise TTRegValueError(
            f"{folder} has classes the training split has not: {', '.join(unknown)}; add them to train/."
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        images = image_paths(folder / name) if (folder / name).is_dir() else ()
        paths.extend(images)
        labels.extend([label] * len(images))
    if not paths:
        raise TTRegValueError(f"No images in the class folders of {folder} (expected {folder}/CLASS/IMAGE).")
    return LabelledImages(tuple(paths), tuple(labels), classes)


@dataclass(frozen=True)
class Dataset:
    """What a data folder holds: the images everything is measured on, their classes (``val``) if they are in class
    folders, and the training split of the probes, if any."""

    folder: Path
    images: tuple[Path, ...]
    train: LabelledImages | None = None
    val: LabelledImages | None = None
    train_images: tuple[Path, ...] = ()

    @property
    def has_split(self) -> bool:
        """Whether ``folder`` is a classification split."""
        return self.train is not None


def read_dataset(folder: str | Path) -> Dataset:
    """The `Dataset` of ``folder`` (see the module's docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Data folder {folder} does not exist; pass a folder of images.")
    if all((folder / split).is_dir() for split in SPLITS):
        train_images, images = image_paths(folder / "train"), image_paths(folder / "val")
        if not train_images or not images:
            raise TTRegValueError(f"{folder}/train and {folder}/val need images (in class folders for the probes).")
        if not all(path.parent.parent.parent == folder for path in train_images + images):
            return Dataset(folder, images, train_images=train_images)
        train = labelled_images(folder / "train")
        if len(train.classes) < 2:
            raise TTRegValueError(
                f"{folder}/train has {len(train.classes)} class folder(s); the probes need at least 2."
            )
        val = labelled_images(folder / "val", train.classes)
        return Dataset(folder, val.paths, train, val, train.paths)
    images = image_paths(folder)
    if not images:
        raise TTRegValueError(f"No images under {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    if all(path.parent.parent == folder for path in images):  # class folders
        labelled = labelled_images(folder)
        return Dataset(folder, labelled.paths, val=labelled)
    return Dataset(folder, images)


def fingerprint(dataset: Dataset) -> str:
    """A short hash of every image's path (relative to the folder) and bytes: which data the numbers are of."""
    digest = hashlib.sha256()
    for path in dataset.train_images + dataset.images:
        digest.update(str(path.relative_to(dataset.folder)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def read_mask(masks: Path, image: Path) -> torch.Tensor:
    """The segmentation mask of ``image``: ``masks/<image stem>.png``, one class id per pixel (255: ignored),
    ``(height, width)``; a palette PNG (as VOC's and ADE20k's) is read by its indices."""
    from PIL import Image

    path = masks / f"{image.stem}.png"
    if not path.is_file():
        raise FileNotFoundError(f"No mask for {image.name}: expected {path} (class ids per pixel, 255 ignored).")
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P"):
            raise TTRegValueError(f"The mask {path} is {mask.mode}; masks hold one class id per pixel (mode L or P).")
        return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(mask.height, mask.width).long()
