"""Images in, pixel values out: folders, files and the normalization each model family expects."""

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_statistics(model: torch.nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    """The mean and std a model's images are normalized with: its own (open_clip towers carry them), OpenAI CLIP's for
    other CLIP families, else ImageNet's."""
    if getattr(model, "image_mean", None) is not None:
        return model.image_mean, model.image_std
    names = f"{getattr(model.config, 'model_type', '')} {type(model).__name__}".lower()
    return (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if "clip" in names else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def default_image_size(model: torch.nn.Module) -> int:
    """The model's image size, but 224 for checkpoints trained at a larger size (DINOv2's 518), as their processors do."""
    size = getattr(model.config, "image_size", None) or model.image_size  # open_clip towers: (height, width)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return size if size <= 336 else 224


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(batch, 3, H, W)`` images in ``[0, 1]`` to normalized pixel values."""
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """One image as ``(3, size, size)`` in ``[0, 1]``: shorter side resized to ``size``, then center-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"No image at {path}; check the path.") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read the image {path} ({error}); remove it or convert it to PNG or JPEG.") from error
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = torch.frombuffer(bytearray(image.crop((left, top, left + size, top + size)).tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1).float() / 255


def _check_readable(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read the image {path} ({error}); remove it or convert it to PNG or JPEG.") from error


class ImageFolder(Sequence[torch.Tensor]):
    """The images of a folder (sorted by name), loaded lazily as normalized ``(3, size, size)`` pixel values."""

    def __init__(self, folder: str | Path, size: int, mean: Sequence[float], std: Sequence[float]):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"Image folder {folder} does not exist; pass a folder of images (JPEG, PNG, ...).")
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"No images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
        for path in self.paths:
            _check_readable(path)
        self.size, self.mean, self.std = size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return normalize(load_image(self.paths[index], self.size).unsqueeze(0), self.mean, self.std)[0]
