"""Register-neuron indices on the Hub: push one alone, load it by repo id (revisions, sub-paths, the cache, offline),
through `huggingface_hub` itself against a local fake Hub (`tests/fake_hub.py`), and the CLI's `push-index`."""

import pytest
import yaml
from huggingface_hub import HfApi, constants

from ttreg_cli import main
from ttreg_hf import Dinov2TTRegModel, RegisterNeuronIndex, RegisterNeuronIndexError, load_index
from ttreg_hf.index import INDEX_FILENAME

from fake_hub import TOKEN
from support import tiny_dinov2_config

pytest_plugins = ["fake_hub"]  # its `hub` fixture


@pytest.fixture
def image_dir(tmp_path):
    """Four generated images, as PNG files."""
    from PIL import Image

    from ttreg_hf.planted import textured_images

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(textured_images(4, seed=2024)):
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


def found_index(**changes) -> RegisterNeuronIndex:
    """An index as `ttreg find-neurons` writes one, for the tiny DINOv2 of `conftest` (3 layers, MLP width 128)."""
    fields = dict(
        neurons={1: [3, 70, 5], 2: [7, 100]},
        num_layers=3,
        mlp_width=128,
        checkpoints={"hub": "dinov2_vits14", "hf": "facebook/dinov2-small"},
        image_size=56,
        source="ttreg find-neurons (ttreg_hf 0.1.0)",
        details={
            "threshold": 41.92,
            "threshold_rule": "automatic: max(median + 6 robust std, 3 x median)",
            "eval_outlier_ratio_before": 0.0283,
            "eval_outlier_ratio_after": 0.0,
            "package_version": "0.1.0",
            "weights_fingerprint": "0123456789abcdef",
        },
    )
    return RegisterNeuronIndex(**{**fields, **changes})


def test_an_index_pushed_alone_loads_by_repo_id_with_its_card(hub):
    index = found_index()
    commit = index.push_to_hub("me/dinov2-small-index")
    assert commit.oid == hub.repos["me/dinov2-small-index"].branches["main"]
    assert set(hub.repos["me/dinov2-small-index"].files_at("main")) == {".gitattributes", INDEX_FILENAME, "README.md"}
    assert load_index("me/dinov2-small-index") == index == RegisterNeuronIndex.from_pretrained("me/dinov2-small-index")
    posts = [auth for method, _, auth in hub.requests if method == "POST"]
    assert posts and all(auth == f"Bearer {TOKEN}" for auth in posts)  # the token `huggingface_hub` found

    card = hub.file("me/dinov2-small-index", "README.md").decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "facebook/dinov2-small" and metadata["library_name"] == "ttreg_hf"
    assert {"ttreg-index", "test-time-registers"} <= set(metadata["tags"])
    for fact in (
        "| 1 | 3, 70, 5 |",  # the neurons
        "hub: `dinov2_vits14`, hf: `facebook/dinov2-small`",  # the checkpoint
        "image size: 56 px",
        "source: ttreg find-neurons (ttreg_hf 0.1.0)",  # how it was found
        "threshold: 41.92 (automatic: max(median + 6 robust std, 3 x median))",
        "2.83 % before, 0.00 % with the edit",
        "found with ttreg_hf 0.1.0",
        'load_tt_model("dinov2_vits14", register_neurons="me/dinov2-small-index")',
        "2506.08010",
    ):
        assert fact in card, fact


def test_revisions_sub_paths_and_folders(hub, tmp_path):
    first, second = found_index(), found_index(neurons={2: [9]}, image_size=112)
    first.push_to_hub("me/idx")
    second.push_to_hub("me/idx", revision="v2")  # a new branch, from main
    main_commit = hub.repos["me/idx"].branches["main"]
    assert load_index("me/idx") == first and load_index("me/idx@main") == first
    assert load_index("me/idx@v2") == second == RegisterNeuronIndex.from_pretrained("me/idx", revision="v2")
    assert load_index(f"me/idx@{main_commit}") == first  # a commit
    assert load_index("hf://me/idx@v2") == second  # the explicit form
    assert load_index(f"{hub.url}/me/idx/blob/v2/{INDEX_FILENAME}") == second  # a web URL of the mirror

    api = HfApi()  # `huggingface_hub` itself puts files where a user might
    api.upload_file(
        path_or_fileobj=second.save(tmp_path / "a.safetensors"), path_in_repo="runs/a.safetensors", repo_id="me/idx"
    )
    api.upload_file(
        path_or_fileobj=second.save(tmp_path / "b.safetensors"),
        path_in_repo=f"at518/{INDEX_FILENAME}",
        repo_id="me/idx",
    )
    assert load_index("me/idx/runs/a.safetensors") == second  # a file
    assert load_index("me/idx/at518") == second  # a folder holding the index file
    assert RegisterNeuronIndex.from_pretrained("me/idx", filename="runs/a.safetensors") == second
    with pytest.raises(RegisterNeuronIndexError, match="'me/idx' at revision 'v2' has no runs/a.safetensors"):
        load_index("me/idx@v2/runs/a.safetensors")  # committed to main only


def test_offline_the_cache_serves_and_a_missing_entry_is_one_clear_error(hub, monkeypatch):
    found_index().push_to_hub("me/idx")
    found_index(image_size=112).push_to_hub("me/idx", revision="v2")
    assert load_index("me/idx") == found_index() and load_index("me/idx@v2").image_size == 112  # cached now
    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load_index("me/idx") == found_index() and load_index("me/idx@v2").image_size == 112
    assert len(hub.requests) == seen  # not one request
    for spec, named in (
        ("me/other", "me/other"),
        ("me/idx@v3", "revision 'v3'"),
        ("me/idx/x.safetensors", "x.safetensors"),
    ):
        with pytest.raises(RegisterNeuronIndexError) as error:
            load_index(spec)
        message = str(error.value)
        assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in message and named in message, message
        assert "hf download" in message and "\n" not in message and error.value.__cause__ is None
    assert len(hub.requests) == seen


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("me/nothing", r"No Hub repository 'me/nothing' at http://127\.0\.0\.1:\d+ \(if it is private, log in"),
        ("me/bare", f"Hub repository 'me/bare' has no {INDEX_FILENAME}: an index repository holds {INDEX_FILENAME}"),
        ("me/bare/sub", f"has no sub/{INDEX_FILENAME}"),
        ("me/bare@v9", "Hub repository 'me/bare' has no revision 'v9'"),
        ("me/bare/weights.safetensors", "has 4096 bytes: an index file has a few kB .*not one"),
    ],
)
def test_missing_repositories_files_and_revisions_are_one_clear_error(hub, monkeypatch, spec, message):
    HfApi().create_repo("me/bare")
    HfApi().upload_file(path_or_fileobj=bytes(4096), path_in_repo="weights.safetensors", repo_id="me/bare")
    monkeypatch.setattr("ttreg_hf.index.MAX_INDEX_FILE_BYTES", 1024)
    with pytest.raises(RegisterNeuronIndexError, match=message) as error:
        load_index(spec)
    assert "\n" not in str(error.value) and error.value.__cause__ is None
    assert not [path for method, path, _ in hub.requests if method == "GET" and "weights" in path]  # never fetched


def test_every_loader_takes_a_repo_id_through_the_one_attach_path(hub, tmp_path):
    index = found_index(checkpoints={}, details={})
    index.push_to_hub("me/idx")
    found_index(neurons={0: [1]}, checkpoints={}, details={}).push_to_hub("me/idx", revision="v2")
    folder = tmp_path / "tiny"
    Dinov2TTRegModel(tiny_dinov2_config(register_neurons=None, num_test_time_registers=0)).save_pretrained(folder)
    model = Dinov2TTRegModel.from_pretrained(folder, register_neurons="me/idx", num_test_time_registers=1)
    assert model.config.register_neuron_index == index.neurons
    assert model.config.register_index_provenance == index.provenance
    model.set_register_neurons("me/idx@v2")
    assert model.config.register_neuron_index == {0: (1,)}


def test_push_index_and_find_neurons_push_to_hub_on_the_command_line(hub, tmp_path, capsys, image_dir):
    file = found_index().save(tmp_path / "index.safetensors")
    assert main(["push-index", str(file), "me/cli-index", "--revision", "exp", "--commit-message", "by hand"]) == 0
    assert f"Pushed the index to me/cli-index (revision exp): {hub.url}/me/cli-index/commit/" in capsys.readouterr().out
    assert load_index("me/cli-index@exp") == found_index()
    with pytest.raises(SystemExit) as exit_info:
        main(["push-index", str(file), "not a repo"])
    assert exit_info.value.code == 2
    assert "argument REPO_ID" in capsys.readouterr().err

    out = tmp_path / "planted.safetensors"
    assert (
        main(
            ["find-neurons", "planted", str(image_dir), "--out", str(out), "--top-k", "4", "--push-to-hub", "me/found"]
        )
        == 0
    )
    assert load_index("me/found") == RegisterNeuronIndex.load(out)
    assert "source: ttreg find-neurons" in hub.file("me/found", "README.md").decode()


def test_inspect_takes_an_index_by_repo_id(hub, tmp_path, capsys, image_dir):
    from ttreg_hf.planted import planted_index

    RegisterNeuronIndex(planted_index(), 6, 384, checkpoints={"hub": "planted"}).push_to_hub("me/planted")
    image = next(image_dir.iterdir())
    assert main(["inspect", "planted", str(image), "--index", "me/planted", "--out", str(tmp_path / "r.png")]) == 0
    assert "with test-time register:" in capsys.readouterr().out
