"""Images in, model inputs out: files and folders read as a viewer shows them, and each checkpoint's own
preprocessing (its image processor, open_clip's transform, timm's data config) turning them into model inputs."""

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import TTRegValueError

if TYPE_CHECKING:
    from PIL import Image

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
Inputs = dict[str, torch.Tensor]
# SigLIP2 NaFlex's processors give each image's patch rows and columns under this key, its patches padded to one length
GRID_SHAPES = "spatial_shapes"


def patch_grids(inputs: Mapping[str, torch.Tensor], num_patches: int | None = None) -> list[tuple[int, int]]:
    """Each image's patch grid (rows, columns): a NaFlex image's own (`GRID_SHAPES`; its patches are the first rows x
    columns of the padded ones), else the square grid of ``num_patches`` patches. Read on the host."""
    if GRID_SHAPES in inputs:
        return [tuple(shape) for shape in inputs[GRID_SHAPES].tolist()]
    return [(math.isqrt(num_patches),) * 2] * len(inputs["pixel_values"])


@dataclass(frozen=True)
class Preprocessor:
    """Turns images into a model's inputs as its checkpoint's own preprocessing does.

    description: where the preprocessing comes from (for messages and reports).
    process: a list of RGB PIL images -> the batched keyword inputs (``pixel_values``, and for SigLIP2's NaFlex
        ``pixel_attention_mask`` and ``spatial_shapes``).
    mean, std: the normalization, undone by `to_images` to show what the model sees.
    """

    description: str
    process: Callable[[list["Image.Image"]], Inputs]
    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, images: Sequence["Image.Image"]) -> Inputs:
        return self.process(list(images))

    def one(self, image: "Image.Image") -> torch.Tensor | Inputs:
        """One image's inputs without the batch dimension: its ``pixel_values``, or a dict when there are more."""
        inputs = {key: value[0] for key, value in self([image]).items()}
        return inputs["pixel_values"] if inputs.keys() == {"pixel_values"} else inputs

    def to_images(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The images the model sees, each ``(3, H, W)`` in ``[0, 1]`` (patchified NaFlex inputs reassembled)."""
        pixel_values = inputs["pixel_values"].float()
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        if GRID_SHAPES not in inputs:
            return [(image * std + mean).clamp(0, 1) for image in pixel_values]
        images = []
        for patches, (rows, columns) in zip(pixel_values, patch_grids(inputs)):
            side = int((patches.shape[-1] // 3) ** 0.5)  # channel-last patches of side x side pixels
            grid = patches[: rows * columns].view(rows, columns, side, side, 3).permute(4, 0, 2, 1, 3)
            images.append((grid.reshape(3, rows * side, columns * side) * std + mean).clamp(0, 1))
        return images


def image_processor_preprocessor(processor, description: str, image_size: int | None = None) -> Preprocessor:
    """A `transformers` image processor as a `Preprocessor`; ``image_size`` resizes to that square crop, keeping
    the processor's resize-to-crop ratio, resampling and normalization."""
    overrides = _size_overrides(processor, image_size) if image_size else {}

    def process(images: list["Image.Image"]) -> Inputs:
        return dict(processor(images, return_tensors="pt", **overrides))

    return Preprocessor(description, process, tuple(processor.image_mean), tuple(processor.image_std))


def _size_overrides(processor, image_size: int) -> dict:
    if getattr(processor, "max_num_patches", None) is not None:
        raise TTRegValueError(
            f"{type(processor).__name__} sizes each image by its number of patches (max_num_patches="
            f"{processor.max_num_patches}), not by an image size: leave the image size to the processor."
        )
    size, crop = dict(processor.size), getattr(processor, "crop_size", None)
    crop_side = crop["height"] if crop and getattr(processor, "do_center_crop", False) else None
    if crop_side:  # every bound of the resize (shortest edge, height and width, max sides) scaled as the crop
        size = {key: round(value * image_size / crop_side) for key, value in size.items()}
    elif "shortest_edge" in size:
        size = {"shortest_edge": image_size}
    else:
        size = {"height": image_size, "width": image_size}
    return {"size": size, **({"crop_size": {"height": image_size, "width": image_size}} if crop_side else {})}


def transform_preprocessor(transform: Callable, description: str, mean, std) -> Preprocessor:
    """A per-image torchvision transform (open_clip's, timm's) as a `Preprocessor`."""

    def process(images: list["Image.Image"]) -> Inputs:
        return {"pixel_values": torch.stack([transform(image) for image in images])}

    return Preprocessor(description, process, tuple(mean), tuple(std))


def statistics_preprocessor(image_size: int, mean, std, description: str) -> Preprocessor:
    """Resize the shorter side to ``image_size`` (bicubic), center-crop a square, normalize with ``mean`` and
    ``std``: hand-written preprocessing, for the planted model and as a fallback that says so."""

    def process(images: list["Image.Image"]) -> Inputs:
        return {"pixel_values": normalize(torch.stack([crop(image, image_size) for image in images]), mean, std)}

    return Preprocessor(description, process, tuple(mean), tuple(std))


def transformers_preprocessing(
    model: torch.nn.Module, source, image_size: int | None, default_image_processor: Callable, family_name: str
) -> Preprocessor:
    """The preprocessing of a `transformers` family's checkpoint: the image processor of ``source`` (a folder or a
    Hub id; `AutoImageProcessor`, never remote code), or the one ``source()`` returns (the processor a checkpoint's
    authors document). Without one — a folder saved without ``preprocessor_config.json``, an id not cached offline —
    the family's ``default_image_processor(model.config)``, with a warning that names it."""
    from transformers import AutoImageProcessor

    if callable(source):
        processor = source()
        return image_processor_preprocessor(processor, f"{type(processor).__name__} (the checkpoint's)", image_size)
    if source:
        saved = Path(source) / PREPROCESSOR_FILE
        try:
            processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as error:
            if saved.is_file():  # there, but unreadable: an error, never a silent fallback
                raise TTRegValueError(
                    f"Cannot read the image processor {saved} ({error}); fix or remove it."
                ) from error
        else:
            return image_processor_preprocessor(processor, f"{source}'s {type(processor).__name__}", image_size)
    processor = default_image_processor(model.config)
    description = f"the {family_name} default {type(processor).__name__}"
    warnings.warn(
        f"{source or 'This model'} has no image processor ({PREPROCESSOR_FILE}) that could be loaded; using "
        f"{description} (mean {list(processor.image_mean)}, std {list(processor.image_std)}): check that it fits the "
        "weights, or save the checkpoint's processor beside it.",
        stacklevel=2,
    )
    return image_processor_preprocessor(processor, description, image_size)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(batch, 3, H, W)`` images in ``[0, 1]`` to normalized pixel values."""
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def crop(image: "Image.Image", size: int) -> torch.Tensor:
    """``image`` as ``(3, size, size)`` in ``[0, 1]``: shorter side resized to ``size`` (bicubic), center-cropped."""
    from PIL import Image

    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = torch.frombuffer(bytearray(image.crop((left, top, left + size, top + size)).tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1).float() / 255


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """The image at ``path`` (`open_rgb`) as ``(3, size, size)`` in ``[0, 1]`` (`crop`)."""
    return crop(open_rgb(path), size)


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
        raise TTRegValueError("its pixels are floats (mode F), which have no fixed range; save it with 8 or 16 bits")
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = image.convert("I")
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            raise TTRegValueError(f"its 32-bit pixels span {low}..{high}, outside the 16-bit range 0..65535")
        image = image.point(lambda value: value / 257 + 0.5).convert("L")  # 65535 -> 255, rounded
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _unreadable(path: str | Path, error: Exception) -> TTRegValueError:
    return TTRegValueError(f"Cannot read the image {path} ({error}); remove it or convert it to PNG or JPEG.")


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
            raise TTRegValueError(
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


class ImageFolder(Sequence[torch.Tensor | Inputs]):
    """The images of a folder (sorted by name), each loaded when indexed and turned into one image's model inputs by
    ``preprocessor`` (`Preprocessor.one`): its ``pixel_values``, or a dict of its inputs (SigLIP2's NaFlex)."""

    def __init__(self, folder: str | Path, preprocessor: Preprocessor):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"Image folder {folder} does not exist; pass a folder of images (JPEG, PNG, ...).")
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise TTRegValueError(f"No images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
        for path in self.paths:
            _check_readable(path)
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | Inputs:
        return self.preprocessor.one(open_rgb(self.paths[index]))
