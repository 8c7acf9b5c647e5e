"""The data of `ttreg evaluate`: a folder of images, or an ImageFolder split into ``train/`` and ``val/``.

A folder with ``train/`` and ``val/`` subfolders of class folders (``val/cat/1.jpg``) is a classification split: the
probes train on ``train/`` and are measured on ``val/``, as zero-shot classification and the outliers are. A folder of
class folders alone (``cat/1.jpg``) is labelled images for zero-shot classification. Any other folder is a set of
images (searched recursively) for the outlier and attention measures.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

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
        raise ValueError(f"{folder} has classes the training split has not: {', '.join(unknown)}; add them to train/.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        images = image_paths(folder / name) if (folder / name).is_dir() else ()
        paths.extend(images)
        labels.extend([label] * len(images))
    if not paths:
        raise ValueError(f"No images in the class folders of {folder} (expected {folder}/CLASS/IMAGE).")
    return LabelledImages(tuple(paths), tuple(labels), classes)


@dataclass(frozen=True)
class Dataset:
    """What a data folder holds: the images everything is measured on, their classes (``val``) if they are in class
    folders, and the training split of the probes, if any."""

    folder: Path
    images: tuple[Path, ...]
    train: LabelledImages | None = None
    val: LabelledImages | None = None

    @property
    def has_split(self) -> bool:
        return self.train is not None


def read_dataset(folder: str | Path) -> Dataset:
    """The `Dataset` of ``folder`` (see the module's docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Data folder {folder} does not exist; pass a folder of images.")
    if all((folder / split).is_dir() for split in SPLITS):
        train = labelled_images(folder / "train")
        if len(train.classes) < 2:
            raise ValueError(f"{folder}/train has {len(train.classes)} class folder(s); the probes need at least 2.")
        val = labelled_images(folder / "val", train.classes)
        return Dataset(folder, val.paths, train, val)
    images = image_paths(folder)
    if not images:
        raise ValueError(f"No images under {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    if all(path.parent.parent == folder for path in images):  # class folders
        labelled = labelled_images(folder)
        return Dataset(folder, labelled.paths, val=labelled)
    return Dataset(folder, images)


def fingerprint(dataset: Dataset) -> str:
    """A short hash of every image's path (relative to the folder) and bytes: which data the numbers are of."""
    digest = hashlib.sha256()
    paths = dataset.train.paths + dataset.images if dataset.train else dataset.images
    for path in paths:
        digest.update(str(path.relative_to(dataset.folder)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
