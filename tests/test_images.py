"""Image files in every mode PIL opens load as the RGB a viewer shows; unreadable and oversized files are clear errors."""

import pytest
import torch

from ttreg_hf.images import ImageFolder, load_image, statistics_preprocessor

Image = pytest.importorskip("PIL.Image")


def loaded(path, size=4):
    """``load_image`` as 0..255 values (the test images are ``size`` square: no resampling)."""
    return (load_image(path, size) * 255).round().to(torch.int64)


def rgb(*pixel):
    return torch.tensor(pixel).view(3, 1, 1)


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_grey_is_copied_to_every_channel(tmp_path):
    path = save(Image.new("L", (4, 4), 77), tmp_path / "grey.png")
    assert torch.equal(loaded(path), torch.full((3, 4, 4), 77))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = [0, 128, 257, 1000, 12345, 32767, 40000, 65535] * 2
    image = Image.new("I;16", (4, 4))
    image.putdata(values)
    path = save(image, tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    expected = torch.tensor([round(v / 257) for v in values]).view(1, 4, 4).expand(3, 4, 4)
    assert torch.equal(loaded(path), expected)  # not 255 for every value above 255


def test_32_bit_grey_in_the_16_bit_range_is_scaled_and_beyond_it_refused(tmp_path):
    path = save(Image.new("I", (4, 4), 65535), tmp_path / "int.tif")
    assert Image.open(path).mode == "I" and torch.equal(loaded(path), torch.full((3, 4, 4), 255))
    negative = save(Image.new("I", (4, 4), -5), tmp_path / "negative.tif")
    with pytest.raises(ValueError, match=r"negative.tif \(its 32-bit pixels span -5..-5, outside the 16-bit range"):
        load_image(negative, 4)


def test_float_images_are_refused(tmp_path):
    path = save(Image.new("F", (4, 4), 0.5), tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float.tif \(its pixels are floats \(mode F\)"):
        load_image(path, 4)


def test_palette_with_a_transparent_entry(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    path = save(image, tmp_path / "palette.png")
    assert torch.equal(loaded(path)[:, 0, 0], torch.tensor([10, 20, 30]))
    assert torch.equal(loaded(path)[:, 3, 3], torch.tensor([200, 100, 0]))
    transparent = save(image, tmp_path / "palette_transparent.png", transparency=0)
    assert torch.equal(loaded(transparent)[:, 0, 0], torch.tensor([255, 255, 255]))  # composited on white
    assert torch.equal(loaded(transparent)[:, 3, 3], torch.tensor([200, 100, 0]))


@pytest.mark.parametrize(
    ("mode", "pixel", "expected"),
    [
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (255, 0, 0, 128), (255, 127, 127)),  # half-transparent red over white
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # fully transparent black is white, not black
        ("LA", (100, 255), (100, 100, 100)),
        ("LA", (0, 0), (255, 255, 255)),
    ],
)
def test_alpha_is_composited_on_white(tmp_path, mode, pixel, expected):
    path = save(Image.new(mode, (4, 4), pixel), tmp_path / "alpha.png")
    assert torch.equal(loaded(path), rgb(*expected).expand(3, 4, 4))


@pytest.mark.parametrize(
    ("cmyk", "expected"),
    [((255, 0, 0, 0), (0, 255, 255)), ((0, 0, 0, 0), (255, 255, 255)), ((0, 255, 255, 0), (255, 0, 0))],
)
def test_cmyk(tmp_path, cmyk, expected):
    path = save(Image.new("CMYK", (4, 4), cmyk), tmp_path / "print.tif")
    assert torch.equal(loaded(path), rgb(*expected).expand(3, 4, 4))
    jpeg = save(Image.new("CMYK", (16, 16), cmyk), tmp_path / "print.jpg", quality=100)
    assert (loaded(jpeg, 16) - rgb(*expected)).abs().max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 16))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: red on top, blue below
    path = save(image, tmp_path / "phone.jpg", exif=exif, quality=100)
    pixels = loaded(path, 16)  # the center 16x16 of the upright 16x32 image
    assert (pixels[:, :6] - rgb(255, 0, 0)).abs().max() <= 3
    assert (pixels[:, 10:] - rgb(0, 0, 255)).abs().max() <= 3


@pytest.mark.parametrize("pixels", [144, 256])  # over the limit (PIL warns), over twice the limit (PIL raises)
def test_a_decompression_bomb_is_one_clear_error(tmp_path, monkeypatch, pixels):
    side = int(pixels**0.5)
    path = save(Image.new("RGB", (side, side)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    message = rf"Refusing the image {path}: Image size \({pixels} pixels\) exceeds limit of \d+ pixels.*MAX_IMAGE_PIXELS` \(now 100\)"
    with pytest.raises(ValueError, match=message) as error:
        load_image(path, 8)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message):
        ImageFolder(tmp_path, statistics_preprocessor(8, (0, 0, 0), (1, 1, 1), "identity"))


def test_broken_files_are_one_clear_error(tmp_path):
    good = save(Image.new("RGB", (64, 64), (9, 9, 9)), tmp_path / "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.png").write_text("not an image")
    for path in (truncated, tmp_path / "text.png"):
        with pytest.raises(ValueError, match=f"Cannot read the image {path}.*convert it to PNG or JPEG"):
            load_image(path, 8)
    with pytest.raises(FileNotFoundError, match="No image at"):
        load_image(tmp_path / "missing.png", 8)
