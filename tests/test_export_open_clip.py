"""OpenCLIP exports: open_clip's own layout plus the index, loaded by open_clip itself (registers off, bit-equal) and by
our `create_model_and_transforms` (the repository's index found by default), from a folder and from a fake Hub."""

import copy
import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from open_clip.constants import HF_SAFE_WEIGHTS_NAME
from open_clip.transformer import QuickGELU
from safetensors.torch import load_file, save_file

from ttreg_cli import main
from ttreg_hf import RegisterIndexMismatchWarning, RegisterNeuronIndex, RegisterNeuronIndexError, load_index
from ttreg_hf.export import ExportError, export_model
from ttreg_hf.export_open_clip import OPEN_CLIP_EXPORTED_FILES, _named_config, export_open_clip
from ttreg_hf.modeling.open_clip import create_model_and_transforms, to_test_time_registers

TINY = "ttreg-export-tiny"
TINY_CONFIG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=3, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
)
pytest_plugins = ["fake_hub"]  # its `hub` fixture
NEURONS = {1: [3, 127, 5], 2: [7]}
SETTINGS = dict(num_test_time_registers=2, register_scale=[1.0, -0.5], register_patch_mode="mean")


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    """A tiny architecture registered with open_clip the public way (a folder of model-config JSON files)."""
    folder = tmp_path_factory.mktemp("open_clip_export_configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)


@pytest.fixture(scope="module")
def exported(tiny_config, tmp_path_factory):
    """``(base model, index, export folder)``: random tiny weights saved as an open_clip checkpoint file, exported
    by name with that file as ``pretrained``."""
    root = tmp_path_factory.mktemp("open_clip_export")
    base = open_clip.create_model(TINY).eval()
    save_file(base.state_dict(), root / "weights.safetensors")
    index = RegisterNeuronIndex(
        neurons=NEURONS, num_layers=3, mlp_width=128, checkpoints={"open_clip": TINY}, image_size=32, source="test"
    )
    index.save(root / "index.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegisterIndexMismatchWarning)  # found for TINY, loaded as "TINY (file)"
        out = export_open_clip(
            TINY, root / "index.safetensors", root / "out", pretrained=str(root / "weights.safetensors"), repo_id="me/t"
        )
    return base, index, out


@pytest.fixture
def inputs():
    return torch.randn(3, 3, 32, 32) * torch.linspace(0.5, 2.0, 3).view(3, 1, 1, 1), torch.randint(0, 100, (4, 8))


def _outputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    images, text = inputs
    with torch.no_grad():
        return model.eval().encode_image(images), model.encode_text(text)


def test_the_folder_is_open_clips_layout_with_the_index_and_a_card(exported):
    base, index, out = exported
    assert {path.name for path in out.iterdir()} == OPEN_CLIP_EXPORTED_FILES
    assert open_clip.get_model_config(f"local-dir:{out}") == open_clip.get_model_config(TINY)
    weights = load_file(out / "open_clip_model.safetensors")
    assert weights.keys() == base.state_dict().keys()
    assert all(torch.equal(tensor, base.state_dict()[name]) for name, tensor in weights.items())
    assert RegisterNeuronIndex.from_pretrained(out) == index == load_index(str(out))
    card = (out / "README.md").read_text()
    for expected in ("library_name: open_clip", "| 1 | 3, 127, 5 |", 'create_model_and_transforms("hf-hub:me/t")'):
        assert expected in card, expected


def test_open_clip_loads_the_base_model_and_we_load_it_with_the_folders_index(exported, inputs):
    base, index, out = exported
    theirs, _, their_preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegisterIndexMismatchWarning)  # the folder's own index: no mismatch
        ours, _, our_preprocess = create_model_and_transforms(f"local-dir:{out}")
        off, _, _ = create_model_and_transforms(f"local-dir:{out}", num_test_time_registers=0)
    assert ours.visual.config.register_neuron_index == index.neurons
    assert ours.visual.config.register_index_provenance == index.provenance
    expected = _outputs(to_test_time_registers(copy.deepcopy(base), index), inputs)
    for actual, wanted in zip(_outputs(ours, inputs), expected, strict=True):
        assert torch.equal(actual, wanted)
    for actual, wanted, plain in zip(_outputs(off, inputs), _outputs(theirs, inputs), _outputs(base, inputs)):
        assert torch.equal(actual, wanted) and torch.equal(wanted, plain)
    assert not torch.allclose(_outputs(ours, inputs)[0], _outputs(base, inputs)[0], atol=1e-3)
    as_json = [json.dumps(model.visual.preprocess_cfg, sort_keys=True) for model in (theirs, base, ours)]
    assert as_json[0] == as_json[1] == as_json[2]  # JSON's lists for the base's tuples
    assert str(their_preprocess) == str(our_preprocess)


def test_through_the_hub_open_clip_and_we_load_the_export(exported, inputs, hub):
    base, index, out = exported
    api = HfApi()
    api.create_repo("me/tiny-ttreg")
    api.upload_folder(repo_id="me/tiny-ttreg", folder_path=out)
    theirs, _, _ = open_clip.create_model_and_transforms("hf-hub:me/tiny-ttreg")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegisterIndexMismatchWarning)
        ours, _, _ = create_model_and_transforms("hf-hub:me/tiny-ttreg")
        off, _, _ = create_model_and_transforms("hf-hub:me/tiny-ttreg", num_test_time_registers=0)
    assert ours.visual.config.register_neuron_index == index.neurons and load_index("me/tiny-ttreg") == index
    expected = _outputs(to_test_time_registers(copy.deepcopy(base), index), inputs)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(ours, inputs), expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(off, inputs), _outputs(theirs, inputs), strict=True))
    # a repository without an index: the base model with registers off, the usual error with them on
    api.create_repo("me/plain")
    api.upload_folder(repo_id="me/plain", folder_path=out, ignore_patterns=["register_neurons.safetensors"])
    plain, _, _ = create_model_and_transforms("hf-hub:me/plain", num_test_time_registers=0)
    assert torch.equal(_outputs(plain, inputs)[0], _outputs(base, inputs)[0])
    with pytest.raises(RegisterNeuronIndexError, match="No register-neuron index is known for 'hf-hub:me/plain'"):
        create_model_and_transforms("hf-hub:me/plain")


def test_the_cached_snapshot_of_an_hf_hub_model_is_refused_as_out(exported, hub):
    _, index, out = exported
    HfApi().create_repo("me/tiny-ttreg")
    HfApi().upload_folder(repo_id="me/tiny-ttreg", folder_path=out)
    snapshot = Path(hf_hub_download("me/tiny-ttreg", HF_SAFE_WEIGHTS_NAME)).parent
    before = {path.name: path.read_bytes() for path in snapshot.iterdir()}
    with pytest.raises(ExportError, match="is in the Hugging Face cache"):
        export_open_clip("hf-hub:me/tiny-ttreg", index, snapshot, overwrite=True)
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == before


def test_a_loaded_model_exports_its_settings_and_the_config_must_rebuild_it(exported, inputs, tmp_path):
    base, index, _ = exported
    model = to_test_time_registers(copy.deepcopy(base), index, **SETTINGS)
    out = export_open_clip(model, index, tmp_path / "settings", model_config=TINY)
    assert (
        "num_test_time_registers=2, register_scale=[1.0, -0.5], register_patch_mode='mean')"
        in (out / "README.md").read_text()
    )
    loaded, _, _ = create_model_and_transforms(f"local-dir:{out}", **SETTINGS)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(loaded, inputs), _outputs(model, inputs), strict=True))
    # a model built with QuickGELU (OpenAI weights): the name's GELU config is refused, the right one rebuilds it
    quick, _, _ = create_model_and_transforms(TINY, register_neurons=index, force_quick_gelu=True)
    with pytest.raises(ExportError, match="with a GELU, not the model's QuickGELU"):
        export_open_clip(quick, index, tmp_path / "gelu", model_config=TINY)
    assert not (tmp_path / "gelu").exists()  # refused while staging: nothing moved in
    out = export_open_clip(quick, index, tmp_path / "quick", model_config={**TINY_CONFIG, "quick_gelu": True})
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert isinstance(theirs.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    quick.visual.set_register_neurons(None, num_test_time_registers=0)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(theirs, inputs), _outputs(quick, inputs), strict=True))
    half, _, _ = create_model_and_transforms(TINY, register_neurons=index, precision="bf16")  # LayerNormFp32
    assert export_open_clip(half, index, tmp_path / "bf16", model_config=TINY).is_dir()  # precision loads, not config
    with pytest.raises(ExportError, match="pooling|pool_type"):
        export_open_clip(model, index, tmp_path / "avg", model_config={**TINY_CONFIG, "vision_cfg": {
            **TINY_CONFIG["vision_cfg"], "pool_type": "avg"}})  # fmt: skip


def test_a_names_config_is_the_one_open_clip_builds_for_its_weights():
    """OpenAI weights get QuickGELU, as in open_clip's own ``-quickgelu`` configs; LAION's keep GELU."""
    assert _named_config("ViT-B-16", "openai") == open_clip.get_model_config("ViT-B-16-quickgelu")
    assert _named_config("ViT-B-16", "laion2b_s34b_b88k") == open_clip.get_model_config("ViT-B-16")


def test_the_folder_rules_of_every_export(exported, tmp_path):
    base, index, out = exported
    model = to_test_time_registers(copy.deepcopy(base), index)
    target = export_open_clip(model, index, tmp_path / "out", model_config=TINY)
    with pytest.raises(ExportError, match="not empty"):
        export_open_clip(model, index, target, model_config=TINY)
    (target / "README.md").write_text("edited")
    export_open_clip(model, index, target, model_config=TINY, overwrite=True)
    assert "edited" not in (target / "README.md").read_text()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="does not write .*notes.txt"):
        export_open_clip(model, index, target, model_config=TINY, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(ExportError, match="parent checkpoint's own folder"):
        export_open_clip(f"local-dir:{out}", index, out, overwrite=True)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    transformers_export = tmp_path / "hf"
    transformers_export.mkdir()
    (transformers_export / "config.json").write_text("{}")  # an export of the other kind is not overwritten
    with pytest.raises(ExportError, match="does not write .*config.json"):
        export_open_clip(model, index, transformers_export, model_config=TINY, overwrite=True)
    with pytest.raises(ExportError, match="does not write .*open_clip_config.json"):
        export_model(tmp_path, index, out, overwrite=True)


def test_unexportable_inputs_are_clear_errors(exported, tmp_path):
    base, index, out = exported
    with pytest.raises(RegisterNeuronIndexError, match="provenance"):
        export_open_clip(TINY, NEURONS, tmp_path / "a")
    with pytest.raises(ValueError, match="Unknown open_clip model 'ViT-Nope'"):
        export_open_clip("ViT-Nope", index, tmp_path / "b")
    with pytest.raises(ValueError, match="'RN50' has a ResNet image tower"):
        export_open_clip("RN50", index, tmp_path / "r")
    with pytest.raises(ExportError, match="'nope' is not a pretrained tag of 'ViT-B-16' .*openai"):
        export_open_clip("ViT-B-16", index, tmp_path / "c", pretrained="nope")
    with pytest.raises(ExportError, match="`visual` is ttreg_hf's"):
        export_open_clip(base, index, tmp_path / "d", model_config=TINY)
    model = to_test_time_registers(copy.deepcopy(base), index)
    with pytest.raises(ExportError, match="needs model_config="):
        export_open_clip(model, index, tmp_path / "e")
    with pytest.raises(ExportError, match="not the index's"):
        export_open_clip(
            to_test_time_registers(copy.deepcopy(base), {1: [2]}), index, tmp_path / "f", model_config=TINY
        )
    bare = to_test_time_registers(open_clip.model.CLIP(**TINY_CONFIG), index)  # not built by create_model
    with pytest.raises(ExportError, match="no preprocessing config .*set_model_preprocess_cfg"):
        export_open_clip(bare, index, tmp_path / "j", model_config=TINY)
    for text, message in (
        ("[1]", "is not a model config"),
        ('{"model_cfg": {"vision_cfg": {"x": 1}}}', "no vision_cfg"),
    ):
        (tmp_path / "hostile").mkdir(exist_ok=True)
        (tmp_path / "hostile" / "open_clip_config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            export_open_clip(f"local-dir:{tmp_path / 'hostile'}", index, tmp_path / "k")
    with pytest.raises(ExportError, match="model_config must be JSON"):
        export_open_clip(model, index, tmp_path / "h", model_config={**TINY_CONFIG, "embed_dim": torch.tensor(16)})
    deeper = RegisterNeuronIndex(neurons=NEURONS, num_layers=4, mlp_width=128)  # the same neurons, another model
    with pytest.raises(RegisterNeuronIndexError, match=r"made for another checkpoint \(4 layers"):
        export_open_clip(model, deeper, tmp_path / "i", model_config=TINY)
    with pytest.raises(ExportError, match="cannot build a model"):
        export_open_clip(model, index, tmp_path / "g", model_config={"vision_cfg": {}})
    assert not any((tmp_path / name).exists() for name in "abcdefghijkr")


def test_the_cli_exports_an_open_clip_model(exported, tmp_path, capsys):
    _, index, out = exported
    index_file = out / "register_neurons.safetensors"
    weights = out.parent / "weights.safetensors"
    target = tmp_path / "cli"
    command = ["export", f"open_clip:{TINY}", "--pretrained", str(weights), "--index", str(index_file)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegisterIndexMismatchWarning)
        assert main([*command, "--out", str(target), "--repo-id", "me/cli"]) == 0
    assert (target / "open_clip_config.json").read_bytes() == (out / "open_clip_config.json").read_bytes()
    assert 'create_model_and_transforms("hf-hub:me/cli")' in (target / "README.md").read_text()
    capsys.readouterr()
    for bad, message in (
        (["export", "open_clip:", "--index", str(index_file)], "No model after 'open_clip:'"),
        (["export", str(out), "--pretrained", "openai", "--index", str(index_file)], "--pretrained is for OpenCLIP"),
        (["export", "open_clip:ViT-B-16", "--pretrained", "nope", "--index", str(index_file)], "not a pretrained tag"),
    ):
        assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error


def test_the_folder_of_a_pretrained_file_is_refused_as_out_even_with_overwrite(exported, tmp_path, monkeypatch, capsys):
    """The weights' folder holds only a file an export writes (`open_clip_model.safetensors`): nothing but the
    source-folder rule stands between ``--overwrite`` and the weights being replaced."""
    base, index, _ = exported
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    weights = weights_dir / "open_clip_model.safetensors"
    assert weights.name in OPEN_CLIP_EXPORTED_FILES
    save_file(base.state_dict(), weights)
    index_file = index.save(tmp_path / "index.safetensors")
    before = weights.read_bytes()
    with pytest.raises(ExportError, match="parent checkpoint's own folder"):
        export_open_clip(TINY, index_file, weights_dir, pretrained=str(weights), overwrite=True)
    monkeypatch.chdir(tmp_path)  # the same folder, named relatively on one side
    command = ["export", f"open_clip:{TINY}", "--index", str(index_file), "--pretrained", "weights/" + weights.name]
    assert main([*command, "--out", str(weights_dir), "--overwrite"]) == 2
    assert "own folder" in capsys.readouterr().err
    assert sorted(weights_dir.iterdir()) == [weights] and weights.read_bytes() == before
