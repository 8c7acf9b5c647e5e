"""Hub-ready exports: they load with plain `transformers` (remote code) and with the package's own classes."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    BitImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
)

from ttreg_hf import (
    CLIPVisionTTRegModel,
    Dinov2TTRegConfig,
    Dinov2TTRegModel,
    RegisterNeuronIndex,
    RegisterNeuronIndexError,
)
from ttreg_hf.export import ExportError, export_model
from ttreg_hf.model_card import BIBTEX, UNKNOWN_LICENCE

from reference_edit import hooked_register_edit

pytest_plugins = ["fake_hub"]  # its `hub` fixture

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)
PARENTS = {  # name -> (parent class, config, package class, MLP width)
    "dinov2": (Dinov2Model, Dinov2Config(**TINY), Dinov2TTRegModel, 128),
    "clip": (CLIPVisionModel, CLIPVisionConfig(**TINY, intermediate_size=64), CLIPVisionTTRegModel, 64),
}
OUTPUT_FIELDS = ("last_hidden_state", "pooler_output", "test_time_registers")
# the DINOv2 parent's own processor, unlike the family default (crop 224, ImageNet statistics)
PARENT_PROCESSOR = dict(crop_size={"height": 448, "width": 448}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
SETTINGS = dict(  # every register setting away from its default: an export must publish what the model runs
    num_test_time_registers=2, register_scale=[1.0, -0.5], register_semantics="reference", register_patch_mode="mean"
)

REMOTE_LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["ttreg_hf"] = None  # whatever the environment, the package cannot be imported here
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    pixel_values, outputs = load_file("inputs.safetensors")["pixel_values"], {}
    for name in sys.argv[1:]:
        model = AutoModel.from_pretrained(name, trust_remote_code=True).eval()
        off = AutoModel.from_pretrained(name, trust_remote_code=True, num_test_time_registers=0).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            result, plain = model(pixel_values), off(pixel_values)
        outputs.update({f"{name}.{field}": getattr(result, field).contiguous() for field in {fields}})
        outputs[f"{name}.off"] = plain.last_hidden_state
    save_file(outputs, "outputs.safetensors")
    """
).replace("{fields}", repr(OUTPUT_FIELDS))


def tiny_index(name: str, **provenance) -> RegisterNeuronIndex:
    width = PARENTS[name][3]
    return RegisterNeuronIndex(
        neurons={1: [3, width - 1, 5], 2: [7]},
        num_layers=3,
        mlp_width=width,
        checkpoints={"hf": f"tiny/{name}"},
        source=f"planted for a test of {name}",
        **provenance,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (parent checkpoint folder, index, export folder)}`` for a tiny DINOv2 and a tiny CLIP tower."""
    root, folders = tmp_path_factory.mktemp("export"), {}
    torch.manual_seed(0)
    for name, (parent_class, config, _, _) in PARENTS.items():
        parent_class(config).save_pretrained(root / f"{name}-parent")
        index = tiny_index(name, details={"threshold": 2.5})
        index.save(root / f"{name}-index.safetensors")
        folders[name] = (root / f"{name}-parent", index, root / name)
    BitImageProcessor(**PARENT_PROCESSOR).save_pretrained(root / "dinov2-parent")
    export_model(root / "dinov2-parent", root / "dinov2-index.safetensors", root / "dinov2")
    with pytest.warns(UserWarning, match="has no preprocessor_config.json: wrote the clip default CLIPImageProcessor"):
        export_model(root / "clip-parent", root / "clip-index.safetensors", root / "clip")  # the parent has none
    return folders


@pytest.fixture(scope="module")
def exported_with_settings(exported):
    """``{name: export folder}`` of the same models loaded with `SETTINGS` (an export from a loaded model)."""
    folders = {}
    for name, (parent_dir, index, out) in exported.items():
        model = PARENTS[name][2].from_pretrained(parent_dir, register_neurons=index, **SETTINGS).eval()
        folders[name] = export_model(model, index, out.parent / f"{name}-settings")
    return folders


def hooked_parent_outputs(name, parent_dir, neurons, images) -> dict[str, torch.Tensor]:
    """`OUTPUT_FIELDS` of the parent with the edit of `SETTINGS` done by hooks (`tests/reference_edit.py`)."""
    parent = PARENTS[name][0].from_pretrained(parent_dir).eval()
    layers = parent.encoder.layer if name == "dinov2" else parent.encoder.layers
    num_registers = SETTINGS["num_test_time_registers"]
    with (
        torch.no_grad(),
        hooked_register_edit(
            parent.embeddings,
            {layer: layers[layer].mlp.fc2 for layer in neurons},
            neurons,
            num_registers=num_registers,
            scale=SETTINGS["register_scale"],
            semantics=SETTINGS["register_semantics"],
            patch_mode=SETTINGS["register_patch_mode"],
        ),
    ):
        outputs = parent(images)  # the registers are the last tokens
    return {
        "last_hidden_state": outputs.last_hidden_state[:, :-num_registers],
        "pooler_output": outputs.pooler_output,
        "test_time_registers": outputs.last_hidden_state[:, -num_registers:],
    }


def test_exports_load_with_plain_transformers_and_match_the_package(exported, exported_with_settings, images, tmp_path):
    save_file({"pixel_values": images}, tmp_path / "inputs.safetensors")
    (tmp_path / "load.py").write_text(REMOTE_LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    folders = [str(out) for _, _, out in exported.values()] + [str(out) for out in exported_with_settings.values()]
    run = subprocess.run(
        [sys.executable, "-I", "load.py", *folders], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = load_file(tmp_path / "outputs.safetensors")
    for name, (parent_dir, index, out) in exported.items():
        parent_class, _, package_class, _ = PARENTS[name]
        package = package_class.from_pretrained(parent_dir, register_neurons=index).eval()
        with torch.no_grad():
            expected, plain = package(images), parent_class.from_pretrained(parent_dir).eval()(images)
        for field in OUTPUT_FIELDS:
            assert torch.allclose(remote[f"{out}.{field}"], getattr(expected, field), atol=1e-6), (name, field)
        assert not torch.allclose(remote[f"{out}.last_hidden_state"], plain.last_hidden_state, atol=1e-3), name
        assert torch.allclose(remote[f"{out}.off"], plain.last_hidden_state, atol=1e-6), name
        with_settings = exported_with_settings[name]
        for field, value in hooked_parent_outputs(name, parent_dir, index.neurons, images).items():
            torch.testing.assert_close(
                remote[f"{with_settings}.{field}"], value, atol=1e-5, rtol=0, msg=f"{name} {field}"
            )
        assert torch.allclose(remote[f"{with_settings}.off"], plain.last_hidden_state, atol=1e-6), name


@pytest.mark.parametrize("name", PARENTS)
def test_package_classes_load_an_export_without_remote_code(exported, images, name):
    parent_dir, index, out = exported[name]
    package_class = PARENTS[name][2]
    reference = package_class.from_pretrained(parent_dir, register_neurons=index).eval()
    for loaded in (package_class.from_pretrained(out), AutoModel.from_pretrained(out)):
        assert type(loaded) is package_class
        with torch.no_grad():
            expected, actual = reference(images), loaded.eval()(images)
        for field in OUTPUT_FIELDS:
            assert torch.equal(getattr(actual, field), getattr(expected, field)), field


@pytest.mark.parametrize("name", PARENTS)
def test_an_export_keeps_the_models_register_settings(exported, exported_with_settings, images, name):
    parent_dir, index, _ = exported[name]
    out = exported_with_settings[name]
    expected = hooked_parent_outputs(name, parent_dir, index.neurons, images)
    package_class = PARENTS[name][2]
    for loaded in (package_class.from_pretrained(out), AutoModel.from_pretrained(out)):
        assert type(loaded) is package_class
        with torch.no_grad():
            actual = loaded.eval()(images)
        for field, value in expected.items():
            torch.testing.assert_close(getattr(actual, field), value, atol=1e-5, rtol=0, msg=f"{name} {field}")
    off = package_class.from_pretrained(out, num_test_time_registers=0).eval()  # the card's way to switch it off
    with torch.no_grad():
        plain = PARENTS[name][0].from_pretrained(parent_dir).eval()(images)
        assert torch.equal(off(images).last_hidden_state, plain.last_hidden_state)
    card = (out / "README.md").read_text()
    assert "edit semantics: `reference`; test-time registers: 2" in card


def test_the_folder_holds_config_index_preprocessor_card_and_self_contained_code(exported):
    _, index, out = exported["dinov2"]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ttreg.Dinov2TTRegConfig",
        "AutoModel": "modeling_ttreg.Dinov2TTRegModel",
    }
    assert config["register_neurons"] == {"1": [3, 127, 5], "2": [7]}
    assert RegisterNeuronIndex.load(out / "model.safetensors") == index
    assert RegisterNeuronIndex.from_pretrained(out) == index  # the index alone: an export is an index repository
    assert set(load_file(out / "model.safetensors")) == set(Dinov2TTRegModel.from_pretrained(out).state_dict())
    parent_dir = exported["dinov2"][0]
    assert (out / "preprocessor_config.json").read_bytes() == (parent_dir / "preprocessor_config.json").read_bytes()
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"]["height"] == 448 and processor["image_mean"] == PARENT_PROCESSOR["image_mean"]
    clip_processor = json.loads((exported["clip"][2] / "preprocessor_config.json").read_text())
    assert clip_processor["image_processor_type"] == "CLIPImageProcessor"
    assert clip_processor["size"]["shortest_edge"] == 56
    card = (out / "README.md").read_text()
    for expected in (
        "planted for a test of dinov2",
        "tiny/dinov2",
        "| 1 | 3, 127, 5 |",
        "threshold: 2.5",
        "num_test_time_registers=0",
        "alone in `register_neurons.safetensors`",
        "trust_remote_code=True",
        "2506.08010",
        BIBTEX,
        UNKNOWN_LICENCE,
    ):
        assert expected in card, expected
    for stem in ("configuration_ttreg", "modeling_ttreg"):
        source = (out / f"{stem}.py").read_text()
        imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))]
        modules = [alias.name for node in imports if isinstance(node, ast.Import) for alias in node.names]
        modules += [node.module for node in imports if isinstance(node, ast.ImportFrom)]
        assert not [m for m in modules if m.startswith("ttreg_hf")] and "sys.path" not in source, stem
        assert all(node.level in (0, 1) for node in imports if isinstance(node, ast.ImportFrom)), stem
    configuration, modeling = ((out / f"{stem}.py").read_text() for stem in ("configuration_ttreg", "modeling_ttreg"))
    assert "class RegisterNeuronEdit" in modeling  # generated from the package, not hand-written
    assert "class RegisterNeuronEdit" not in configuration and "nn.Module" not in configuration  # no model code there
    assert "FAMILIES" not in configuration + modeling and "PlantingSites" not in modeling  # only what the classes use


@pytest.mark.filterwarnings("ignore:The model has no preprocessor_config.json")
def test_the_card_takes_the_base_licence_from_the_table_or_the_caller(tmp_path):
    index = tiny_index("dinov2")
    package = Dinov2TTRegModel(Dinov2TTRegConfig(**TINY)).set_register_neurons(index)
    card = (export_model(package, index, tmp_path / "a", base_model="facebook/dinov2-large") / "README.md").read_text()
    assert "license: apache-2.0" in card and "base_model: facebook/dinov2-large" in card
    card = (export_model(package, index, tmp_path / "b", license="cc-by-4.0") / "README.md").read_text()
    assert "license: cc-by-4.0" in card


@pytest.fixture
def package_model():
    index = tiny_index("dinov2")
    return Dinov2TTRegModel(Dinov2TTRegConfig(**TINY)).set_register_neurons(index), index


@pytest.mark.filterwarnings("ignore:The model has no preprocessor_config.json")
def test_a_folder_with_other_files_is_refused_and_left_alone(package_model, tmp_path):
    package, index = package_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(ExportError, match="not empty .*README.md"):
        export_model(package, index, out)
    (out / "pytorch_model.bin").write_bytes(b"stale")
    with pytest.raises(ExportError, match="does not write .*pytorch_model.bin"):
        export_model(package, index, out, overwrite=True)  # an upload would publish the stale file
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "pytorch_model.bin"]
    assert (out / "README.md").read_text() == "my notes"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_model(package, index, tmp_path / "file")


@pytest.mark.filterwarnings("ignore:The model has no preprocessor_config.json")
def test_overwrite_rewrites_an_earlier_export_only(package_model, tmp_path):
    package, index = package_model
    out = export_model(package, index, tmp_path / "out")
    with pytest.raises(ExportError, match="pass overwrite"):
        export_model(package, index, out)
    (out / "README.md").write_text("edited")
    export_model(package, index, out, overwrite=True)
    assert "edited" not in (out / "README.md").read_text()


def test_the_parent_checkpoint_folder_is_always_refused(exported):
    parent_dir, _, _ = exported["dinov2"]
    before = {p.name: p.read_bytes() for p in parent_dir.iterdir()}
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="parent checkpoint's own folder"):
            export_model(parent_dir, parent_dir.parent / "dinov2-index.safetensors", parent_dir, overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in parent_dir.iterdir()} == before


def test_the_folder_a_loaded_model_came_from_is_refused_by_any_name(exported, tmp_path):
    """The parent's folder holds only files an export writes (config, weights, preprocessor): nothing but the
    source-folder rule stands between ``overwrite`` and the checkpoint being replaced, whatever names OUT."""
    parent_dir, index, _ = exported["dinov2"]
    source = tmp_path / "checkpoint"
    Dinov2TTRegModel.from_pretrained(parent_dir, register_neurons=index).save_pretrained(source)
    before = {path.name: path.read_bytes() for path in source.iterdir()}
    model = Dinov2TTRegModel.from_pretrained(source)  # the folder is only in its config's name_or_path
    (tmp_path / "link").symlink_to(source)
    for out in (source, tmp_path / "link", tmp_path / "." / "checkpoint"):
        with pytest.raises(ExportError, match="parent checkpoint's own folder"):
            export_model(model, index, out, overwrite=True)
    with pytest.raises(ExportError, match="does not write .*checkpoint"):
        export_model(model, index, tmp_path, overwrite=True)  # a folder above it
    assert {path.name: path.read_bytes() for path in source.iterdir()} == before


def test_the_cached_snapshot_of_a_hub_checkpoint_is_refused(exported, hub, tmp_path):
    """OUT = the Hub cache's folder of the checkpoint id being exported (by any name): rewriting it would swap the
    checkpoint's cached files (they are all names an export writes) for the export's."""
    from huggingface_hub import HfApi, hf_hub_download

    parent_dir, index, _ = exported["dinov2"]
    HfApi().create_repo("me/dinov2")
    HfApi().upload_folder(repo_id="me/dinov2", folder_path=parent_dir)
    snapshot = {Path(hf_hub_download("me/dinov2", path.name)).parent for path in parent_dir.iterdir()}.pop()
    before = {path.name: path.read_bytes() for path in snapshot.iterdir()}
    for out in (snapshot, snapshot.parent, tmp_path / "link"):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(snapshot)
        with pytest.raises(ExportError, match="is in the Hugging Face cache .*: export into a folder of your own"):
            export_model("me/dinov2", index, out, overwrite=True)
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == before


def test_a_hub_checkpoint_that_fails_to_write_is_not_called_unfetchable(exported, hub, tmp_path, monkeypatch, capsys):
    """A full disk while OUT is written, with MODEL a Hub id: the CLI says so in one line (not "Could not fetch")."""
    import errno

    from huggingface_hub import HfApi

    from ttreg_cli import main
    from ttreg_hf import export

    parent_dir, index, _ = exported["dinov2"]
    HfApi().create_repo("me/dinov2")
    HfApi().upload_folder(repo_id="me/dinov2", folder_path=parent_dir)
    index_file = index.save(tmp_path / "index.safetensors")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_safetensors", full_disk)
    capsys.readouterr()
    assert main(["export", "me/dinov2", "--index", str(index_file), "--out", str(tmp_path / "out")]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and "fetch" not in error[0], error
    assert error[0].endswith(f"error: Could not write {tmp_path / 'out'}: [Errno 28] No space left on device."), error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hub-cache", "index.safetensors"]  # nor staging


@pytest.mark.filterwarnings("ignore:The model has no preprocessor_config.json")
def test_exported_files_follow_the_umask(package_model, tmp_path):
    package, index = package_model
    previous = os.umask(0o027)
    try:
        out = export_model(package, index, tmp_path / "out")
        index_file = index.save(tmp_path / "index.safetensors")
    finally:
        os.umask(previous)
    for path in [*out.iterdir(), index_file]:
        assert path.stat().st_mode & 0o777 == 0o640, path.name


def test_unexportable_inputs_are_clear_errors(exported, tmp_path):
    parent_dir, index, _ = exported["dinov2"]
    with pytest.raises(RegisterNeuronIndexError, match="provenance"):
        export_model(parent_dir, {1: [3]}, tmp_path / "a")
    with pytest.raises(ExportError, match="not the index's"):
        export_model(Dinov2TTRegModel.from_pretrained(parent_dir, register_neurons={2: [1]}), index, tmp_path / "b")
    with pytest.raises(ExportError, match="Cannot export a Linear"):
        export_model(torch.nn.Linear(2, 2), index, tmp_path / "c")
    AutoConfig.for_model("bert", hidden_size=32).save_pretrained(tmp_path / "bert")
    with pytest.raises(ExportError, match="model type 'bert'"):
        export_model(tmp_path / "bert", index, tmp_path / "d")


def test_a_saved_package_model_exports_in_a_fresh_process(exported, tmp_path):
    """`ttreg_hf.export` alone (its import is what loads `transformers`' auto classes) still knows our model types."""
    parent_dir, index, _ = exported["dinov2"]
    Dinov2TTRegModel.from_pretrained(parent_dir, register_neurons=index).save_pretrained(tmp_path / "ours")
    code = (
        "from ttreg_hf.export import export_model\n"
        f"export_model({str(tmp_path / 'ours')!r}, {str(parent_dir.parent / 'dinov2-index.safetensors')!r}, "
        f"{str(tmp_path / 'out')!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert RegisterNeuronIndex.load(tmp_path / "out" / "model.safetensors") == index


def test_the_cli_exports_a_checkpoint(exported, tmp_path):
    from ttreg_cli import main

    parent_dir, _, _ = exported["dinov2"]
    index_file = parent_dir.parent / "dinov2-index.safetensors"
    out = tmp_path / "out"
    assert main(["export", str(parent_dir), "--index", str(index_file), "--out", str(out), "--repo-id", "me/x"]) == 0
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"].endswith("Dinov2TTRegModel")
    assert 'from_pretrained("me/x", trust_remote_code=True)' in (out / "README.md").read_text()
    assert main(["export", str(parent_dir), "--index", str(index_file), "--out", str(out)]) == 2  # not empty
    assert main(["export", str(parent_dir), "--index", str(index_file), "--out", str(out), "--overwrite"]) == 0
