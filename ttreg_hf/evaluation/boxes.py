"""Object boxes for LOST's CorLoc: Pascal VOC XML or COCO JSON annotations, and the map from a model's patch grid back
to the original image's pixels (through whatever resizing and cropping the checkpoint's preprocessing does)."""

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
from PIL import Image

from ..errors import TTRegValueError
from ..images import Preprocessor


def read_boxes(path: str | Path) -> dict[str, torch.Tensor]:
    """Ground-truth boxes by image file stem, each ``(objects, 4)`` ``(x0, y0, x1, y1)`` in pixels, the ends
    exclusive: a folder of Pascal VOC XML files (one per image, named as the image), or a COCO JSON file (crowd
    regions left out)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.xml"))
        if not files:
            raise TTRegValueError(
                f"No Pascal VOC annotations (*.xml) in {path}; --boxes is such a folder or a COCO JSON file."
            )
        return {file.stem: boxes for file in files if len(boxes := _voc_boxes(file))}
    if path.suffix.lower() != ".json" or not path.is_file():
        raise FileNotFoundError(f"No box annotations at {path}: give a folder of VOC XML files or a COCO JSON file.")
    return _coco_boxes(path)


def _voc_boxes(file: Path) -> torch.Tensor:
    try:
        objects = ElementTree.parse(file).getroot().iter("object")
        boxes = [
            [float(box.find(name).text) for name in ("xmin", "ymin", "xmax", "ymax")]
            for box in (obj.find("bndbox") for obj in objects)
        ]
    except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as error:
        raise TTRegValueError(
            f"Cannot read the VOC annotation {file} ({error}); every object needs a numeric bndbox."
        ) from error
    boxes = torch.tensor(boxes, dtype=torch.float64).view(-1, 4)
    return boxes - torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # VOC counts pixels from 1, inclusive


def _coco_boxes(file: Path) -> dict[str, torch.Tensor]:
    try:
        data = json.loads(file.read_text())
        names = {image["id"]: Path(image["file_name"]).stem for image in data["images"]}
        boxes: dict[str, list] = {}
        for annotation in data["annotations"]:
            if not annotation.get("iscrowd", 0):
                x, y, width, height = annotation["bbox"]
                boxes.setdefault(names[annotation["image_id"]], []).append([x, y, x + width, y + height])
    except (ValueError, KeyError, TypeError) as error:
        raise TTRegValueError(
            f"Cannot read the COCO annotations {file} ({error!r}); expected images and annotations."
        ) from error
    return {name: torch.tensor(found, dtype=torch.float64) for name, found in boxes.items()}


def patch_centers(preprocessor: Preprocessor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Where the center of each patch of the model's ``grid`` (rows, columns) lies in an image of ``size`` (width,
    height): ``(rows, columns, 2)`` pixel ``(x, y)``. Read by running coordinate ramps (x in red, y in green) through
    the preprocessing, so every resize and crop of it is followed; exact to 1/255 of the image side."""
    width, height = size
    x = torch.linspace(0, 255, width).round().byte().expand(height, width)
    y = torch.linspace(0, 255, height).round().byte()[:, None].expand(height, width)
    ramp = Image.fromarray(torch.stack([x, y, torch.zeros_like(x)], dim=-1).numpy())
    inputs = preprocessor([ramp])
    seen = preprocessor.to_images(inputs)[0][:2]
    rows, columns = grid
    side = seen.shape[-2] // rows
    pooled = torch.nn.functional.avg_pool2d(seen[None, :, : rows * side, : columns * side], side)[0]
    return torch.stack([pooled[0] * (width - 1), pooled[1] * (height - 1)], dim=-1)


def box_in_image(box: tuple[int, int, int, int], centers: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A box of patches ``(column0, row0, column1, row1)`` (ends exclusive) in the original image's pixels: from the
    first to the last patch's center, widened by half a patch on each side, within the image."""
    column0, row0, column1, row1 = box
    rows, columns = centers.shape[:2]
    half_x = (centers[0, -1, 0] - centers[0, 0, 0]) / max(columns - 1, 1) / 2
    half_y = (centers[-1, 0, 1] - centers[0, 0, 1]) / max(rows - 1, 1) / 2
    x0, y0 = centers[row0, column0] - torch.stack([half_x, half_y])
    x1, y1 = centers[row1 - 1, column1 - 1] + torch.stack([half_x, half_y])
    width, height = size
    return torch.stack([x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)]).double()
