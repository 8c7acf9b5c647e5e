"""Remote code: generated once into the repository, and written by every class's `save_pretrained`, so that plain
`transformers` loads what we save (``trust_remote_code=True``) in a process where ttreg_hf cannot be imported."""

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from family_models import LAYER, NEURONS, TINY, tiny_model
from safetensors.torch import load_file, save_file

from ttreg_hf import vision_tower_with_registers
from ttreg_hf.family import transformers_families

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS = {family.name: family for family in transformers_families()}
CLASSES = [(name, cls) for name, family in TRANSFORMERS.items() for cls in family.model_classes]
SETTINGS = dict(num_test_time_registers=2, register_scale=[1.0, -0.5], register_semantics="reference")

# loads every folder through the Auto class its config's auto_map names, with `transformers` alone
REMOTE_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["ttreg_hf"] = None  # whatever the environment, the package cannot be imported here
    import torch, transformers
    from safetensors.torch import load_file, save_file
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    # flatten
    outputs = {}
    for folder in sys.argv[1:]:
        auto_map = json.load(open(f"{folder}/config.json"))["auto_map"]
        auto_name = next(name for name in auto_map if name != "AutoConfig")
        if auto_name == "AutoBackbone":  # its from_pretrained takes Hub ids only: the class it would load, directly
            model_class = get_class_from_dynamic_module(auto_map[auto_name], folder)
            model = model_class.from_pretrained(folder).eval()
        else:
            model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            result = model(**load_file(f"{folder}.inputs.safetensors"))
        outputs.update({f"{folder}{key}": t.contiguous() for key, t in flatten(result).items()})
    save_file(outputs, "outputs.safetensors")
    """
)


def flatten(outputs, prefix: str = "") -> dict:
    """Every tensor in a model's (nested) outputs, by its path."""
    if isinstance(outputs, torch.Tensor):
        return {prefix: outputs}
    items = outputs.items() if hasattr(outputs, "items") else enumerate(outputs) if isinstance(outputs, tuple) else ()
    return {path: t for key, value in items for path, t in flatten(value, f"{prefix}.{key}").items()}


def inputs_for(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Two images as the model takes them (SigLIP2's through its processor), prompts for a dual encoder."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 96, 96, generator=generator)
    if name == "siglip2":
        config = vision_tower_with_registers(model).config
        processor = TRANSFORMERS[name].default_image_processor(config)
        inputs = dict(processor(list(images), return_tensors="pt", do_rescale=False))
    else:
        inputs = {"pixel_values": (images - 0.5) / 0.25}
    if "input_ids" in inspect.signature(model.forward).parameters:
        inputs["input_ids"] = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    return inputs


def test_the_checked_in_remote_code_is_what_the_generator_writes():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "utils/generate_remote_code.py", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_every_family_has_its_remote_code():
    for name in TRANSFORMERS:
        files = sorted(path.name for path in (ROOT / "ttreg_hf" / "remote" / name).iterdir())
        assert files == ["configuration_ttreg.py", "modeling_ttreg.py"], name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{class: (model, folder)}``: a tiny model of every class, edit on with settings away from the defaults, saved
    with `save_pretrained`, its inputs beside its folder."""
    root, saved = tmp_path_factory.mktemp("saved"), {}
    for name, model_class in CLASSES:
        torch.manual_seed(0)
        model = tiny_model(name, model_class)
        vision_tower_with_registers(model).set_register_neurons({LAYER: list(NEURONS)}, **SETTINGS)
        folder = root / model_class.__name__
        model.save_pretrained(folder)
        save_file(inputs_for(name, model), f"{folder}.inputs.safetensors")
        saved[model_class] = (model, folder)
    return saved


def test_every_class_saves_what_plain_transformers_loads_bit_equal(saved, tmp_path):
    (tmp_path / "load.py").write_text(REMOTE_LOADER.replace("# flatten", inspect.getsource(flatten)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    folders = [str(folder) for _, folder in saved.values()]
    run = subprocess.run(
        [sys.executable, "-I", "load.py", *folders], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = load_file(tmp_path / "outputs.safetensors")
    for model, folder in saved.values():
        with torch.no_grad():
            expected = flatten(model(**load_file(f"{folder}.inputs.safetensors")))
        assert (
            any("test_time_registers" in key for key in expected) or "Backbone" in folder.name or "For" in folder.name
        )
        got = {key.removeprefix(str(folder)): t for key, t in remote.items() if key.startswith(f"{folder}.")}
        assert got.keys() == expected.keys(), folder.name
        assert [key for key in expected if not torch.equal(got[key], expected[key])] == [], folder.name


@pytest.mark.parametrize("model_class", [cls for _, cls in CLASSES], ids=lambda cls: cls.__name__)
def test_with_the_package_the_auto_classes_build_our_class_from_a_saved_folder(saved, model_class):
    model, folder = saved[model_class]
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == f"configuration_ttreg.{model_class.config_class.__name__}"
    auto_name = next(name for name in auto_map if name != "AutoConfig")
    assert auto_map[auto_name] == f"modeling_ttreg.{model_class.__name__}"
    if auto_name == "AutoBackbone":  # its from_pretrained takes Hub ids only
        loaded = model_class.from_pretrained(folder).eval()
    else:
        loaded = getattr(transformers, auto_name).from_pretrained(folder).eval()
    assert type(loaded).__module__.startswith("ttreg_hf."), type(loaded)  # ours, not the remote code
    assert "auto_map" not in model.config.to_dict()  # saving left the model's config as it was
    if type(loaded) is model_class:  # `AutoModel` builds the tower for `CLIPVisionTTRegModelWithProjection`'s config
        inputs = load_file(f"{folder}.inputs.safetensors")
        with torch.no_grad():
            expected, actual = flatten(model(**inputs)), flatten(loaded(**inputs))
        assert [key for key in expected if not torch.equal(actual[key], expected[key])] == []


def test_push_to_hub_through_save_pretrained_is_refused_with_the_way_that_works(tmp_path):
    model = TINY["dinov2"]()
    with pytest.raises(ValueError, match=r"model.push_to_hub\(repo_id\)"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model_class", [cls for _, cls in CLASSES], ids=lambda cls: cls.__name__)
def test_export_refuses_a_head_it_would_drop(saved, model_class, tmp_path):
    """An export writes the base model: a classifier, backbone or projection folder (or model) is refused, naming
    `save_pretrained`; a dual encoder's folder exports its vision tower, as the base model loads it."""
    from ttreg_hf import RegisterNeuronIndex
    from ttreg_hf.export import ExportError, export_model

    model, folder = saved[model_class]
    tower = vision_tower_with_registers(model)
    index = RegisterNeuronIndex(
        neurons={LAYER: list(NEURONS)}, num_layers=tower.config.num_hidden_layers, mlp_width=tower.config.mlp_width
    )
    family = next(family for family in TRANSFORMERS.values() if model_class in family.model_classes)
    dual_encoder = "text_config" in model_class.config_class.sub_configs and "ForImage" not in model_class.__name__
    if model_class is family.model_class or dual_encoder:
        return
    for source in (folder, model):
        with pytest.raises(ExportError, match=rf"is a {model_class.__name__}.*would be dropped.*save_pretrained"):
            export_model(source, index, tmp_path / "out")
    assert not (tmp_path / "out").exists()
