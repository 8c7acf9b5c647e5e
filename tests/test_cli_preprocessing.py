"""The CLI's ``--image-size`` on a checkpoint's own image processor: the new crop size, with the processor's
resize-to-crop ratio, resampling and statistics kept, against the same processor class configured by hand."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BitImageProcessor, ViTImageProcessor
from transformers.image_utils import PILImageResampling

from ttreg_cli import load_model
from ttreg_hf import Dinov2TTRegModel

from support import tiny_dinov2_config

STATISTICS = dict(image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3])  # no family's default: the checkpoint's
# the checkpoint's processor, and what it must become at --image-size 112
PROCESSORS = {
    "resize-256-crop-224": (  # DINOv2's: the shorter side to 256, then the central 224 (ratio 8/7)
        BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
            resample=PILImageResampling.BICUBIC, **STATISTICS,
        ),
        BitImageProcessor(
            size={"shortest_edge": 128}, crop_size={"height": 112, "width": 112}, do_center_crop=True,
            resample=PILImageResampling.BICUBIC, **STATISTICS,
        ),
    ),
    "fit-256-crop-224": (  # fit within 256 x 256 (aspect kept), then the central 224: ratio 8/7 again
        BitImageProcessor(
            size={"max_height": 256, "max_width": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
            resample=PILImageResampling.BICUBIC, **STATISTICS,
        ),
        BitImageProcessor(
            size={"max_height": 128, "max_width": 128}, crop_size={"height": 112, "width": 112}, do_center_crop=True,
            resample=PILImageResampling.BICUBIC, **STATISTICS,
        ),
    ),
    "resize-to-224": (  # ViT's: a square resize, no crop
        ViTImageProcessor(size={"height": 224, "width": 224}, **STATISTICS),
        ViTImageProcessor(size={"height": 112, "width": 112}, **STATISTICS),
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def picture():
    """A 3:2 picture: a resize-then-crop and a plain resize of it differ everywhere."""
    return Image.fromarray((np.random.RandomState(0).rand(150, 225, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("name", PROCESSORS)
def test_image_size_keeps_the_checkpoints_resize_to_crop_ratio(name, picture, tmp_path):
    saved, expected = PROCESSORS[name]
    Dinov2TTRegModel(tiny_dinov2_config(num_test_time_registers=0)).save_pretrained(tmp_path)
    saved.save_pretrained(tmp_path)
    _, preprocessor = load_model(str(tmp_path), "cpu", image_size=112, num_test_time_registers=0)
    pixels = preprocessor([picture])["pixel_values"]
    assert pixels.shape == (1, 3, 112, 112)
    assert torch.equal(pixels, expected([picture], return_tensors="pt")["pixel_values"])
    assert (preprocessor.mean, preprocessor.std) == (tuple(STATISTICS["image_mean"]), tuple(STATISTICS["image_std"]))


def test_a_weights_folder_brings_its_own_image_processor(tmp_path):
    """A named checkpoint loaded from a local --weights folder is preprocessed as that folder's processor says."""
    from transformers import ViTConfig

    from ttreg_hf import ViTTTRegModel

    arch = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16)
    ViTTTRegModel(ViTConfig(**arch, image_size=64)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 64, "width": 64}, **STATISTICS).save_pretrained(tmp_path)
    name = "vit_base_patch16_224_in21k"
    _, preprocessor = load_model(name, "cpu", weights=str(tmp_path), image_size=32, num_test_time_registers=0)
    assert (preprocessor.mean, preprocessor.std) == (tuple(STATISTICS["image_mean"]), tuple(STATISTICS["image_std"]))
    assert preprocessor([Image.new("RGB", (48, 48))])["pixel_values"].shape == (1, 3, 32, 32)
