"""Images in, pixel values out: folders, files and the normalization each model family expects."""

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

if TYPE_CHECKING:
    from PIL import Image

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
    from PIL import Image

    image = open_rgb(path)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = torch.frombuffer(bytearray(image.crop((left, top, left + size, top + size)).tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1).float() / 255


def open_rgb(path: str | Path) -> "Image.Image":
    """The image at ``path`` as 8-bit RGB, the way a viewer shows it: EXIF orientation applied; 16-bit grey (and
    32-bit integer grey within 0..65535) scaled to 8 bits (65535 -> 255); transparency composited on white, as
    `transformers`' image processors do. Float images (mode ``F``) have no range to scale by and are refused."""
    from PIL import ImageOps

    with _open(path) as image:
        try:
            return _to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError) as error:  # truncated data shows only while decoding; modes PIL cannot convert
            raise _unreadable(path, error) from error


def _to_rgb(image: "Image.Image") -> "Image.Image":
    from PIL import Image

    if image.mode == "F":
        raise ValueError("its pixels are floats (mode F), which have no fixed range; save it with 8 or 16 bits")
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = image.convert("I")
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            raise ValueError(f"its 32-bit pixels span {low}..{high}, outside the 16-bit range 0..65535")
        image = image.point(lambda value: value / 257 + 0.5).convert("L")  # 65535 -> 255, rounded
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _unreadable(path: str | Path, error: Exception) -> ValueError:
    return ValueError(f"Cannot read the image {path} ({error}); remove it or convert it to PNG or JPEG.")


def _open(path: str | Path) -> "Image.Image":
    """PIL's lazily decoded image at ``path``; a decompression bomb (PIL's warning as much as its error) is refused."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"No image at {path}; check the path.") from error
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(
                f"Refusing the image {path}: {error} Downscale it, or raise `PIL.Image.MAX_IMAGE_PIXELS` (now "
                f"{Image.MAX_IMAGE_PIXELS}) if you trust the file."
            ) from error
        except (UnidentifiedImageError, OSError) as error:
            raise _unreadable(path, error) from error


def _check_readable(path: Path) -> None:
    with _open(path) as image:
        try:
            image.verify()
        except (OSError, SyntaxError) as error:
            raise _unreadable(path, error) from error


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
