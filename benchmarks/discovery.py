"""Discovery throughput: streaming `find_register_neurons` vs logging every internal per image (the authors' tool).

On the planted-neuron model (`ttreg_hf.planted`), for 64 and 256 generated images: images per second, extra peak
memory beyond the model and the images (each method in a fresh process, `peak_memory.py`), and whether both pick the
same neurons. The baseline runs one image at a time and copies every layer's MLP activations, block outputs and
attention maps to host memory, then scores the neurons the same way (mean |activation| at the outliers, per image,
over the images that have outliers; top k). The ceiling is the model's bare batched forward, with no statistics.

    python benchmarks/discovery.py             # 64 and 256 images
    python benchmarks/discovery.py --quick     # 16 images (a smoke test)
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from ttreg_hf.discovery import find_register_neurons
from ttreg_hf.planted import build_planted_model, planted_index, planted_pixels, textured_images

from peak_memory import extra_peak_mib  # benchmarks/peak_memory.py

BATCH_SIZE = 16


def planted_images(num_images: int, model) -> torch.Tensor:
    return planted_pixels(textured_images(num_images, seed=0))


def streaming(model, images, top_k: int, threshold: float | None) -> dict[int, list[int]]:
    result = find_register_neurons(
        model, images, top_k=top_k, threshold=threshold, batch_size=BATCH_SIZE, eval_images=0
    )
    return {layer: sorted(ids) for layer, ids in result.index.neurons.items()}


def log_everything(model, images, top_k: int, threshold: float) -> dict[int, list[int]]:
    """One image at a time, every internal to host memory (what the authors' tool keeps), then Algorithm 1."""
    model.set_attn_implementation("eager")
    blocks, mlps = model.transformer_blocks, model.register_edit_sites
    logs = []
    for image in images:
        record = {"mlp": [], "blocks": []}
        handles = [
            mlp.register_edit.register_forward_pre_hook(
                lambda module, args, record=record: record["mlp"].append(args[0].cpu().clone())
            )
            for mlp in mlps
        ]
        handles += [
            block.register_forward_hook(
                lambda module, args, output, record=record: record["blocks"].append(
                    (output[0] if isinstance(output, tuple) else output).cpu().clone()
                )
            )
            for block in blocks
        ]
        with torch.no_grad():
            outputs = model(image.unsqueeze(0), output_attentions=True)
        record["attentions"] = [attention.cpu().clone() for attention in outputs.attentions]
        for handle in handles:
            handle.remove()
        logs.append(record)
    num_prefix = model.num_prefix_tokens
    scores = torch.zeros(len(mlps), model.config.mlp_width, dtype=torch.float64)
    for record in logs:
        outliers = record["blocks"][-1][0, num_prefix:].norm(dim=-1) > threshold
        if outliers.any():
            for layer, activations in enumerate(record["mlp"]):
                scores[layer] += activations[0, num_prefix:][outliers].abs().mean(dim=0).double()
    top = scores.flatten().topk(top_k).indices
    index: dict[int, list[int]] = {}
    for flat in top.tolist():
        index.setdefault(flat // scores.shape[1], []).append(flat % scores.shape[1])
    return {layer: sorted(ids) for layer, ids in sorted(index.items())}


def bare_forward(model, images, top_k: int, threshold: float) -> dict[int, list[int]]:
    """The ceiling: the model's batched forward alone (it finds no neurons)."""
    with torch.no_grad():
        for batch in images.split(BATCH_SIZE):
            model(batch)
    return {}


METHODS = {"streaming": streaming, "log-everything": log_everything, "bare forward": bare_forward}


def _in_fresh_process(method: str, num_images: int, threshold: float) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps([method, num_images, threshold])]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def _child(method: str, num_images: int, threshold: float) -> None:
    """Time one method and measure its peak memory beyond the model and the input images."""
    model = build_planted_model(num_test_time_registers=0)
    images = planted_images(num_images, model)
    top_k = sum(len(ids) for ids in planted_index().values())
    result = {}

    def run() -> None:
        start = time.perf_counter()
        neurons = METHODS[method](model, images, top_k, threshold)
        result.update(ips=num_images / (time.perf_counter() - start), neurons={str(k): v for k, v in neurons.items()})

    print(json.dumps({"peak": extra_peak_mib(run, "cpu"), **result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 images only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*json.loads(args.child))

    model = build_planted_model(num_test_time_registers=0)
    # one threshold for both methods, the automatic one of the streaming tool on the first images
    threshold = find_register_neurons(model, planted_images(16, model), top_k=1, eval_images=0).threshold
    truth = {str(layer): sorted(ids) for layer, ids in planted_index().items()}
    print(
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; planted model, threshold {threshold:.3g}"
    )
    print(
        "| images | streaming img/s | log-everything img/s | speed-up | bare forward img/s | streaming / bare | "
        "extra peak MiB streaming / log-everything | same neurons | = planted |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for num_images in [16] if args.quick else [64, 256]:
        fast, slow, bare = (_in_fresh_process(method, num_images, threshold) for method in METHODS)
        print(
            f"| {num_images} | {fast['ips']:.1f} | {slow['ips']:.1f} | {fast['ips'] / slow['ips']:.1f}x | "
            f"{bare['ips']:.1f} | {fast['ips'] / bare['ips']:.2f} | {fast['peak']:.0f} / {slow['peak']:.0f} | "
            f"{'yes' if fast['neurons'] == slow['neurons'] else 'no'} | {'yes' if fast['neurons'] == truth else 'no'} |"
        )


if __name__ == "__main__":
    main()
