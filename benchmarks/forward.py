"""Forward overhead of test-time registers: parent class vs ttreg_hf class vs a plain hook-based edit.

Same weights, same inputs, runs interleaved in rounds (a, b, c, then b, c, a, ...), printed as a table: the median
time of each, and ratios that are the median over rounds of one round's ratio (drift between rounds cancels out).
(a) the parent class, (b) the ttreg_hf class with the register on, (c) the parent with the edit done by forward hooks
as the authors' code does it (a hook on each listed MLP's activation, a Python loop over neurons).
Edits alone: the only work (b) and (c) do differently, timed by itself (every listed layer's edit on stand-in MLP
activations of the row's shape), so the comparison is not lost in the forward's run-to-run noise.
Peak memory: the extra peak of one (warmed-up) forward, each variant in a fresh process: the CUDA allocator's peak, or
on the CPU the peak resident set size (`peak_memory.py`).
Models: one row per family (`MODELS`), random weights except DINOv2 ViT-S/14 (the checkpoint in ../shared when there),
a synthetic 45-neuron index except DINOv2 ViT-L/14 (the shipped one); 224 px images, SigLIP2 NaFlex 256 patches (16x16).

    python benchmarks/forward.py                  # the CPU table (fp32, batch 1 and 8)
    python benchmarks/forward.py --device cuda    # adds fp16/bf16, batch 64, eager and torch.compile
    python benchmarks/forward.py --quick          # the smallest shape, in seconds (a smoke test)
    python benchmarks/forward.py --model "DINOv2 ViT-B/14" --repeats 41   # one model's rows, more rounds
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import open_clip
import timm
import torch
from transformers import Dinov2Model, DINOv3ViTModel, Siglip2VisionModel

from ttreg_hf import families, load_index
from ttreg_hf.modeling import open_clip as open_clip_registers
from ttreg_hf.modeling import timm as timm_registers
from ttreg_hf.modeling.dinov2_original import (
    convert_original_state_dict,
    dinov2_architecture,
    load_original_state_dict,
)
from ttreg_hf.planted import planting_sites

from peak_memory import EXACT_CPU_ENV, extra_peak_mib  # benchmarks/peak_memory.py

FAMILIES = {family.name: family for family in families()}
SHARED_VITS14 = Path(__file__).resolve().parents[2] / "shared/weights/dinov2_vits14_imgfocus.safetensors"
VARIANTS = ("parent", "ttreg", "hooks")
PIXELS = {"base": 224, "tiny": 32}  # the input images' side: the table's, the smoke test's


def synthetic_index(num_layers: int, mlp_width: int, num_neurons: int = 45, seed: int = 0) -> dict[int, list[int]]:
    """An index shaped like the published ViT-L/14 one: ``num_neurons`` neurons over the middle quarter of layers."""
    rng = random.Random(seed)
    layers = list(range(num_layers // 2, num_layers // 2 + max(1, num_layers // 4)))
    index = {layer: [] for layer in layers}
    for neuron in rng.sample(range(mlp_width), num_neurons):
        index[rng.choice(layers)].append(neuron)
    return {layer: ids for layer, ids in index.items() if ids}


def edit_neuron_by_neuron(output: torch.Tensor, neurons: list[int], num_registers: int = 1) -> torch.Tensor:
    """The hook's edit: a Python loop over neurons, each moving its max onto the registers and zeroing the rest."""
    for neuron in neurons:
        top = output[:, :, neuron].max(dim=1, keepdim=True).values
        output[:, :-num_registers, neuron] = 0
        output[:, -num_registers:, neuron] = top
    return output


class HookSites(NamedTuple):
    """Where the hook-based edit hooks into a parent model."""

    appender: torch.nn.Module  # its output gets the registers appended
    projections: list[torch.nn.Module]  # each block's MLP output projection: its input is the activations
    extra: tuple = ()  # (a module's ``register_*_hook`` method, the hook) for what else the registers need


@contextlib.contextmanager
def hook_edit(sites: HookSites, index: dict[int, list[int]], num_registers: int = 1):
    """The authors' way: append the registers with a hook, rewrite each listed layer's MLP activations (the input of
    its output projection) neuron by neuron."""

    def append(module, args, output):
        return torch.cat([output, output.new_zeros(output.shape[0], num_registers, output.shape[-1])], dim=1)

    def make_edit(neurons):
        return lambda module, args: (edit_neuron_by_neuron(args[0], neurons, num_registers), *args[1:])

    handles = [sites.appender.register_forward_hook(append)]
    handles += [sites.projections[layer].register_forward_pre_hook(make_edit(ids)) for layer, ids in index.items()]
    handles += [register_hook(hook) for register_hook, hook in sites.extra]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class HookedEdit(torch.nn.Module):
    """The parent model with the edit applied by forward hooks, registered and removed around every call."""

    def __init__(self, model: torch.nn.Module, sites: Callable[[torch.nn.Module], HookSites], index: dict):
        super().__init__()
        self.model, self.sites, self.index = model, sites, index

    def forward(self, *inputs: torch.Tensor):
        with hook_edit(self.sites(self.model), self.index):
            return self.model(*inputs)


def images(fields: dict, batch: int, pixels: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, pixels, pixels),)


def naflex_patches(fields: dict, batch: int, pixels: int) -> tuple[torch.Tensor, ...]:
    """SigLIP2's NaFlex inputs for square images of ``fields["num_patches"]`` patches, none of them padding."""
    side = int(fields["num_patches"] ** 0.5)
    pixel_values = torch.randn(batch, side * side, 3 * fields["patch_size"] ** 2)
    return pixel_values, torch.ones(batch, side * side, dtype=torch.long), torch.tensor([[side, side]] * batch)


def config_depth_and_width(model: torch.nn.Module) -> tuple[int, int]:
    """A `transformers` parent's depth and MLP width (its config is a ttreg_hf one, which knows the width)."""
    return model.config.num_hidden_layers, model.config.mlp_width


@dataclasses.dataclass(frozen=True)
class Family:
    """One row of the table: the parent model at a size, the ttreg_hf model on its weights, the hooks' sites."""

    parent: Callable[[dict], torch.nn.Module]  # architecture fields -> the parent model (weights from the seed)
    ttreg: Callable[[torch.nn.Module, dict], torch.nn.Module]  # (parent model, index) -> the ttreg_hf model
    hook_sites: Callable[[torch.nn.Module], HookSites]
    sizes: dict[str, dict]  # "base" (the table's) and "tiny" (the smoke test's) architecture fields
    depth_and_width: Callable[[torch.nn.Module], tuple[int, int]] = config_depth_and_width  # the index's bounds
    inputs: Callable[[dict, int, int], tuple[torch.Tensor, ...]] = images  # (fields, batch, pixels) -> inputs
    shipped_index: str | None = None  # the index used at the base size instead of a synthetic one
    real_weights: Callable[[torch.nn.Module], object] | None = None  # loads a real checkpoint at the base size

    def build(self, variant: str, size: str = "base") -> torch.nn.Module:
        """One variant; the same seed gives every variant the same weights."""
        torch.manual_seed(0)
        model = self.parent(self.sizes[size])
        if size == "base" and self.has_real_weights:
            self.real_weights(model)
        if size == "base" and self.shipped_index:
            index = load_index(self.shipped_index).neurons
        else:
            index = synthetic_index(*self.depth_and_width(model))
        if variant == "ttreg":
            return self.ttreg(model, index)
        return model if variant == "parent" else HookedEdit(model, self.hook_sites, index)

    @property
    def has_real_weights(self) -> bool:
        return self.real_weights is not None and SHARED_VITS14.is_file()


def hook_sites(family_name: str) -> Callable[[torch.nn.Module], HookSites]:
    """The sites of a family's parent model, from its declaration: the appender its seams name, the MLP output
    projections its planting sites name; the hooks some parents need for a register (`EXTRA_HOOKS`)."""
    family, extra = FAMILIES[family_name], EXTRA_HOOKS.get(family_name, lambda model: ())

    def sites(model: torch.nn.Module) -> HookSites:
        seams = inspect.getattr_static(family.model_class, "register_seams")
        if isinstance(seams, property):  # seams that depend on the model (SigLIP's optional head): a meta copy's
            with torch.device("meta"):
                seams = family.model_class(dataclasses.replace(model.config, num_test_time_registers=0)).register_seams
        appender, projections = model.get_submodule(seams.appender), [b.mlp_out for b in planting_sites(model).blocks]
        return HookSites(appender, projections, extra(model))

    return sites


def transformers_family(family_name: str, sizes: dict, **settings) -> Family:
    """A row for a `transformers` family's parent: built from the ttreg_hf config (the parent ignores its register
    fields); the ttreg_hf model is built from it with the index and loads the parent's weights."""
    family = FAMILIES[family_name]

    def ttreg(parent: torch.nn.Module, index: dict[int, list[int]]) -> torch.nn.Module:
        model = family.model_class(dataclasses.replace(parent.config, register_neurons=index)).eval()
        model.load_state_dict(parent.state_dict())
        return model

    parent = lambda fields: family.parents[0](family.config_class(**fields)).eval()  # noqa: E731
    return Family(parent, ttreg, hook_sites(family_name), sizes, **settings)


def dinov3_unrotated_register(model: DINOv3ViTModel) -> tuple:
    """DINOv3's registers also get the identity rotation (RoPE rotates only the last ``len(cos)`` tokens)."""
    unrotated = lambda module, args, rope: tuple(  # noqa: E731
        torch.nn.functional.pad(part, (0, 0, 0, 1), value=value) for part, value in zip(rope, (1.0, 0.0))
    )
    return ((model.rope_embeddings.register_forward_hook, unrotated),)


def siglip2_mask_with_register(model: Siglip2VisionModel) -> tuple:
    """SigLIP2's attention mask gets an entry for the register."""

    def with_register(module, args):
        return (args[0], torch.cat([args[1], args[1].new_ones(len(args[1]), 1)], dim=1), *args[2:])

    return ((model.register_forward_pre_hook, with_register),)


# what the hook-based edit needs beyond appending and editing, by family: what the parent model lacks for a register
EXTRA_HOOKS = {"dinov3": dinov3_unrotated_register, "siglip2": siglip2_mask_with_register}


def dinov2_fields(arch: str) -> dict:
    """The upstream ``dinov2_{arch}`` backbone's architecture, with `Dinov2Model`'s position interpolation: the
    parent's, so that (a), (b) and (c) compute the same thing at 224 px."""
    return {**dinov2_architecture(arch), "position_interpolation": "transformers"}


def load_shared_vits14(model: Dinov2Model) -> None:
    model.load_state_dict(convert_original_state_dict(load_original_state_dict(SHARED_VITS14), model.config))


def open_clip_visual(fields: dict) -> torch.nn.Module:
    return open_clip.create_model("ViT-B-16", **fields).visual.eval()


# architecture fields: a base B/16 at 224 px, and a tiny one (32 px, 16 patches) for the smoke test
B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, patch_size=8)
VIT_SIZES = {"base": dict(B16, image_size=224), "tiny": dict(TINY, image_size=32)}
TINY_DINOV2 = dict(
    hidden_size=32,
    mlp_ratio=2,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=48,
    patch_size=8,
    position_interpolation="transformers",
)  # a 6x6 position table: 32 px images are interpolated, as 224 px ones are at the base sizes
TINY_OPEN_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=4, head_width=16, mlp_ratio=2),
    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
)
TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2)


def dinov2_family(arch: str, **settings) -> Family:
    return transformers_family("dinov2", {"base": dinov2_fields(arch), "tiny": TINY_DINOV2}, **settings)


MODELS = {
    "DINOv2 ViT-S/14": dinov2_family("vits14", real_weights=load_shared_vits14),
    "DINOv2 ViT-B/14": dinov2_family("vitb14"),
    "DINOv2 ViT-L/14": dinov2_family("vitl14", shipped_index="dinov2_vitl14"),
    "CLIP ViT-B/16": transformers_family("clip", VIT_SIZES),
    "OpenCLIP ViT-B/16": Family(
        lambda fields: open_clip.create_model("ViT-B-16", **fields).visual.eval(),
        open_clip_registers.to_test_time_registers,
        hook_sites("open_clip"),
        {"base": {}, "tiny": TINY_OPEN_CLIP},
        depth_and_width=lambda visual: (
            len(visual.transformer.resblocks),
            visual.transformer.resblocks[0].mlp.c_fc.out_features,
        ),
    ),
    "ViT-B/16": transformers_family("vit", VIT_SIZES),
    "DeiT-B/16 distilled": transformers_family("deit", VIT_SIZES),
    "DINOv3 ViT-B/16": transformers_family(
        "dinov3", {name: dict(fields, num_register_tokens=4) for name, fields in VIT_SIZES.items()}
    ),
    "SigLIP B/16": transformers_family("siglip", VIT_SIZES),
    "SigLIP2 B/16 NaFlex": transformers_family(
        "siglip2",
        {"base": dict(B16, num_patches=256), "tiny": dict(TINY, num_patches=16)},  # 224 px's 16x16 patches, 32 px's 4x4
        inputs=naflex_patches,
    ),
    "timm ViT-B/16": Family(
        lambda fields: timm.create_model("vit_base_patch16_224", **fields).eval(),
        timm_registers.to_test_time_registers,
        hook_sites("timm"),
        {"base": {}, "tiny": TINY_TIMM},
        depth_and_width=lambda model: (len(model.blocks), model.blocks[0].mlp.fc2.in_features),
    ),
}


def build(name: str, variant: str, device: str, dtype: torch.dtype, compiled: bool, size: str = "base"):
    model = MODELS[name].build(variant, size).to(device, dtype)
    return torch.compile(model) if compiled else model


def example_inputs(name: str, batch: int, device: str, dtype: torch.dtype, size: str = "base") -> tuple:
    """The forward's inputs for ``batch`` images (224 px at the base size); floating-point ones in ``dtype``."""
    family = MODELS[name]
    inputs = family.inputs(family.sizes[size], batch, PIXELS[size])
    return tuple(x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in inputs)


def interleaved_times(functions: dict, inputs: tuple, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run times in seconds, in rounds that call every function once, in an order rotating from round to round."""
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    names = list(functions)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for function in functions.values():
                function(*inputs)
        for round_ in range(repeats):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                sync()
                start = time.perf_counter()
                functions[name](*inputs)
                sync()
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of one round's time ratio: drift between rounds cancels out."""
    return statistics.median(n / d for n, d in zip(times[numerator], times[denominator]))


def edits_alone(model: torch.nn.Module, inputs: tuple) -> tuple[tuple[torch.Tensor], dict]:
    """The edits of one forward on their own, on stand-in MLP activations: (b)'s fused edit vs (c)'s loop."""
    edits = [mlp.register_edit for mlp in model.register_edit_sites if mlp.register_edit.neuron_ids]
    shapes = []
    handle = edits[0].register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape))
    with torch.inference_mode():
        model(*inputs)
    handle.remove()
    hidden = torch.randn(shapes[0], device=inputs[0].device, dtype=inputs[0].dtype)
    return (hidden,), {
        "ttreg": lambda h: [edit(h) for edit in edits],
        "hooks": lambda h: [edit_neuron_by_neuron(h, list(edit.neuron_ids)) for edit in edits],
    }


def peak_memory_mib(name: str, variant: str, batch: int, device: str, dtype: str) -> float:
    """Extra peak memory of one forward of one variant, measured in a fresh process."""
    command = [sys.executable, __file__, "--peak-memory", json.dumps([name, variant, batch, device, dtype])]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **EXACT_CPU_ENV})
    return float(result.stdout.split()[-1])


def _measure_peak_memory(name: str, variant: str, batch: int, device: str, dtype: str) -> None:
    model = build(name, variant, device, getattr(torch, dtype), compiled=False)
    inputs = example_inputs(name, batch, device, getattr(torch, dtype))
    with torch.inference_mode():
        model(*inputs)  # warm-up: one-off allocations are not the forward's
        print(extra_peak_mib(lambda: model(*inputs), device))


def settings(device: str, quick: bool, names: list[str] | None) -> list[tuple[str, int, torch.dtype, bool]]:
    """(model, batch, dtype, compiled) rows of the table."""
    names = names or (list(MODELS)[:1] if quick else list(MODELS))
    if device == "cpu":
        batches = [1] if quick else [1, 8]
        return [(name, batch, torch.float32, False) for name in names for batch in batches]
    return [
        (name, 64, dtype, compiled)
        for name in names
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
        for compiled in (False, True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="only the first model, smallest batch, 3 repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", action="append", choices=list(MODELS), help="only this model (repeatable)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    parser.add_argument("--peak-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory:
        return _measure_peak_memory(*json.loads(args.peak_memory))

    repeats = 3 if args.quick else args.repeats
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, 224 px (SigLIP2: 256 patches), {repeats} interleaved rounds")
    print(
        "| model | batch | dtype | compiled | parent (a) ms | ttreg_hf (b) ms | hooks (c) ms | b/a | c/a | "
        "edits alone ms b / c | peak MiB a / b / c |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, dtype, compiled in settings(args.device, args.quick, args.model):
        functions = {v: build(name, v, args.device, dtype, compiled and v != "hooks") for v in VARIANTS}
        inputs = example_inputs(name, batch, args.device, dtype)
        times = interleaved_times(functions, inputs, repeats)
        a, b, c = (statistics.median(times[v]) * 1e3 for v in VARIANTS)
        edits = "-"
        if not compiled:
            hidden, edit_functions = edits_alone(functions["ttreg"], inputs)
            edit_times = interleaved_times(edit_functions, hidden, repeats).values()
            edits = " / ".join(f"{statistics.median(t) * 1e3:.2f}" for t in edit_times)
        memory = (
            "-"
            if args.no_memory or compiled
            else " / ".join(
                f"{peak_memory_mib(name, v, batch, args.device, str(dtype).removeprefix('torch.')):.0f}"
                for v in VARIANTS
            )
        )
        label = name + (" (real weights)" if MODELS[name].has_real_weights else "")
        print(
            f"| {label} | {batch} | {str(dtype).removeprefix('torch.')} | {'yes' if compiled else 'no'} | "
            f"{a:.1f} | {b:.1f} | {c:.1f} | {paired_ratio(times, 'ttreg', 'parent'):.3f} | "
            f"{paired_ratio(times, 'hooks', 'parent'):.3f} | {edits} | {memory} |"
        )


if __name__ == "__main__":
    main()
