"""Models upgraded in place (`to_test_time_registers`) or built so (`load_vlm`) — the hosts (VLMs, depth and
segmentation models: `ttreg_hf.modeling.hosts.HOSTS`), classifiers and dual encoders — save what plain `transformers`
loads through their Auto class (``trust_remote_code=True``) in a process where ttreg_hf cannot be imported, giving
the same outputs bit for bit."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    Mask2FormerForUniversalSegmentation,
    Mask2FormerModel,
)

from ttreg_cli import main
from ttreg_hf import RegisterNeuronIndex, load_vlm, to_test_time_registers, vision_tower_with_registers
from ttreg_hf.export import ExportError, export_model
from ttreg_hf.modeling.hosts import HOSTS
from ttreg_hf.modeling.vlm import HostNeedsPackageWarning
from ttreg_hf.remote_code import REMOTE_CODE_DIR

from host_models import BACKBONE_HOSTS, LOADED, llava, llava_next, llava_onevision, tiny_backbone_config
from support import flatten, load_without_package

NEURONS = {1: [3, 40], 2: [5]}
SETTINGS = dict(num_test_time_registers=2, register_scale=[1.0, -0.5], register_semantics="reference")


def _backbone_host(name, model_class=None):
    host_class, host_config, fields, _ = BACKBONE_HOSTS[name]
    model = (model_class or host_class)(host_config(tiny_backbone_config(False, **fields)))
    return model, dict(pixel_values=torch.randn(2, 3, 42, 42))


def _vlm(build):
    parent, images = build()
    with torch.no_grad():
        counts = [len(features) for features in parent.get_image_features(**images).pooler_output]
    input_ids = torch.tensor([[0] * (max(counts) - n) + [1, *[63] * n, 5, 6] for n in counts])
    return parent, dict(input_ids=input_ids, attention_mask=(input_ids != 0).long(), **images)


# each declared host's parent class -> its tiny parent model and inputs
TINY_HOSTS = {
    transformers.LlavaForConditionalGeneration: lambda: _vlm(llava),
    transformers.LlavaNextForConditionalGeneration: lambda: _vlm(llava_next),
    transformers.LlavaOnevisionForConditionalGeneration: lambda: _vlm(llava_onevision),
    transformers.DPTForDepthEstimation: lambda: _backbone_host("dpt"),
    transformers.DepthAnythingForDepthEstimation: lambda: _backbone_host("depth_anything"),
    transformers.ZoeDepthForDepthEstimation: lambda: _backbone_host("zoedepth"),
    Mask2FormerModel: lambda: _backbone_host("mask2former"),
    Mask2FormerForUniversalSegmentation: lambda: _backbone_host("mask2former", Mask2FormerForUniversalSegmentation),
}


def test_every_declared_host_is_tested_here():
    assert set(TINY_HOSTS) == set(HOSTS.parents)


def _loaded(name):
    """A classifier or dual encoder of `host_models.LOADED`, and its inputs."""
    inputs = dict(pixel_values=torch.randn(2, 3, 42, 42))
    if LOADED[name][1] == "logits_per_image":
        inputs["input_ids"] = torch.tensor([[4, 5, 6, 2], [7, 8, 9, 2]])
    return LOADED[name][0](), inputs


# the parent, its inputs and our class for it: every declared host, and the classifiers and dual encoders
CASES = {
    **{ours.__name__: (TINY_HOSTS[parent], ours) for parent, ours in zip(HOSTS.parents, HOSTS.model_classes)},
    **{name: (lambda name=name: _loaded(name), LOADED[name][3]) for name in LOADED},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{case: (model, folder)}``: each case's tiny parent upgraded in place with the settings away from the
    defaults, saved with `save_pretrained`, its inputs beside its folder."""
    root, saved = tmp_path_factory.mktemp("hosts"), {}
    for name, (build, ours) in CASES.items():
        if ours is HOSTS.model_classes[-1] and not _has_scipy():
            continue  # Mask2Former's segmentation loss needs scipy to be built
        torch.manual_seed(0)
        model, inputs = build()
        assert to_test_time_registers(model.eval(), register_neurons=NEURONS, **SETTINGS) is model
        assert type(model) is ours and isinstance(model.config, ours.config_class)
        folder = root / name
        model.save_pretrained(folder)
        save_file(inputs, f"{folder}.inputs.safetensors")
        saved[name] = (model, folder)
    return saved


def _has_scipy() -> bool:
    try:
        import scipy  # noqa: F401
    except ImportError:
        return False
    return True


def _outputs(model, folder) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return flatten(model(**load_file(f"{folder}.inputs.safetensors")))


def test_every_model_upgraded_in_place_saves_what_plain_transformers_loads_bit_equal(saved, tmp_path):
    remote = load_without_package([folder for _, folder in saved.values()], tmp_path)
    for name, (model, folder) in saved.items():
        expected = _outputs(model, folder)
        got = {key.removeprefix(str(folder)): t for key, t in remote.items() if key.startswith(f"{folder}.")}
        assert got.keys() == expected.keys(), name
        assert [key for key in expected if not torch.equal(got[key], expected[key])] == [], name


@pytest.mark.parametrize("name", CASES)
def test_with_the_package_a_saved_model_reloads_as_ours_bit_equal(saved, name):
    if name not in saved:
        pytest.skip("needs scipy")
    model, folder = saved[name]
    ours = CASES[name][1]
    config = json.loads((folder / "config.json").read_text())
    auto_name = next(name for name in config["auto_map"] if name != "AutoConfig")
    stems = ["configuration_ttreg", "modeling_ttreg"]
    stems += ["configuration_ttreg_hosts", "modeling_ttreg_hosts"] if ours in HOSTS.model_classes else []
    assert sorted(path.stem for path in folder.glob("*.py")) == sorted(stems)  # the hosts' files beside a host only
    assert config["auto_map"] == {"AutoConfig": f"{stems[-2]}.{ours.config_class.__name__}"} | {
        name: f"{stems[-1]}.{ours.__name__}" for name in config["auto_map"] if name != "AutoConfig"
    }
    assert config["model_type"] == ours.config_class.model_type
    loaded = getattr(transformers, auto_name).from_pretrained(folder).eval()
    assert type(loaded) is ours
    tower = vision_tower_with_registers(loaded)
    assert tower.config is loaded.config.register_config  # the tower follows the config the model saves
    assert tower.config.register_neuron_index == {layer: tuple(ids) for layer, ids in NEURONS.items()}
    expected, actual = _outputs(model, folder), _outputs(loaded, folder)
    assert [key for key in expected if not torch.equal(actual[key], expected[key])] == []


@pytest.mark.parametrize("folder", sorted(REMOTE_CODE_DIR.iterdir()), ids=lambda folder: folder.name)
def test_each_family_has_the_hosts_remote_code_in_files_of_their_own(folder):
    """Every host is defined in the hosts' two files, which import the family's files (a configuration file imports
    configuration files only); the family's files define no host, so a tower's save carries none of them."""
    tower, hosts = ((folder / f"{stem}.py").read_text() for stem in ("modeling_ttreg", "modeling_ttreg_hosts"))
    configuration = (folder / "configuration_ttreg_hosts.py").read_text()
    assert "from .configuration_ttreg import " in configuration and "from .modeling_" not in configuration
    assert "from .configuration_ttreg_hosts import " in hosts and "from .modeling_ttreg import " in hosts
    defined = [host for host in HOSTS.model_classes if f"\nclass {host.__name__}(" in hosts]
    assert set(HOSTS.model_classes[:3]) <= set(defined)  # the VLMs: every family's tower can be theirs
    for host in defined:
        assert f"\nclass {host.config_class.__name__}(" in configuration
    for host in HOSTS.model_classes:
        assert f"class {host.__name__}(" not in tower
        assert host.config_class.__name__ not in (folder / "configuration_ttreg.py").read_text()


def test_a_vlm_built_by_load_vlm_saves_what_plain_transformers_loads(tmp_path):
    torch.manual_seed(0)
    parent, inputs = _vlm(llava)
    parent.save_pretrained(tmp_path / "parent")
    model = load_vlm(tmp_path / "parent", register_neurons=NEURONS, **SETTINGS).eval()
    assert type(model) is HOSTS.model_classes[0]
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    save_file(inputs, f"{folder}.inputs.safetensors")
    remote = load_without_package([folder], tmp_path)
    expected = _outputs(model, folder)
    got = {key.removeprefix(str(folder)): t for key, t in remote.items() if key.startswith(f"{folder}.")}
    assert [key for key in expected if not torch.equal(got[key], expected[key])] == []


def test_a_host_without_a_class_of_ours_warns_that_its_folder_needs_the_package():
    config = transformers.VipLlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=14,
            image_size=28,
        ),
        text_config=transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        ),
        vision_feature_layers=[-2, -1],
    )  # fmt: skip
    model = transformers.VipLlavaForConditionalGeneration(config)
    with pytest.warns(HostNeedsPackageWarning, match="loads only where ttreg_hf is imported"):
        to_test_time_registers(model, register_neurons=NEURONS)
    assert type(model) is transformers.VipLlavaForConditionalGeneration


@pytest.mark.parametrize("name", ["LlavaTTRegForConditionalGeneration", "DepthAnythingTTRegForDepthEstimation"])
def test_export_refuses_a_host_naming_what_to_do_instead(saved, name, tmp_path, capsys):
    """`ttreg export` writes one family's model: of a host it would drop everything but the tower."""
    model, folder = saved[name]
    config = vision_tower_with_registers(model).config
    index = RegisterNeuronIndex(neurons=NEURONS, num_layers=config.num_hidden_layers, mlp_width=config.mlp_width)
    index.save(tmp_path / "index.safetensors")
    out = tmp_path / "out"
    assert main(["export", str(folder), "--index", str(tmp_path / "index.safetensors"), "--out", str(out)]) == 2
    assert "would drop the rest of this model" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ExportError, match="save_pretrained"):
        export_model(model, tmp_path / "index.safetensors", out)
    assert not out.exists()


def test_a_host_class_built_from_the_parents_config_names_the_way_that_works():
    parent, _ = llava()
    with pytest.raises(TypeError, match="load_vlm"):
        HOSTS.model_classes[0](parent.config)
