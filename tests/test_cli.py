"""The `ttreg` command line: the demo end to end, inspect, help, and clear errors."""

import pytest
import torch

from ttreg_hf.cli import main
from ttreg_hf.planted import planted_index, build_planted_model
from ttreg_hf.discovery import weights_fingerprint
from ttreg_hf import RegisterNeuronIndex


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.png"
    threads = torch.get_num_threads()
    assert main(["demo", "--out", str(out), "--num-images", "32"]) == 0
    assert torch.get_num_threads() == threads  # the demo's own thread setting does not leak to its caller
    printed = capsys.readouterr().out
    assert out.stat().st_size > 10_000
    assert "precision 1.00, recall 1.00" in printed
    assert "with test-time register: max/median patch norm 1." in printed


@pytest.fixture
def planted_index_file(tmp_path):
    model = build_planted_model()
    index = RegisterNeuronIndex(
        planted_index(), 6, 384, details={"weights_fingerprint": weights_fingerprint(model)}, checkpoints={"hub": "planted"}
    )
    return index.save(tmp_path / "planted.safetensors")


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    from ttreg_hf.planted import textured_images

    path = tmp_path / "image.png"
    Image.fromarray((textured_images(1, seed=2024)[0].permute(1, 2, 0) * 255).byte().numpy()).save(path)
    return path


def test_inspect_writes_the_figure(tmp_path, planted_index_file, image_file, capsys):
    out = tmp_path / "report.png"
    assert main(["inspect", "planted", str(image_file), "--index", str(planted_index_file), "--out", str(out)]) == 0
    assert out.is_file() and "register 100.0 %" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["find-neurons", "inspect", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"ttreg {command}" in capsys.readouterr().out


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_image_folder(tmp_path, capsys):
    assert "does not exist" in error_of(["find-neurons", "planted", str(tmp_path / "nope"), "--out", "x"], capsys)


def test_unreadable_image(tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    message = error_of(["find-neurons", "planted", str(tmp_path), "--out", "x"], capsys)
    assert "Cannot read the image" in message and "broken.jpg" in message


def test_unknown_model_name(tmp_path, capsys):
    message = error_of(["find-neurons", "dinov2_vitz99", str(tmp_path), "--out", "x"], capsys)
    assert "Unknown model 'dinov2_vitz99'" in message and "dinov2_vitl14" in message


def test_index_for_another_checkpoint(tmp_path, image_file, capsys):
    other = RegisterNeuronIndex({17: [884]}, 24, 4096, checkpoints={"hf": "facebook/dinov2-large"})
    path = other.save(tmp_path / "large.safetensors")
    message = error_of(["inspect", "planted", str(image_file), "--index", str(path)], capsys)
    assert "facebook/dinov2-large" in message
