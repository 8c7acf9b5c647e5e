"""One way in: whatever a user imports or runs first, in a fresh process, parent checkpoints load with every weight
(bit-equal to the parent with the edit off) and our saved folders load through the Auto classes.

Each entry path runs in its own interpreter, so no state one path leaves behind (registrations, caches) can be what
another relies on. The checkpoints are the parents' own `save_pretrained` folders (ViT, DeiT, DINOv2), whose keys
`transformers` writes in the older layout its key conversions read back.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeiTConfig, DeiTModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)
PARENTS = {
    # name: (parent class, config, the torch.hub checkpoint whose `weights=` takes such a folder)
    "vit": (ViTModel, ViTConfig(image_size=32, **TINY), "vit_base_patch16_224_in21k"),
    "deit": (DeiTModel, DeiTConfig(image_size=32, **TINY), "deit_base_distilled_patch16_224"),
    "dinov2": (Dinov2Model, Dinov2Config(image_size=32, **TINY), None),
}
OURS = {"vit": "ViTTTRegModel", "deit": "DeiTTTRegModel", "dinov2": "Dinov2TTRegModel"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Per family: the parent's checkpoint folder, our saved folder, and the parent's output on fixed pixels."""
    from ttreg_hf import DeiTTTRegModel, Dinov2TTRegModel, ViTTTRegModel

    ours = {"vit": ViTTTRegModel, "deit": DeiTTTRegModel, "dinov2": Dinov2TTRegModel}
    root = tmp_path_factory.mktemp("entry_paths")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tensors = {"pixels": pixels}
    for name, (parent_class, config, _) in PARENTS.items():
        torch.manual_seed(1)
        parent = parent_class(config).eval()
        kwargs = {"add_pooling_layer": False} if name == "deit" else {}
        if kwargs:
            parent = parent_class(config, **kwargs).eval()
        parent.save_pretrained(root / name)
        with torch.no_grad():
            tensors[name] = parent(pixels).last_hidden_state
        saved = ours[name].from_pretrained(root / name, num_test_time_registers=0, **kwargs)
        saved.save_pretrained(root / f"{name}_ours")
    save_file(tensors, root / "expected.safetensors")
    return root


# Each path: Python run in a fresh interpreter, once for every family: ``ROOT`` (the checkpoints), ``NAME`` (the
# family), ``CLASS`` (ours), ``HUB`` (its torch.hub checkpoint); the model must be built by that path alone. The
# first statement of the interpreter is the path's first import.
PATHS = {
    "submodule": "module = __import__(f'ttreg_hf.modeling.{\"vit\" if NAME == \"deit\" else NAME}', fromlist=['x'])\n"
    "kwargs = {'add_pooling_layer': False} if NAME == 'deit' else {}\n"
    "model = getattr(module, CLASS).from_pretrained(f'{ROOT}/{NAME}', num_test_time_registers=0, **kwargs)\n",
    "auto_after_index_module": "import ttreg_hf.index\nfrom transformers import AutoModel\n"
    "model = AutoModel.from_pretrained(f'{ROOT}/{NAME}_ours')\nassert type(model).__name__ == CLASS, type(model)\n",
    "cli_load_model": "from ttreg_cli import load_model\n"
    "model, _ = load_model(f'{ROOT}/{NAME}', 'cpu', num_test_time_registers=0)\n",
    "load_tt_model": "from ttreg_hf.hub import load_tt_model\n"
    "model = load_tt_model(HUB, pretrained=False, weights=f'{ROOT}/{NAME}', num_test_time_registers=0)\n",
    "torch_hub": "import torch\n"
    "model = torch.hub.load(REPO, HUB + '_tt_reg', source='local', pretrained=False,\n"
    "                       weights=f'{ROOT}/{NAME}', num_test_time_registers=0)\n",
}
HUB_PATHS = ("load_tt_model", "torch_hub")  # DINOv2's hub entries take upstream-layout weights: tests/test_hub.py
RUN = """
import torch
from safetensors.torch import load_file, save_file
pixels = load_file(f'{ROOT}/expected.safetensors')['pixels']
with torch.no_grad():
    hidden = model(pixels).last_hidden_state
save_file({'hidden': hidden.contiguous()}, f'{OUT}/{NAME}.safetensors')
"""


def run_path(path: str, root: Path, out: Path) -> subprocess.CompletedProcess:
    """One interpreter that loads every family's checkpoint by ``path``, each first load in its own function."""
    names = [name for name, (_, _, hub) in PARENTS.items() if hub or path not in HUB_PATHS]
    code = f"ROOT, OUT, REPO = {str(root)!r}, {str(out)!r}, {str(ROOT)!r}\n"
    for name in names:
        body = f"NAME, CLASS, HUB = {name!r}, {OURS[name]!r}, {PARENTS[name][2]!r}\n" + PATHS[path] + RUN
        code += f"def load_{name}():\n" + "".join(f"    {line}\n" for line in body.splitlines())
    code += "".join(f"load_{name}()\n" for name in names)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_each_entry_path_loads_parent_checkpoints_with_every_weight(checkpoints, path, tmp_path):
    result = run_path(path, checkpoints, tmp_path)
    assert result.returncode == 0, f"{path}:\n{result.stderr[-3000:]}"
    expected = load_file(checkpoints / "expected.safetensors")
    for name, (_, _, hub) in PARENTS.items():
        if hub or path not in HUB_PATHS:
            hidden = load_file(tmp_path / f"{name}.safetensors")["hidden"]
            assert torch.equal(hidden, expected[name]), (
                f"{path} / {name}: not the parent's output (weights not loaded?)"
            )


def test_a_parent_checkpoint_loads_with_no_weight_missing_or_unexpected(checkpoints):
    """The loading report itself, for each family: nothing dropped as unexpected, nothing left random."""
    from ttreg_hf import DeiTTTRegModel, Dinov2TTRegModel, ViTTTRegModel

    for name, ours in (("vit", ViTTTRegModel), ("deit", DeiTTTRegModel), ("dinov2", Dinov2TTRegModel)):
        kwargs = {"add_pooling_layer": False} if name == "deit" else {}
        _, info = ours.from_pretrained(
            checkpoints / name, num_test_time_registers=0, output_loading_info=True, **kwargs
        )
        assert info["missing_keys"] == set() or not info["missing_keys"], (name, info["missing_keys"])
        assert not info["unexpected_keys"], (name, info["unexpected_keys"])


def test_the_checkpoints_are_in_the_layout_conversions_read(checkpoints):
    """Guards the test itself: the saved ViT keys are the older layout, so only a working conversion loads them."""
    keys = set(load_file(checkpoints / "vit" / "model.safetensors"))
    assert any(".attention.attention.query." in key for key in keys), sorted(keys)[:5]
    assert json.loads((checkpoints / "vit_ours" / "config.json").read_text())["model_type"] == "vit_tt_reg"
