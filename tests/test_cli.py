"""The `ttreg` command line: the demo end to end (against the README), inspect, help, exit codes, clear errors."""

import math
import re
from pathlib import Path

import pytest
import torch

from ttreg_cli import CommandError, load_model, main
from ttreg_hf import Dinov2TTRegModel, RegisterNeuronIndex
from ttreg_hf.discovery import find_register_neurons, weights_fingerprint
from ttreg_hf.planted import build_planted_model, planted_index

from family_models import LAYER, NEURONS, SIZE, planted, tiny_images
from support import run_python

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_demo_block() -> list[str]:
    """The lines of the README's fenced block that shows `ttreg demo`'s output."""
    blocks = re.findall(r"^```\w*\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
    return next(block for block in blocks if "Planted neurons recovered" in block).strip().splitlines()


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def assert_same_output(printed: list[str], shown: list[str]) -> None:
    """Same lines, same words; numbers equal to within one unit of their last shown digit or 0.5 % (float sums may
    round differently on another CPU). The run time ("Done in ... s") is not compared."""
    assert len(printed) == len(shown), (printed, shown)
    for actual, expected in zip(printed, shown):
        if expected.startswith("Done in"):
            assert actual.startswith("Done in"), actual
            continue
        assert NUMBER.sub("#", actual) == NUMBER.sub("#", expected), (actual, expected)
        for a, e in zip(NUMBER.findall(actual), NUMBER.findall(expected)):
            unit = 10.0 ** -len(e.partition(".")[2])
            assert math.isclose(float(a), float(e), rel_tol=5e-3, abs_tol=unit), (actual, expected)


def test_demo_prints_what_the_readme_shows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    assert main(["demo"]) == 0
    assert torch.get_num_threads() == threads  # the demo's own thread setting does not leak to its caller
    printed = capsys.readouterr().out.strip().splitlines()
    assert_same_output(printed, readme_demo_block())
    assert sorted(p.name for p in (tmp_path / "ttreg_demo").iterdir()) == ["index.safetensors", "report.png"]
    assert (tmp_path / "ttreg_demo" / "report.png").stat().st_size > 10_000
    assert RegisterNeuronIndex.load(tmp_path / "ttreg_demo" / "index.safetensors").neurons == planted_index()
    assert main(["demo", "--num-images", "8"]) == 2  # the outputs exist: not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.fixture
def planted_index_file(tmp_path):
    model = build_planted_model()
    index = RegisterNeuronIndex(
        planted_index(),
        6,
        384,
        details={"weights_fingerprint": weights_fingerprint(model)},
        checkpoints={"hub": "planted"},
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
    with_index = capsys.readouterr().out
    assert out.is_file() and "register 100.0 %" in with_index
    assert main(["inspect", "planted", str(image_file), "--out", str(out), "--overwrite"]) == 0  # the planted truth
    assert capsys.readouterr().out == with_index


@pytest.mark.parametrize("command", ["find-neurons", "inspect", "demo", "export", "push-index"])
def test_every_subcommand_has_help_with_the_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"ttreg {command}" in printed
    assert "exit status:" in printed and "3  find-neurons, demo: the model has no outlier tokens" in printed


def test_version(capsys):
    from ttreg_hf import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"ttreg_hf {__version__}"


@pytest.fixture
def image_dir(tmp_path):
    from PIL import Image

    from ttreg_hf.planted import textured_images

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(textured_images(4, seed=1)):
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


def test_find_neurons_exit_codes_and_no_progress_bars_off_a_terminal(image_dir, tmp_path, capsys):
    out = tmp_path / "index.safetensors"
    assert main(["find-neurons", "planted", str(image_dir), "--out", str(out), "--threshold", "1e9"]) == 3
    captured = capsys.readouterr()
    assert "No outliers found" in captured.out and not out.exists()
    assert captured.err == ""  # stderr is not a terminal here: no progress bars
    assert main(["find-neurons", "planted", str(image_dir), "--out", str(out), "--top-k", "4"]) == 0
    assert RegisterNeuronIndex.load(out).neurons == planted_index()


def test_a_plain_transformers_dinov2_folder_loads_as_the_package_class(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56)
    ).save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), "cpu", num_test_time_registers=0)
    assert type(model) is Dinov2TTRegModel and model.config.num_hidden_layers == 2


@pytest.fixture
def mistakes(tmp_path, image_dir, image_file, planted_index_file):
    """User mistakes, each ``(argv, words its one-line error must contain)``."""
    from transformers import BertConfig

    images, out = str(image_dir), str(tmp_path / "new.safetensors")
    find = ["find-neurons", "planted", images, "--out", out]
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "existing.png").write_text("x")
    BertConfig(hidden_size=32).save_pretrained(tmp_path / "bert")
    inspect = ["inspect", "planted", str(image_file)]
    large_index = RegisterNeuronIndex({17: [884]}, 24, 4096, checkpoints={"hf": "facebook/dinov2-large"}).save(
        tmp_path / "large.safetensors"
    )
    return [
        (find + ["--calibration-images", "0"], "--calibration-images: must be at least 1, got 0"),
        (find + ["--top-k", "-1"], "--top-k: must be at least 1"),
        (find + ["--top-k", "0"], "--top-k: must be at least 1"),
        (find + ["--num-images", "0"], "--num-images: must be at least 1"),
        (find + ["--batch-size", "0"], "--batch-size"),
        (find + ["--seed", "-3"], "--seed"),
        (find + ["--eval-images", "-1"], "--eval-images: must be at least 0"),
        (find + ["--threshold", "nan"], "--threshold: must be a finite number above 0"),
        (find + ["--threshold", "-2"], "--threshold"),
        (find + ["--image-size", "big"], "'big' is not an integer"),
        (["find-neurons", "planted", str(tmp_path / "nope"), "--out", out], "does not exist"),
        (["find-neurons", "dinov2_vitz99", images, "--out", out], "Unknown model 'dinov2_vitz99'"),
        (["find-neurons", "dinov2_vitb4", images, "--out", out], "did you mean 'dinov2_vitb14'?"),
        (["find-neurons", "dinov2_vitb14_tt_reg", images, "--out", out], "torch.hub entry of 'dinov2_vitb14'"),
        (
            ["find-neurons", str(tmp_path / "bert"), images, "--out", out],
            "'bert' model; folders of these model types load: dinov2",
        ),
        (["find-neurons", str(tmp_path), images, "--out", out], "no config.json"),
        (["find-neurons", "planted", images, "--out", str(tmp_path)], "is a folder"),
        (["find-neurons", "planted", images, "--out", str(tmp_path / "a_file" / "x.safetensors")], "is a file"),
        (["find-neurons", "planted", images, "--out", str(planted_index_file)], "exists; pass --overwrite"),
        (
            inspect + ["--index", str(tmp_path / "corrupt.safetensors"), "--out", str(tmp_path / "r.png")],
            "corrupt.safetensors",
        ),
        (
            inspect + ["--index", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "r.png")],
            "No register-neuron index at",
        ),
        (inspect + ["--out", str(tmp_path / "existing.png")], "exists; pass --overwrite"),
        (["inspect", "planted", str(tmp_path / "no.jpg"), "--out", str(tmp_path / "r.png")], "No image at"),
        (
            ["inspect", "dinov2_vitb14", str(image_file), "--out", str(tmp_path / "r.png")],
            "No register-neuron index is known for 'dinov2_vitb14'",
        ),
        (
            ["demo", "--model", "dinov2_vitl14", "--out-dir", str(tmp_path / "d")],
            "Could not fetch the weights of 'dinov2_vitl14'",
        ),
        (
            ["export", "facebook/dinov2-large", "--index", "dinov2_vitl14", "--out", str(tmp_path / "e")],
            "Could not fetch 'facebook/dinov2-large'",
        ),
        (
            ["export", str(tmp_path / "bert"), "--index", "dinov2_vitl14", "--out", str(tmp_path / "a_file")],
            "is a file",
        ),
        (
            ["export", str(tmp_path / "bert"), "--index", "dinov2_vitl14", "--out", str(tmp_path / "f")],
            "model type 'bert'",
        ),
        (["export", str(tmp_path / "bert"), "--index", "nope", "--out", str(tmp_path / "g")], "nope"),
        (inspect + ["--index", str(large_index), "--out", str(tmp_path / "r.png")], "made for facebook/dinov2-large"),
        (["unknown-command"], "invalid choice"),
    ]


def test_user_mistakes_are_one_line_errors_without_traceback(mistakes, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for argv, expected in mistakes:
        try:
            status = main(argv)
        except SystemExit as exit_info:  # argparse
            status = exit_info.code
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert status == 2, (argv, captured.err)
        assert len(lines) == 1 and "error: " in lines[0] and expected in lines[0], (argv, captured.err)
        assert "Traceback" not in captured.err + captured.out, argv


def test_outputs_are_checked_before_the_model_is_loaded(image_dir, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("ttreg_cli.load_model", no_loading)
    (tmp_path / "taken.safetensors").write_text("x")
    assert main(["find-neurons", "planted", str(image_dir), "--out", str(tmp_path / "taken.safetensors")]) == 2
    assert main(["demo", "--out-dir", str(tmp_path / "taken.safetensors")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(CommandError, match="does not exist") as error:
        main(["--debug", "find-neurons", "planted", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")])
    assert isinstance(error.value.__cause__, FileNotFoundError)  # the file error, chained into the traceback


def test_the_parser_imports_neither_torch_nor_transformers():
    run = run_python(
        "import sys, ttreg_cli\n"
        "ttreg_cli.build_parser().format_help()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy', 'ttreg_hf')))"
    )
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]


def test_import_ttreg_hf_registers_the_classes_with_the_auto_classes(tmp_path):
    """``import ttreg_hf`` alone (no attribute used), then `AutoModel` / `AutoConfig`: the classes are known."""
    from ttreg_hf import Dinov2TTRegConfig

    Dinov2TTRegModel(
        Dinov2TTRegConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, register_neurons={1: [3]}
        )
    ).save_pretrained(tmp_path / "model")
    run = run_python(
        "import ttreg_hf\n"
        "from transformers import AutoConfig, AutoModel\n"
        f"print(type(AutoConfig.from_pretrained({str(tmp_path / 'model')!r})).__name__,"
        f" type(AutoModel.from_pretrained({str(tmp_path / 'model')!r})).__name__)"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["Dinov2TTRegConfig", "Dinov2TTRegModel"]


def tiny_planted_folder(family: str, folder: Path) -> Path:
    """A tiny model of ``family`` with planted register neurons (`tests/family_models.py`), saved to ``folder``."""
    planted(family).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["clip", "siglip", "deit"])
def test_inspect_a_planted_folder_of_each_family_with_the_index_discovery_found(family, tmp_path, capsys):
    from PIL import Image

    from ttreg_hf.planted import textured_images

    folder = tiny_planted_folder(family, tmp_path / family)
    model, _ = load_model(str(folder), "cpu", num_test_time_registers=0)
    classes = {"clip": "CLIPVisionTTRegModel", "siglip": "SiglipVisionTTRegModel", "deit": "DeiTTTRegModel"}
    assert type(model).__name__ == classes[family]
    result = find_register_neurons(model, list(tiny_images(32, seed=0)))
    assert {layer: set(ids) for layer, ids in result.index.neurons.items()} == {LAYER: set(NEURONS)}
    index = result.index.save(tmp_path / "index.safetensors")
    image = tmp_path / "image.png"
    Image.fromarray((textured_images(1, seed=7, size=SIZE)[0].permute(1, 2, 0) * 255).byte().numpy()).save(image)
    out = tmp_path / "report.png"
    assert main(["inspect", str(folder), str(image), "--index", str(index), "--out", str(out)]) == 0
    original, edited = capsys.readouterr().out.splitlines()[:2]

    def outliers(line):
        return int(re.search(r"(\d+) outlier tokens", line).group(1))

    assert original.startswith("original:") and outliers(original) >= 1
    assert edited.startswith("with test-time register:") and outliers(edited) == 0
    assert out.is_file() and out.stat().st_size > 10_000
