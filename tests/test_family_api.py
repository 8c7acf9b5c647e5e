"""The public family API: seams every tool reads, one attach path for every loader, the config as the one truth."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel, Dinov2Config, Dinov2Model

from ttreg_hf import (
    CLIPVisionTTRegConfig,
    CLIPVisionTTRegModel,
    CLIPVisionTTRegModelWithProjection,
    Dinov2TTRegModel,
    RegisterNeuronEdit,
)
from ttreg_hf.configs import registers as config_registers
from ttreg_hf.errors import TTRegValueError
from ttreg_hf.hub import load_tt_model

from support import tiny_dinov2_config

ROOT = Path(__file__).resolve().parents[1]
CLIP_TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14
)


def tiny_clip(model_class=CLIPVisionTTRegModel, **settings):
    return model_class(CLIPVisionTTRegConfig(**CLIP_TINY, **{"register_neurons": {1: [3, 40]}, **settings})).eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda: Dinov2TTRegModel(tiny_dinov2_config()),
        lambda: tiny_clip(),
        lambda: tiny_clip(CLIPVisionTTRegModelWithProjection, projection_dim=8),
    ],
    ids=["dinov2", "clip", "clip-with-projection"],
)
def test_public_seams_point_at_the_parts_the_registers_touch(build):
    model = build()
    blocks, sites = model.transformer_blocks, model.register_edit_sites
    assert len(blocks) == len(sites) == model.config.num_hidden_layers
    assert all(site in set(block.modules()) for site, block in zip(sites, blocks))
    listed = model.config.register_neuron_index
    assert all(isinstance(site.register_edit, RegisterNeuronEdit) for site in sites)
    edits = {layer: site.register_edit for layer, site in enumerate(sites) if site.register_edit.neuron_ids}
    assert {layer: edit.neuron_ids for layer, edit in edits.items()} == listed
    assert model.register_appender.token_layout == model.token_layout
    assert model.token_layout.num_prefix_tokens == model.num_prefix_tokens == 1


def test_projection_model_adopts_parts_instead_of_swapping_its_vision_model_class():
    model = tiny_clip(CLIPVisionTTRegModelWithProjection, projection_dim=8)
    assert type(model.vision_model) is CLIPVisionModel


class Counter:
    """Counts calls of a method, calling through."""

    def __init__(self, monkeypatch, owner, name):
        self.calls, original = 0, getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


class EditCounter:
    """Counts the edits set up with neurons (`RegisterNeuronEdit.configure`), calling through."""

    def __init__(self, monkeypatch):
        self.calls, original = 0, RegisterNeuronEdit.configure

        def counted(edit, neurons, *args, **kwargs):
            self.calls += bool(neurons)
            return original(edit, neurons, *args, **kwargs)

        monkeypatch.setattr(RegisterNeuronEdit, "configure", counted)


@pytest.fixture
def counters(monkeypatch):
    return {
        "attach": Counter(monkeypatch, config_registers.TestTimeRegisterConfigMixin, "attach_register_neurons"),
        "edits": EditCounter(monkeypatch),
        "config reads": Counter(monkeypatch, Dinov2TTRegModel.config_class, "get_config_dict"),
    }


def test_from_pretrained_reads_the_config_once_and_builds_the_edits_once(tmp_path, counters):
    Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56)
    ).save_pretrained(tmp_path)
    model = Dinov2TTRegModel.from_pretrained(tmp_path, register_neurons={1: [2, 3], 2: [4]})
    assert {name: counter.calls for name, counter in counters.items()} == {"attach": 1, "edits": 2, "config reads": 1}
    assert model.encoder.layer[1].mlp.register_edit.neurons.tolist() == [2, 3]  # the buffers survived the load


@pytest.mark.parametrize(
    "load",
    [
        lambda: load_tt_model("dinov2_vits14", pretrained=False, register_neurons={3: [1, 2]}),
        lambda: load_tt_model("clip_vitl14_336", pretrained=False, register_neurons={3: [1, 2]}),
    ],
    ids=["hub-dinov2", "hub-clip"],
)
def test_every_loader_attaches_through_the_one_path_once(load, counters):
    model = load()
    model = getattr(model, "dinov2", model)
    listed = model.config.register_neuron_index
    assert counters["attach"].calls == 1 and counters["edits"].calls == len(listed) > 0


def test_open_clip_loader_attaches_through_the_one_path_once(counters):
    pytest.importorskip("open_clip")
    from ttreg_hf.modeling.open_clip import create_model_and_transforms

    model, _, _ = create_model_and_transforms("ViT-S-32", register_neurons={3: [1, 2]})
    assert counters["attach"].calls == 1 and counters["edits"].calls == 1
    assert model.visual.config.register_neuron_index == {3: (1, 2)}


def test_writing_the_config_changes_what_runs_and_what_is_saved(tmp_path, images):
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    model.config.num_test_time_registers = 2
    model.config.register_neurons = {"2": [9]}
    fresh = Dinov2TTRegModel(tiny_dinov2_config(num_test_time_registers=2, register_neurons={2: [9]})).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        outputs, expected = model(images), fresh(images)
    assert outputs.test_time_registers.shape == (4, 2, 32)
    assert torch.equal(outputs.last_hidden_state, expected.last_hidden_state)
    model.save_pretrained(tmp_path)
    reloaded = Dinov2TTRegModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():  # reloaded with the default attention kernel, SDPA
        torch.testing.assert_close(reloaded(images).last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)


def test_an_invalid_config_write_is_refused_at_write_time(images):
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    with pytest.raises(TTRegValueError, match="out of range"):
        model.config.register_neurons = {"1": [10_000]}
    assert model.config.register_neurons == {"1": [3, 70, 5], "2": [7, 100]}


def test_set_register_neurons_and_the_config_agree():
    model = tiny_clip()
    model.set_register_neurons({2: [7]}, num_test_time_registers=3, register_scale=0.5)
    edit = model.encoder.layers[2].mlp.register_edit
    assert model.config.register_neurons == {"2": [7]} and model.config.num_test_time_registers == 3
    assert edit.neuron_ids == (7,) and edit.scale_values == (0.5, 0.5, 0.5)
    assert model.encoder.layers[1].mlp.register_edit.neuron_ids == ()  # off


def test_open_clip_mlp_of_another_structure_fails_loudly():
    pytest.importorskip("open_clip")
    import open_clip

    from ttreg_hf.modeling.open_clip import to_test_time_registers

    model = open_clip.create_model("ViT-S-32")
    block = model.visual.transformer.resblocks[0]
    block.mlp = torch.nn.Sequential(block.mlp.c_fc, torch.nn.GELU(), torch.nn.Dropout(), block.mlp.c_proj)
    with pytest.raises(TypeError, match=r"Sequential\(c_fc: Linear, activation, c_proj: Linear\)"):
        to_test_time_registers(model)


def test_the_add_a_family_example_finds_and_removes_the_planted_outliers():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "add_a_family.py")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "planted: layer 2, neurons [21, 60]; found: {2: (21, 60)}" in lines
    before, after = (float(value) for value in re.findall(r"([\d.]+) %", lines[-1]))
    assert before > 0.5 and after == 0


def private_names_by_module() -> dict[str, set[str]]:
    """``{module path: the _private names it defines}`` for every module of the package."""
    defined = {}
    for path in (ROOT / "ttreg_hf").rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        defined[str(path.relative_to(ROOT))] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    return defined


# transformers / open_clip / torch methods our classes override: the parents' seams, not our private names
FRAMEWORK_SEAMS = {"_init_weights", "_embeds", "_pool", "_pos_embed", "_apply", "_no_split_modules"}


def test_no_private_name_of_ttreg_hf_is_used_outside_the_module_that_defines_it():
    defined = private_names_by_module()
    offenders = []
    for path in [
        *(ROOT / "ttreg_hf").rglob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
        *(ROOT / "examples").glob("*.py"),
        ROOT / "hubconf.py",
    ]:
        own = defined.get(str(path.relative_to(ROOT)), set())
        others = set().union(*(names for module, names in defined.items() if module != str(path.relative_to(ROOT))))
        foreign = others - own - FRAMEWORK_SEAMS
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.ImportFrom):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name in foreign]
            elif name in foreign:
                offenders.append(f"{path.name}:{node.lineno}: .{name}")
    assert offenders == []
