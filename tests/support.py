"""Helpers shared by the test modules: a model's parent on its weights, the hook-based reference edit run on that
parent, the per-family specs (`SPECS`) that drive the shared suites of `test_family_suite.py`, and a saved folder
loaded with `transformers` alone (`load_without_package`). Test modules import from here (and from `family_models`,
`host_models`, `reference_edit`, `reference_discovery`), never from one another."""

import functools
import inspect
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ttreg_hf import (
    CLIPVisionTTRegModel,
    DeiTTTRegModel,
    Dinov2TTRegConfig,
    Dinov2TTRegModel,
    DINOv3ViTTTRegModel,
    SiglipVisionTTRegModel,
    ViTTTRegModel,
)
from ttreg_hf.family import parent_class
from ttreg_hf.modeling.registers import register_settings

from reference_edit import hooked_register_edit

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # real weights, beside the development checkout
ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -c code *args`` in a fresh process, offline, with the checkout on its path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, **kwargs)


TTREG_RUNNER = """
import contextlib, io, json, sys
import ttreg_cli
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = ttreg_cli.main(argv)
        except SystemExit as exit:  # argparse's refusals
            status = exit.code
    results.append([status, err.getvalue().strip()])
print(json.dumps(results))
"""


def ttreg_in_a_fresh_process(*argvs: list[str]) -> list[tuple[int, str]]:
    """Each ``ttreg`` command line run in turn by `ttreg_cli.main` in one fresh process (none of the test process's
    imports or patches): its exit status and stderr. An error that escapes `main` (a bug: exit 1, a traceback) fails
    the run, and the test with its stderr."""
    run = run_python(TTREG_RUNNER, json.dumps([list(map(str, argv)) for argv in argvs]))
    assert run.returncode == 0, run.stderr[-3000:]
    return [tuple(result) for result in json.loads(run.stdout.splitlines()[-1])]


def parent_of(model: nn.Module) -> nn.Module:
    """``model``'s parent class (`Dinov2Model` for `Dinov2TTRegModel`, ...) on its config and weights, in eval mode:
    the computation with no edit."""
    parent = parent_class(type(model))(model.config).eval()
    parent.load_state_dict(model.state_dict())
    return parent


def with_registers(outputs) -> torch.Tensor:
    """``last_hidden_state`` with the ``test_time_registers`` appended: the tokens as the reference edit leaves them."""
    return torch.cat([outputs.last_hidden_state, outputs.test_time_registers], dim=1)


def down_projection(mlp: nn.Module) -> nn.Module:
    """The MLP's output projection, whose input the reference edit rewrites (``fc2``, or ``down_proj`` when gated)."""
    return mlp.fc2 if hasattr(mlp, "fc2") else mlp.down_proj


def hooked_register_edit_of(model: nn.Module, parent: nn.Module, num_prefix: int):
    """`hooked_register_edit` on ``parent`` (``model``'s parent class) at ``model``'s declared seams, with
    ``model.config``'s register settings and ``num_prefix`` tokens before the patches (stated by the test, not read
    from ``model``)."""
    config, seams = model.config, model.register_seams
    blocks = parent.get_submodule(seams.blocks)
    neurons = config.register_neuron_index
    projections = {layer: down_projection(blocks[layer].get_submodule(seams.mlp)) for layer in neurons}
    return hooked_register_edit(
        parent.get_submodule(seams.appender),
        projections,
        neurons,
        num_registers=config.num_test_time_registers,
        num_prefix=num_prefix,
        scale=config.register_scale,
        semantics=config.register_semantics,
        patch_mode=config.register_patch_mode,
    )


def save_as_parent_checkpoint(model: nn.Module, folder) -> nn.Module:
    """``model`` saved to ``folder`` as a plain `transformers` checkpoint of its parent class (the parent's config,
    without the register settings, and ``model``'s weights); returns that parent model."""
    parent = parent_class(type(model))
    ours = set(register_settings(type(model.config))) | {"model_type"}
    fields = {key: value for key, value in model.config.to_dict().items() if key not in ours}
    parent_model = parent(parent.config_class(**fields))
    parent_model.load_state_dict(model.state_dict())
    parent_model.save_pretrained(folder)
    return parent_model


class ForwardCounter:
    """Counts the images ``model`` runs, without and with register neurons attached, and records the number of
    neurons attached at each edited forward (``ks``, once per change: the k values a search tried, in order)."""

    def __init__(self, model: nn.Module):
        self.unedited = self.edited = 0
        self.ks: list[int] = []
        self.model = model

    def __enter__(self) -> "ForwardCounter":
        def count(module, args, kwargs):
            pixel_values = args[0] if args else kwargs["pixel_values"]
            neurons = self.model.config.register_neuron_index
            if not neurons:
                self.unedited += len(pixel_values)
                return
            self.edited += len(pixel_values)
            k = sum(map(len, neurons.values()))
            if not self.ks or self.ks[-1] != k:
                self.ks.append(k)

        self.handle = self.model.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# ---- the per-family specs that drive the shared suites (tests/test_family_suite.py) ----------------------------------


@contextmanager
def _hooked_at_seams(model: nn.Module, parent: nn.Module, num_prefix: int):
    with hooked_register_edit_of(model, parent, num_prefix):
        yield lambda tokens: tokens


def _registers_last(tokens: torch.Tensor, num_prefix: int, num_registers: int) -> torch.Tensor:
    """``[prefix | registers | patches]`` -> ``[prefix | patches | registers]``."""
    registers = tokens[:, num_prefix : num_prefix + num_registers]
    return torch.cat([tokens[:, :num_prefix], tokens[:, num_prefix + num_registers :], registers], 1)


def _registers_in_prefix(tokens: torch.Tensor, num_prefix: int, num_registers: int) -> torch.Tensor:
    """``[prefix | patches | registers]`` -> ``[prefix | registers | patches]``."""
    registers = tokens[:, -num_registers:]
    return torch.cat([tokens[:, :num_prefix], registers, tokens[:, num_prefix:-num_registers]], 1)


@contextmanager
def hooked_unrotated_registers(model: nn.Module, parent: nn.Module, num_prefix: int):
    """DINOv3's reference: `hooked_register_edit_of` on the parent, its registers moved to just after the trained ones.

    There the parent's `apply_rotary_pos_emb` leaves them unrotated by construction: an independent account of
    "registers get no RoPE". Around each edited MLP projection the registers are moved last, where the reference
    edit expects them, and back. Yields the function that turns the parent's tokens into our layout.
    """
    num_registers = model.config.num_test_time_registers
    last = functools.partial(_registers_last, num_prefix=num_prefix, num_registers=num_registers)
    in_prefix = functools.partial(_registers_in_prefix, num_prefix=num_prefix, num_registers=num_registers)
    blocks = parent.get_submodule(model.register_seams.blocks)
    projections = [down_projection(blocks[layer].mlp) for layer in model.config.register_neuron_index]
    with hooked_register_edit_of(model, parent, num_prefix):
        handles = [parent.embeddings.register_forward_hook(lambda m, a, out: in_prefix(out))]
        for projection in projections:
            handles.append(
                projection.register_forward_pre_hook(lambda m, args: (last(args[0]), *args[1:]), prepend=True)
            )
            handles.append(projection.register_forward_hook(lambda m, a, out: in_prefix(out)))
        try:
            yield last
        finally:
            for handle in handles:
                handle.remove()


TINY_NEURONS = {1: [3, 70, 5], 2: [7, 100]}  # the tiny configs' register neurons (MLP width 128)
VIT_ARCH = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, image_size=32,
                patch_size=8)  # fmt: skip


@dataclass(frozen=True)
class FamilySpec:
    """What the shared suites need to know of a `transformers` family, as transformers' `ModelTester` classes tell
    its `ModelTesterMixin`: a tiny architecture, the model class, the images it takes, where its reference edit
    differs, and what the suites must see change."""

    model_class: type
    arch: dict
    image_size: int
    num_prefix: int  # tokens before the patches (CLS, distillation token, trained registers): the reference's
    # `(model, parent, num_prefix)` -> a context in which ``parent`` runs the reference edit, yielding the function that puts its
    # tokens in our layout (registers last)
    hooked: Callable = _hooked_at_seams
    # keyword arguments and an image size of another shape than the position table's, which the family takes
    resized: tuple[dict, tuple[int, int]] = ({}, (48, 40))
    gradient_parameters: tuple[str, ...] = ("embeddings.patch_embeddings.projection.weight",)

    def config(self, **overrides):
        config = self.model_class.config_class(**{**self.arch, "register_neurons": TINY_NEURONS, **overrides})
        config._attn_implementation = "eager"
        return config

    def model(self, **overrides) -> nn.Module:
        return self.model_class(self.config(**overrides)).eval()

    def images(self, batch: int = 4) -> torch.Tensor:
        side = self.image_size
        return torch.randn(batch, 3, side, side) * torch.linspace(0.5, 2.0, batch).view(batch, 1, 1, 1)

    def reference(self, model: nn.Module, pixel_values: torch.Tensor, parent: nn.Module | None = None, **kwargs):
        """The reference edit on ``parent`` (default: `parent_of(model)`, in ``model``'s dtype): the tokens in our
        layout, to compare with `with_registers` of ``model``'s output."""
        if parent is None:
            parent = parent_of(model).to(next(model.parameters()).dtype)
        with self.hooked(model, parent, self.num_prefix) as to_our_layout:
            return to_our_layout(parent(pixel_values, **kwargs).last_hidden_state)


SPECS = {
    "dinov2": FamilySpec(
        Dinov2TTRegModel,
        dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14),
        image_size=56,
        num_prefix=1,
        resized=({}, (70, 42)),
        gradient_parameters=("encoder.layer.1.mlp.fc1.weight", "embeddings.patch_embeddings.projection.weight"),
    ),
    "vit": FamilySpec(
        ViTTTRegModel,
        VIT_ARCH,
        image_size=32,
        num_prefix=1,
        resized=({"interpolate_pos_encoding": True}, (48, 40)),
        gradient_parameters=("layers.1.mlp.fc1.weight", "embeddings.patch_embeddings.projection.weight"),
    ),
    "deit": FamilySpec(
        DeiTTTRegModel,
        VIT_ARCH,
        image_size=32,
        num_prefix=2,
        resized=({"interpolate_pos_encoding": True}, (48, 40)),
        gradient_parameters=("layers.1.mlp.fc1.weight", "embeddings.patch_embeddings.projection.weight"),
    ),
    "dinov3": FamilySpec(
        DINOv3ViTTTRegModel,
        dict(VIT_ARCH, num_register_tokens=4, layerscale_value=0.5),
        image_size=32,
        num_prefix=5,
        hooked=hooked_unrotated_registers,
        resized=({}, (48, 24)),
        gradient_parameters=(
            "model.layer.1.mlp.up_proj.weight", "embeddings.patch_embeddings.weight", "embeddings.register_tokens",
        ),
    ),
    "clip": FamilySpec(
        CLIPVisionTTRegModel,
        VIT_ARCH,
        image_size=32,
        num_prefix=1,
        resized=({"interpolate_pos_encoding": True}, (48, 40)),
        gradient_parameters=("encoder.layers.1.mlp.fc1.weight", "embeddings.patch_embedding.weight"),
    ),
    "siglip": FamilySpec(
        SiglipVisionTTRegModel,
        VIT_ARCH,
        image_size=32,
        num_prefix=0,
        resized=({"interpolate_pos_encoding": True}, (48, 40)),
        gradient_parameters=("encoder.layers.1.mlp.fc1.weight", "embeddings.patch_embedding.weight"),
    ),
    # SigLIP2's NaFlex tower is not here: it takes patches flattened beside `pixel_attention_mask` and
    # `spatial_shapes` (its processor's), not (batch, 3, height, width) images; test_siglip.py covers it
}  # fmt: skip


def tiny_dinov2_config(**overrides) -> Dinov2TTRegConfig:
    """The DINOv2 spec's tiny config: 3 layers, 32 wide, 56 px images of 14 px patches, eager attention."""
    return SPECS["dinov2"].config(**overrides)


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


def load_without_package(folders: list[Path], tmp_path: Path) -> dict[str, torch.Tensor]:
    """The outputs of each folder's model on its inputs, loaded by `REMOTE_LOADER` in a process without ttreg_hf (run
    in ``tmp_path``), each tensor's key its folder and its path in the outputs."""
    (tmp_path / "load.py").write_text(REMOTE_LOADER.replace("# flatten", inspect.getsource(flatten)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, "-I", "load.py", *map(str, folders)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(tmp_path / "outputs.safetensors")


def flatten(outputs, prefix: str = "") -> dict:
    """Every tensor in a model's (nested) outputs, by its path."""
    if isinstance(outputs, torch.Tensor):
        return {prefix: outputs}
    items = outputs.items() if hasattr(outputs, "items") else enumerate(outputs) if isinstance(outputs, tuple) else ()
    return {path: t for key, value in items for path, t in flatten(value, f"{prefix}.{key}").items()}
