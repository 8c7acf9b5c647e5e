"""The ``ttreg`` command line: ``find-neurons``, ``inspect``, ``demo`` and ``export``.

A subcommand is one function that adds its parser and sets ``run``; decorate it with `subcommand` to add it.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .analysis.distributed import init_from_environment, is_main_process
from .index import RegisterNeuronIndex, RegisterNeuronIndexError
from .modeling.registers import TestTimeRegisterMixin

PLANTED = "planted"
MODEL_HELP = "a model name (see `ttreg_hf.hub.MODEL_NAMES`), a local Hugging Face folder, or 'planted'"
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(add_parser: Callable[[argparse._SubParsersAction], None]) -> Callable:
    """Register a function that adds one subcommand's parser (with ``set_defaults(run=...)``)."""
    SUBCOMMANDS.append(add_parser)
    return add_parser


def load_model(spec: str, device: str, weights: str | None = None, **settings) -> TestTimeRegisterMixin:
    """The test-time-register model for a CLI MODEL argument, in eval mode on ``device``.

    ``weights`` is a local checkpoint for a model name, in its upstream layout.
    """
    if spec == PLANTED:
        from .planted import build_planted_model

        model = build_planted_model(**settings)
    elif Path(spec).is_dir():
        from transformers import AutoModel

        model = AutoModel.from_pretrained(spec, **settings)
        if not isinstance(model, TestTimeRegisterMixin):
            raise ValueError(f"{spec} holds a {type(model).__name__}, not a test-time-register model; pass a model name.")
    else:
        try:
            from .hub import load_tt_model
        except ImportError as error:
            raise ValueError(f"Unknown model {spec!r}: this install knows only {PLANTED!r} and local folders.") from error
        model = load_tt_model(spec, weights=weights, **settings)
    return model.to(device).eval()


def _load_index(path: str, model: TestTimeRegisterMixin) -> RegisterNeuronIndex:
    from .discovery import check_index_matches

    index = RegisterNeuronIndex.load(path)
    check_index_matches(index, model)
    return index


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, help="square input size (default: the model's, 224 for DINOv2)")
    parser.add_argument("--weights", help="local checkpoint for a model name, in its upstream layout (offline)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _image_size(args: argparse.Namespace, model: TestTimeRegisterMixin) -> int:
    from .images import default_image_size

    return args.image_size or default_image_size(model)


@subcommand
def _find_neurons_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "find-neurons",
        help="find a checkpoint's register neurons and write an index",
        description="Find the register neurons of MODEL from the images in IMAGE_DIR and write a register-neuron index. "
        "Runs unchanged under `torchrun --nproc_per_node N` or `accelerate launch`, which split the images.",
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images (JPEG, PNG, ...)")
    parser.add_argument("--out", required=True, help="index file to write (.safetensors)")
    parser.add_argument("--threshold", type=float, help="outlier norm threshold (default: automatic)")
    parser.add_argument("--detection-layer", type=int, default=-1, help="block whose output norms define outliers")
    parser.add_argument("--highest-layer", type=int, help="last layer searched (default: the detection layer)")
    parser.add_argument("--top-k", type=int, help="number of neurons (default: smallest k that removes the outliers)")
    parser.add_argument("--num-images", type=int, default=500, help="random subset of the images to use")
    parser.add_argument("--calibration-images", type=int, default=64, help="images the automatic threshold comes from")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    _add_common(parser)
    parser.set_defaults(run=_find_neurons)


def _find_neurons(args: argparse.Namespace) -> int:
    from .discovery import find_register_neurons
    from .images import ImageFolder, image_statistics

    model = load_model(args.model, args.device, args.weights, num_test_time_registers=0)
    images = ImageFolder(args.image_dir, _image_size(args, model), *image_statistics(model))
    result = find_register_neurons(
        model,
        images,
        threshold=args.threshold,
        detection_layer=args.detection_layer,
        highest_layer=args.highest_layer,
        top_k=args.top_k,
        num_images=args.num_images,
        calibration_images=args.calibration_images,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint=args.model if not Path(args.model).is_dir() else Path(args.model).name,
    )
    if is_main_process():
        print(result.summary())
        if result.found:
            print(f"Wrote {result.index.save(args.out)}")
    return 0


@subcommand
def _inspect_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="plot patch norms and CLS attention without and with the test-time register",
        description="Write a figure of IMAGE through MODEL: the input, the last layer's patch-norm map and CLS "
        "attention map, without and with the test-time register, with the numbers.",
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--out", default="report.png", help="figure to write (.png, .pdf, .svg)")
    parser.add_argument("--index", help="register-neuron index file (default: the one shipped for MODEL)")
    _add_common(parser)
    parser.set_defaults(run=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from .images import load_image

    model = load_model(args.model, args.device, args.weights, num_test_time_registers=0)
    index = _load_index(args.index, model) if args.index else _shipped_index(args.model, model)
    image = load_image(args.image, _image_size(args, model))
    _report(model, image, index, args.out, title=f"{args.model}: {Path(args.image).name}")
    return 0


def _shipped_index(spec: str, model: TestTimeRegisterMixin) -> RegisterNeuronIndex:
    from .discovery import check_index_matches
    from .index import find_shipped_index

    index = find_shipped_index(spec)
    if index is None:
        raise RegisterNeuronIndexError(f"No index is shipped for {spec!r}: pass --index, made with `ttreg find-neurons`.")
    check_index_matches(index, model)
    return index


def _report(model, image: torch.Tensor, index, out: str, title: str) -> None:
    from .images import image_statistics, normalize
    from .report import inspect_image, save_report

    pixel_values = normalize(image.unsqueeze(0), *image_statistics(model))
    inspections = inspect_image(model, pixel_values, index, num_test_time_registers=1)
    print("\n".join(inspection.describe() for inspection in inspections))
    print(f"Wrote {save_report(image, inspections, out, title)}")


@subcommand
def _demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="discovery, edit and report end to end (default: offline, on the planted model)",
        description="Without arguments: build the planted model, find its register neurons on generated images, "
        "and write the inspect report of a generated image; offline, in well under a minute on a CPU. With --model: "
        "the same on a real model, with its shipped index (or --index, or discovery on --images).",
    )
    parser.add_argument("--model", default=PLANTED, help=MODEL_HELP)
    parser.add_argument("--image", help="image to inspect (default: a generated one)")
    parser.add_argument("--images", help="folder of images for discovery (a real model without an index)")
    parser.add_argument("--index", help="register-neuron index file (skips discovery)")
    parser.add_argument("--num-images", type=int, default=48, help="generated images for discovery on 'planted'")
    parser.add_argument("--out", default="ttreg_demo.png", help="figure to write")
    _add_common(parser)
    parser.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    if args.model == PLANTED:
        torch.set_num_threads(1)  # the planted model's matrices are too small to gain from threads, and lose a lot
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(threads)


def _run_demo(args: argparse.Namespace) -> int:
    from .discovery import find_register_neurons
    from .images import ImageFolder, image_statistics, load_image, normalize
    from .planted import planted_index, textured_images

    start = time.perf_counter()
    model = load_model(args.model, args.device, args.weights, num_test_time_registers=0)
    size = _image_size(args, model)
    image = load_image(args.image, size) if args.image else textured_images(1, seed=2024, size=size)[0]
    if args.index:
        index = _load_index(args.index, model)
    elif args.images or args.model == PLANTED:
        images = (
            ImageFolder(args.images, size, *image_statistics(model))
            if args.images
            else normalize(textured_images(args.num_images, seed=0, size=size), *image_statistics(model))
        )
        result = find_register_neurons(model, images, checkpoint=args.model)
        print(result.summary())
        if not result.found:
            return 1
        index = result.index
        if args.model == PLANTED:
            print(_planted_recovery(index.neurons, planted_index()))
    else:
        index = _shipped_index(args.model, model)
    _report(model, image, index, args.out, title=f"ttreg demo: {args.model}")
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    return 0


def _planted_recovery(found: dict, planted: dict) -> str:
    found_pairs = {(layer, n) for layer, ids in found.items() for n in ids}
    planted_pairs = {(layer, n) for layer, ids in planted.items() for n in ids}
    hits = len(found_pairs & planted_pairs)
    return f"Planted neurons recovered: precision {hits / len(found_pairs):.2f}, recall {hits / len(planted_pairs):.2f}"


@subcommand
def _export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a Hub-ready folder that loads with `trust_remote_code=True` and no ttreg_hf",
        description="Write MODEL with the register-neuron index INDEX to OUT: config.json with auto_map, generated "
        "configuration and modeling files, model.safetensors, the preprocessor config and a model card; upload it "
        "with `huggingface_hub.upload_folder`.",
    )
    parser.add_argument("model", metavar="MODEL", help="a DINOv2 or CLIP Hugging Face checkpoint id or local folder")
    parser.add_argument("--index", required=True, help="register-neuron index file, or a shipped index name")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--license", help="licence of the base checkpoint (default: known for common checkpoints)")
    parser.add_argument("--repo-id", help="the Hub repository, for the card's usage examples")
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from .export import export_model

    print(f"Wrote {export_model(args.model, args.index, args.out, license=args.license, repo_id=args.repo_id)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttreg", description="Test-time registers for pretrained Vision Transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    init_from_environment()
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError) as error:
        print(f"ttreg {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
