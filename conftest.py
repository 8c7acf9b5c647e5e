"""Every Python and shell block of README.md and docs/*.md runs as a test (Sybil), offline.

The blocks of one page share one namespace and one working folder, as a reader's session would. They run against
the `docs_world` fixture: a fake Hugging Face Hub (`tests/fake_hub.py`) that serves tiny random models under the real
repository ids the pages name (``facebook/dinov2-large`` ...), a working folder holding the files the pages read
(``photo.jpg``, ``images/``, a clone of this repository as ``ttreg_hf/``), and ``HF_HUB_OFFLINE`` lifted for the fake
Hub only. A block that cannot run so is preceded by ``<!-- skip: next "why" -->``, which the rendered page hides and
the page's source shows.

Shell blocks run each command in this process: ``ttreg ARGS`` is ``ttreg_cli.main(ARGS)`` and must exit 0; any other
command fails the block (mark it skipped, with the reason).
"""

import os
import re
import shlex
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # as tests/conftest.py: nothing reaches the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

try:
    from sybil import Sybil
    from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser
except ImportError:  # an environment without the test extra: each page is one skipped test that says so
    Sybil = None

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))  # fake_hub, as the tests import it

PAGES = ["README.md", "docs/*.md", "docs/*/*.md"]


def run_shell_block(example) -> None:
    from ttreg_cli import main

    for command in example.parsed.replace("\\\n", " ").splitlines():
        words = shlex.split(command, comments=True)
        if not words:
            continue
        if words[0] == "ttreg":
            args = words[1:]
        elif words[:3] == ["python", "-m", "ttreg_cli"]:
            args = words[3:]
        else:
            raise ValueError(f'cannot run {command!r} here: mark the block <!-- skip: next "why" -->')
        status = main(args)
        assert status == 0, f"{command!r} exited {status}"


class _NoSybil(pytest.Item):
    def runtest(self) -> None:
        pytest.skip("the code blocks of the docs run with sybil: pip install -e '.[test]'")


class _PageWithoutSybil(pytest.File):
    def collect(self):
        yield _NoSybil.from_parent(self, name="code blocks")


def _collect_without_sybil(file_path: Path, parent):
    if any(file_path.match(pattern) for pattern in PAGES) and file_path.is_relative_to(ROOT):
        return _PageWithoutSybil.from_parent(parent, path=file_path)
    return None


if Sybil is None:
    pytest_collect_file = _collect_without_sybil
else:
    pytest_collect_file = Sybil(
        parsers=[
            PythonCodeBlockParser(),
            CodeBlockParser("bash", run_shell_block),
            SkipParser(),
        ],
        patterns=PAGES,
        fixtures=["docs_world"],
    ).pytest()


def _tiny_dinov2(num_hidden_layers: int, mlp_width: int):
    """A random DINOv2 of the real depth and MLP width (what an index is checked against), 32 channels wide."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        mlp_ratio=mlp_width // 32,
        image_size=518,
        patch_size=14,
    )
    return Dinov2Model(config).eval()


def _dinov2_processor():
    from transformers import BitImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return BitImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


def _repo_files(model, processor, folder: Path) -> dict[str, bytes]:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def _write_images(folder: Path, count: int, seed: int) -> None:
    from PIL import Image

    from ttreg_hf.planted import textured_images

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(textured_images(count, seed=seed)):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i}.png")


@pytest.fixture(scope="session")
def _docs_hub(tmp_path_factory):
    """The fake Hub with the pages' models: ``facebook/dinov2-large`` (random, the real depth and MLP width, so the
    shipped index attaches) and ``facebook/dinov2-base`` (the planted model: register neurons to find)."""
    from transformers import Dinov2Config, Dinov2Model

    from ttreg_hf.planted import build_planted_model

    from fake_hub import FakeHub, FakeRepo

    build = tmp_path_factory.mktemp("docs-hub-repos")
    planted_settings = build_planted_model().config.to_dict()
    plain = Dinov2Config(**{key: planted_settings[key] for key in Dinov2Config().to_dict() if key in planted_settings})
    planted = Dinov2Model(plain)  # a parent checkpoint, as the Hub holds them
    planted.load_state_dict(build_planted_model().state_dict())
    models = {
        "facebook/dinov2-large": (_tiny_dinov2(24, 4096), _dinov2_processor()),
        "facebook/dinov2-base": (planted.eval(), _dinov2_processor()),
    }
    with FakeHub() as hub:
        for repo_id, (model, processor) in models.items():
            hub.repos[repo_id] = FakeRepo()
            hub.repos[repo_id].commit("main", _repo_files(model, processor, build / repo_id), "upload")
        hub.cache = tmp_path_factory.mktemp("docs-hub-cache")  # one download cache for every page
        yield hub


@pytest.fixture(scope="module")
def docs_world(_docs_hub, tmp_path_factory, request):
    """One page's session: a fresh working folder with ``photo.jpg``, ``images/`` (32 images), ``ttreg_hf/`` (this
    repository, for ``torch.hub.load("ttreg_hf", ..., source="local")``) and ``dinov2-base.safetensors`` (the index
    ``ttreg find-neurons facebook/dinov2-base images/`` finds, unless the page makes it), with the fake Hub as
    `huggingface_hub`'s endpoint (as the `hub` fixture of tests/fake_hub.py sets it) for the page's blocks only."""
    import transformers.utils.hub
    from huggingface_hub import constants, hf_api
    from PIL import Image

    from ttreg_hf import RegisterNeuronIndex
    from ttreg_hf.planted import planted_config, planted_index, textured_images

    from fake_hub import TOKEN

    folder = tmp_path_factory.mktemp("page")
    config = planted_config()
    if not re.search(r"^ttreg find-neurons .* --out dinov2-base.safetensors", request.path.read_text(), re.MULTILINE):
        RegisterNeuronIndex(
            planted_index(), config.num_hidden_layers, config.mlp_width, checkpoints={"hub": "facebook/dinov2-base"}
        ).save(folder / "dinov2-base.safetensors")
    _write_images(folder / "images", 32, seed=0)
    picture = textured_images(1, seed=2024)[0].permute(1, 2, 0)
    Image.fromarray((picture * 255).round().byte().numpy()).save(folder / "photo.jpg")
    (folder / "ttreg_hf").symlink_to(ROOT, target_is_directory=True)
    hub = _docs_hub
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", hub.url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(hf_api.api, "endpoint", hub.url)
        patch.setattr(transformers.utils.hub, "_hf_api", None)
        patch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
        patch.setenv("NO_PROXY", "127.0.0.1")
        patch.setenv("HF_TOKEN", TOKEN)  # as `hf auth login` would: the pages push to the fake Hub
        patch.chdir(folder)
        yield hub
