"""Evaluation throughput: `ttreg_hf.evaluation.evaluate` against the bare forward, side by side, in one run.

On a folder of generated images (224 px PNGs, half of them with uniform regions, in train/ and val/ class folders),
images per second of (a) the bare pipeline: read and preprocess each batch, then the model's forward with the edit off
and with it on (the least any off-vs-on comparison runs); (b) ``evaluate(tasks=["outliers"])``: every layer's norms
and CLS attention, off and on, with bootstrap intervals; (c) every task the folder allows (outliers, k-NN and linear
probes, LOST with boxes), counting the training images too. They run in rounds that rotate their order; each ratio to
(a) is the median over rounds of one round's ratio (drift on a shared machine cancels out). ``--clock cpu`` times the
process's CPU seconds instead of wall-clock ones: on a machine others load, with ``--threads 1``, what the process
itself spends.

    python benchmarks/evaluate.py                          # the planted model, 64 val images, CPU
    python benchmarks/evaluate.py --quick                  # 8 images, one round (a smoke test)
    python benchmarks/evaluate.py --threads 1 --clock cpu  # a loaded machine
    python benchmarks/evaluate.py --model vits --device cuda   # a DINOv2 ViT-S/14-shaped model, random weights
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel
from ttreg_hf.evaluation import evaluate
from ttreg_hf.evaluation.data import read_dataset
from ttreg_hf.images import open_rgb
from ttreg_hf.planted import build_planted_model, planted_index, planted_preprocessor, textured_images

BATCH_SIZE = 16
MODELS = {
    "planted": lambda: build_planted_model(register_neurons=planted_index()),
    "vits": lambda: Dinov2TTRegModel(
        Dinov2TTRegConfig(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            patch_size=14,
            image_size=224,
            register_neurons={6: [1, 2, 3], 7: [4, 5]},
        )
    ),
}


def write_data(root: Path, num_images: int) -> Path:
    """train/ and val/ with two classes of ``num_images // 2`` images each, and COCO boxes for val/ (its top-left
    quarter); returns the boxes file."""
    coco = {"images": [], "annotations": []}
    for split, seed in (("train", 0), ("val", 1)):
        for label, (name, regions) in enumerate((("regions", True), ("plain", False))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(
                textured_images(num_images // 2, seed=seed + 10 * label, uniform_regions=regions)
            ):
                path = folder / f"{i}.png"
                Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
                if split == "val":
                    coco["images"].append({"id": len(coco["images"]), "file_name": f"{name}/{path.name}"})
                    coco["annotations"].append({"image_id": coco["images"][-1]["id"], "bbox": [0, 0, 112, 112]})
    boxes = root / "boxes.json"
    boxes.write_text(json.dumps(coco))
    return boxes


@torch.no_grad()
def bare(model, preprocessor, paths: list[Path], device: str) -> None:
    """Read, preprocess and run every batch with the edit off and on: no hooks, no statistics."""
    neurons = model.config.register_neurons
    for start in range(0, len(paths), BATCH_SIZE):
        pixels = preprocessor([open_rgb(path) for path in paths[start : start + BATCH_SIZE]])["pixel_values"]
        for setting in ({}, neurons):
            model.set_register_neurons(setting)
            model(pixels.to(device))
    model.set_register_neurons(neurons)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="planted")
    parser.add_argument("--images", type=int, default=64, help="val images (as many train images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall-clock or process CPU seconds")
    parser.add_argument("--quick", action="store_true", help="8 images, one round")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, preprocessor = MODELS[args.model]().to(args.device).eval(), planted_preprocessor()
    with tempfile.TemporaryDirectory() as folder:
        boxes = write_data(Path(folder), args.images)
        val = Path(folder) / "val"
        paths = list(read_dataset(val).images)
        settings = dict(batch_size=BATCH_SIZE, num_resamples=200, calibration_images=BATCH_SIZE)
        runs = {
            "(a) bare forward, off and on": (len(paths), lambda: bare(model, preprocessor, paths, args.device)),
            "(b) evaluate: outliers": (
                len(paths),
                lambda: evaluate(model, preprocessor, val, tasks=["outliers"], **settings),
            ),
            "(c) evaluate: all tasks": (
                2 * len(paths),
                lambda: evaluate(model, preprocessor, folder, boxes=boxes, **settings),
            ),
        }
        bare(model, preprocessor, paths[:BATCH_SIZE], args.device)  # warm-up
        seconds = {name: [] for name in runs}
        names = list(runs)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = clock()
                runs[name][1]()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[name].append(clock() - start)
    print(
        f"{args.model} on {args.device}, {len(paths)} val images of 224 px, batch {BATCH_SIZE}, {args.rounds} round(s), "
        f"{args.clock} clock, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'run':<32} {'images/s':>9} {'vs (a)':>7}")
    base = seconds[names[0]]
    for name, (count, _) in runs.items():
        ratio = statistics.median(
            (runs[names[0]][0] / b) / (count / s) for b, s in zip(base, seconds[name], strict=True)
        )
        print(f"{name:<32} {count / statistics.median(seconds[name]):>9.1f} {1 / ratio:>7.2f}")


if __name__ == "__main__":
    main()
