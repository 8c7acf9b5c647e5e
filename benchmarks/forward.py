"""Forward overhead of test-time registers: parent class vs ttreg_hf class vs a plain hook-based edit.

Same weights, same inputs, runs interleaved in rounds (a, b, c, then b, c, a, ...), printed as a table: the median
time of each, and ratios that are the median over rounds of one round's ratio (drift between rounds cancels out).
(a) the parent class, (b) the ttreg_hf class with the register on, (c) the parent with the edit done by forward hooks
as the authors' code does it (a hook on each listed MLP's activation, a Python loop over neurons).
Edits alone: the only work (b) and (c) do differently, timed by itself (every listed layer's edit on stand-in MLP
activations of the row's shape), so the comparison is not lost in the forward's run-to-run noise.
Peak memory: the extra peak of one (warmed-up) forward, each variant in a fresh process: the CUDA allocator's peak, or
on the CPU the peak resident set size (`peak_memory.py`).

    python benchmarks/forward.py                  # the CPU table (fp32, batch 1 and 8)
    python benchmarks/forward.py --device cuda    # adds fp16/bf16, batch 64, eager and torch.compile
    python benchmarks/forward.py --quick          # the smallest shape, in seconds (a smoke test)
    python benchmarks/forward.py --model "DINOv2 ViT-B/14" --repeats 41   # one model's rows, more rounds
"""

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionModel, Dinov2Model

from ttreg_hf import CLIPVisionTTRegConfig, CLIPVisionTTRegModel, Dinov2TTRegModel, load_index
from ttreg_hf.modeling.dinov2_original import convert_original_state_dict, dinov2_config, load_original_state_dict
from ttreg_hf.modeling.edit import RegisterNeuronEdit

from peak_memory import EXACT_CPU_ENV, extra_peak_mib  # benchmarks/peak_memory.py

SHARED_VITS14 = Path(__file__).resolve().parents[2] / "shared/weights/dinov2_vits14_imgfocus.safetensors"
VARIANTS = ("parent", "ttreg", "hooks")


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


@contextlib.contextmanager
def hook_edit(appender, activations, index, num_registers=1):
    """The authors' way: append the registers with a hook, rewrite each listed activation output neuron by neuron."""

    def append(module, args, output):
        return torch.cat([output, output.new_zeros(output.shape[0], num_registers, output.shape[-1])], dim=1)

    def make_edit(neurons):
        return lambda module, args, output: edit_neuron_by_neuron(output, neurons, num_registers)

    handles = [appender.register_forward_hook(append)]
    handles += [activations[layer].register_forward_hook(make_edit(ids)) for layer, ids in index.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def same_weights(parent: torch.nn.Module, ttreg_class: type) -> torch.nn.Module:
    """A ``ttreg_class`` model holding the parent's weights."""
    model = ttreg_class(parent.config).eval()
    model.load_state_dict(parent.state_dict())
    return model


class HookedEdit(torch.nn.Module):
    """The parent model with the edit applied by forward hooks, registered and removed around every call."""

    def __init__(self, model: torch.nn.Module, sites, index: dict[int, list[int]]):
        super().__init__()
        self.model, self.sites, self.index = model, sites, index

    def forward(self, pixels: torch.Tensor):
        appender, activations = self.sites(self.model)
        with hook_edit(appender, activations, self.index):
            return self.model(pixels)


def dinov2(arch: str, variant: str, real_weights: bool) -> torch.nn.Module:
    """One variant of a DINOv2 backbone; the same seed gives every variant the same weights."""
    config = dinov2_config(arch, num_test_time_registers=1, register_semantics="paper", register_patch_mode="zero")
    index = load_index("dinov2_vitl14").neurons if arch == "vitl14" else synthetic_index(
        config.num_hidden_layers, config.mlp_width
    )
    config.register_neurons = {str(k): list(v) for k, v in index.items()}
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    if real_weights:
        model.load_state_dict(convert_original_state_dict(load_original_state_dict(SHARED_VITS14), config))
    if variant != "hooks":
        return same_weights(model, Dinov2TTRegModel) if variant == "ttreg" else model
    return HookedEdit(model, lambda m: (m.embeddings, [block.mlp.activation_fn for block in m.encoder.layer]), index)


def clip_vitb16(variant: str, real_weights: bool) -> torch.nn.Module:
    """One variant of the `transformers` CLIP ViT-B/16 vision tower (random weights)."""
    config = CLIPVisionTTRegConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        image_size=224,
    )
    index = synthetic_index(config.num_hidden_layers, config.mlp_width)
    config.register_neurons = {str(k): list(v) for k, v in index.items()}
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    if variant != "hooks":
        return same_weights(model, CLIPVisionTTRegModel) if variant == "ttreg" else model
    return HookedEdit(model, lambda m: (m.embeddings, [layer.mlp.activation_fn for layer in m.encoder.layers]), index)


def openclip_vitb16(variant: str, real_weights: bool) -> torch.nn.Module:
    """One variant of the open_clip ViT-B/16 `VisionTransformer` (random weights)."""
    import open_clip

    from ttreg_hf.modeling.open_clip import to_test_time_registers

    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-16").visual.eval()
    index = synthetic_index(len(visual.transformer.resblocks), visual.transformer.resblocks[0].mlp.c_fc.out_features)
    if variant == "ttreg":
        return to_test_time_registers(visual, index)
    if variant == "parent":
        return visual
    return HookedEdit(visual, lambda m: (m.patch_dropout, [b.mlp.gelu for b in m.transformer.resblocks]), index)


MODELS = {  # name -> builder(variant, real_weights)
    "DINOv2 ViT-S/14": lambda variant, real: dinov2("vits14", variant, real),
    "DINOv2 ViT-B/14": lambda variant, real: dinov2("vitb14", variant, real),
    "DINOv2 ViT-L/14": lambda variant, real: dinov2("vitl14", variant, real),
    "CLIP ViT-B/16": clip_vitb16,
    "OpenCLIP ViT-B/16": openclip_vitb16,
}
REAL_WEIGHTS = {"DINOv2 ViT-S/14"}  # models with a real checkpoint in ../shared


def build(name: str, variant: str, device: str, dtype: torch.dtype, compiled: bool):
    real = name in REAL_WEIGHTS and SHARED_VITS14.is_file()
    model = MODELS[name](variant, real).to(device, dtype)
    return torch.compile(model) if compiled else model


def interleaved_times(functions: dict, inputs: torch.Tensor, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run times in seconds, in rounds that call every function once, in an order rotating from round to round."""
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    names = list(functions)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for function in functions.values():
                function(inputs)
        for round_ in range(repeats):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                sync()
                start = time.perf_counter()
                functions[name](inputs)
                sync()
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of one round's time ratio: drift between rounds cancels out."""
    return statistics.median(n / d for n, d in zip(times[numerator], times[denominator]))


def edits_alone(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The edits of one forward on their own, on stand-in MLP activations: (b)'s fused edit vs (c)'s loop."""
    edits = [mlp.register_edit for mlp in model.register_edit_sites if isinstance(mlp.register_edit, RegisterNeuronEdit)]
    shapes = []
    handle = edits[0].register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape))
    with torch.inference_mode():
        model(pixels)
    handle.remove()
    hidden = torch.randn(shapes[0], device=pixels.device, dtype=pixels.dtype)
    return hidden, {
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
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=getattr(torch, dtype))
    with torch.inference_mode():
        model(pixels)  # warm-up: one-off allocations are not the forward's
        print(extra_peak_mib(lambda: model(pixels), device))


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
    print(f"torch {torch.__version__}, {where}, 224 px, {repeats} interleaved rounds")
    print("| model | batch | dtype | compiled | parent (a) ms | ttreg_hf (b) ms | hooks (c) ms | b/a | c/a | "
          "edits alone ms b / c | peak MiB a / b / c |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, dtype, compiled in settings(args.device, args.quick, args.model):
        functions = {v: build(name, v, args.device, dtype, compiled and v != "hooks") for v in VARIANTS}
        pixels = torch.randn(batch, 3, 224, 224, device=args.device, dtype=dtype)
        times = interleaved_times(functions, pixels, repeats)
        a, b, c = (statistics.median(times[v]) * 1e3 for v in VARIANTS)
        edits = "-"
        if not compiled:
            hidden, edit_functions = edits_alone(functions["ttreg"], pixels)
            edit_times = interleaved_times(edit_functions, hidden, repeats).values()
            edits = " / ".join(f"{statistics.median(t) * 1e3:.2f}" for t in edit_times)
        memory = "-" if args.no_memory or compiled else " / ".join(
            f"{peak_memory_mib(name, v, batch, args.device, str(dtype).removeprefix('torch.')):.0f}" for v in VARIANTS
        )
        label = name + (" (real weights)" if name in REAL_WEIGHTS and SHARED_VITS14.is_file() else "")
        print(f"| {label} | {batch} | {str(dtype).removeprefix('torch.')} | {'yes' if compiled else 'no'} | "
              f"{a:.1f} | {b:.1f} | {c:.1f} | {paired_ratio(times, 'ttreg', 'parent'):.3f} | "
              f"{paired_ratio(times, 'hooks', 'parent'):.3f} | {edits} | {memory} |")


if __name__ == "__main__":
    main()
