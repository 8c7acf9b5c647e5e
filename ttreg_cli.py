"""The ``ttreg`` command line: ``find-neurons``, ``inspect``, ``demo``, ``export`` and ``push-index``.

A thin entry point outside the package: importing `ttreg_hf` imports torch, `transformers` and every family, so this
module imports it only inside the commands. Building the parser imports none of them (``ttreg --help`` is instant).
A subcommand is one function that adds its parser and sets ``run``; decorate it with `subcommand` to add it.
Numbers are checked while parsing, output paths before any model is loaded.

A user's mistake is one line on stderr, never a traceback. The rule: the package refuses bad input with a
`TTRegError` (`RegisterNeuronIndexError`, `ExportError`, ...; this module raises its own `CommandError`); where a command
opens a path or a checkpoint the user named, it turns the file errors there (`OSError`: missing, unreadable, a
download that failed; a ``config.json`` that `transformers` refuses) into a `CommandError` (`user_path`). `main`
prints exactly those as ``ttreg: error: ...`` (exit 2). Anything else is a bug and keeps its traceback (exit 1);
``--debug`` re-raises user errors too.
"""

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

PLANTED = "planted"
OPEN_CLIP_PREFIX = "open_clip:"  # an OpenCLIP model as open_clip names it: `open_clip:ViT-B-16:laion2b_s34b_b88k`
OPEN_CLIP_SOURCES = ("hf-hub:", "local-dir:")  # open_clip's own specs of a Hub repository or a folder
TIMM_PREFIX = "timm:"  # a timm model as timm names it: `timm:vit_small_patch14_dinov2.lvd142m`, `timm:local-dir:DIR`
MODEL_HELP = (
    "a model name (`ttreg_hf.hub.model_names()`, 'planted' among them); a Hugging Face checkpoint, Hub id or folder, "
    "of any class holding one vision tower of the package's families (a tower, a classifier, a backbone host, a dual "
    f"encoder, a VLM); {OPEN_CLIP_PREFIX}NAME[:TAG], hf-hub:OWNER/NAME or local-dir:FOLDER (open_clip); or "
    f"{TIMM_PREFIX}NAME (timm)"
)
EXIT_OK, EXIT_BUG, EXIT_USER_ERROR, EXIT_NO_OUTLIERS = 0, 1, 2, 3
EXIT_CODES = f"""exit status:
  {EXIT_OK}  done
  {EXIT_USER_ERROR}  a user's mistake, one line on stderr: a bad argument, a missing or unreadable file, an existing
     output (pass --overwrite), an index that does not fit the model, a download that failed
  {EXIT_NO_OUTLIERS}  find-neurons, demo: the model has no outlier tokens, so no register neurons; no index written
  {EXIT_BUG}  an unexpected error, with its traceback: a bug, please report it"""
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


class CommandError(Exception):
    """A mistake in the command line found by the CLI itself (an existing output file, an unknown MODEL folder),
    reported as the package's `TTRegError`s are (not one of them: this module does not import the package)."""


@contextlib.contextmanager
def user_path() -> Iterator[None]:
    """Around the place a command opens a path or checkpoint the user named: a file error there (missing,
    unreadable, a download that failed, a ``config.json`` whose values `transformers` refuses) is the user's."""
    try:
        yield
    except (OSError, StrictDataclassError) as error:
        raise CommandError(_one_line(error)) from error


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad argument reported in one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def subcommand(add_parser: Callable[[argparse._SubParsersAction], None]) -> Callable:
    """Register a function that adds one subcommand's parser (with ``set_defaults(run=...)``)."""
    SUBCOMMANDS.append(add_parser)
    return add_parser


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an int of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def check_output(path: str | Path, overwrite: bool, *, folder: bool = False) -> Path:
    """``path`` if a command can write it: not a folder (or, for ``folder``, not a file), in a writable folder, and
    not already there unless ``overwrite``. Called before any model is loaded."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise CommandError(f"{path} is a file; --out names the folder to write.")
    if not folder and path.is_dir():
        raise CommandError(f"{path} is a folder; --out names the file to write.")
    if not folder and path.exists() and not overwrite:
        raise CommandError(f"{path} exists; pass --overwrite to replace it, or choose another --out.")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"Cannot write {path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"Cannot write {path}: no write permission in {existing}.")
    return path


@dataclass(frozen=True)
class ModelSpec:
    """A CLI MODEL argument, parsed by `parse_model_spec`: the grammar of every command that takes one.

    kind: ``"name"``, a `load_tt_model` name (the planted test bench's ``planted`` among them); ``"transformers"``,
        a Hugging Face checkpoint (a Hub id or a folder); ``"open_clip"``, an open_clip model name or its ``hf-hub:``
        / ``local-dir:`` spec; ``"timm"``, a timm model name (or its ``hf-hub:`` / ``local-dir:`` spec).
    name: what the kind's loader takes.
    tag: open_clip's pretrained tag (``open_clip:NAME:TAG``), if any.
    """

    kind: str
    name: str
    tag: str | None = None


def parse_model_spec(spec: str) -> ModelSpec:
    """The `ModelSpec` of a MODEL argument (see `MODEL_HELP` and the README's table); reads no file but a folder's
    existence, loads nothing."""
    from ttreg_hf.hub import model_names
    from ttreg_hf.registry import closest_checkpoint

    if spec.startswith(OPEN_CLIP_SOURCES):
        return ModelSpec("open_clip", spec)
    if spec.startswith(OPEN_CLIP_PREFIX):
        rest = spec.removeprefix(OPEN_CLIP_PREFIX)
        name, _, tag = (rest, "", "") if rest.startswith(OPEN_CLIP_SOURCES) else rest.partition(":")
        if not name:
            raise CommandError(f"No model after {OPEN_CLIP_PREFIX!r}: e.g. {OPEN_CLIP_PREFIX}ViT-B-16:openai.")
        return ModelSpec("open_clip", name, tag or None)
    if spec.startswith(TIMM_PREFIX):
        name = spec.removeprefix(TIMM_PREFIX)
        if not name:
            raise CommandError(f"No model after {TIMM_PREFIX!r}: e.g. {TIMM_PREFIX}vit_small_patch14_dinov2.lvd142m.")
        return ModelSpec("timm", name)
    if Path(spec).is_dir() or (spec not in model_names() and "/" in spec):
        return ModelSpec("transformers", spec)
    if spec not in model_names():
        raise CommandError(
            f"Unknown model {spec!r}{closest_checkpoint(spec)}. MODEL is one of {', '.join(model_names())}, a "
            f"Hugging Face id or folder, {OPEN_CLIP_PREFIX}NAME or {TIMM_PREFIX}NAME."
        )
    return ModelSpec("name", spec)


def load_model(spec: str, device: str, weights: str | None = None, image_size: int | None = None, **settings):
    """The model a CLI MODEL argument names (`parse_model_spec`), in eval mode on ``device``, with a test-time-register
    tower, and its checkpoint's preprocessing (`ttreg_hf.images.Preprocessor`; ``image_size`` overrides its size).

    What loads is what the user holds: a tower, or the whole model around one (a VLM, a DPT, an open_clip CLIP, a
    timm ``features_only`` model); the commands run on its tower (`ttreg_hf.analysis.register_tower`).
    ``weights`` is a local checkpoint for a model name, in its upstream layout. ``settings`` go to the loader
    (``register_neurons``, ``num_test_time_registers``, ...); the index comes through the loaders' one attach path:
    ``register_neurons``, else the one saved with the checkpoint, else the one shipped for it.
    """
    parsed = parse_model_spec(spec)
    _check_weights(parsed, spec, weights)
    if parsed.kind == "open_clip":
        from ttreg_hf.modeling.open_clip import create_model_and_transforms, open_clip_preprocessing

        model = _with_index_hint(create_model_and_transforms, parsed.name, parsed.tag, **settings)[0]
        return model.to(device).eval(), open_clip_preprocessing(model.visual, None, image_size)
    if parsed.kind == "timm":
        from ttreg_hf.modeling.timm import create_model, timm_preprocessing, vision_transformer

        model = _with_index_hint(create_model, parsed.name, pretrained=True, **settings)
        return model.to(device).eval(), timm_preprocessing(vision_transformer(model), None, image_size)
    if parsed.kind == "transformers":
        return _load_transformers_checkpoint(spec, device, image_size, **settings)
    from ttreg_hf.hub import checkpoint_preprocessor, load_tt_model

    if weights is not None:
        with user_path():
            model = _with_index_hint(load_tt_model, spec, weights=weights, **settings)
    else:
        try:
            model = _with_index_hint(load_tt_model, spec, **settings)
        except (OSError, StrictDataclassError) as error:
            raise CommandError(
                f"Could not fetch the weights of {spec!r} ({_one_line(error)}); pass a local checkpoint with "
                "--weights FILE."
            ) from error
    return model.to(device).eval(), checkpoint_preprocessor(spec, model, image_size, weights)


def _check_weights(parsed: "ModelSpec", spec: str, weights: str | None) -> None:
    """Refuse ``--weights`` where it would be ignored (MODEL is anything but a model name: a checkpoint, which holds
    its own weights) or where it names nothing."""
    if weights is None:
        return
    if parsed.kind != "name":
        raise CommandError(
            f"--weights is for a model name, and MODEL {spec!r} is a checkpoint, which holds its weights: drop --weights."
        )
    if not Path(weights).exists():
        raise CommandError(f"No checkpoint at --weights {weights}: give a local file or folder.")


def _with_index_hint(load, *args, **kwargs):
    """``load(*args, **kwargs)``; a missing index gets the command line's way to give one."""
    from ttreg_hf.index import RegisterNeuronIndexError

    try:
        return load(*args, **kwargs)
    except RegisterNeuronIndexError as error:
        if kwargs.get("register_neurons") is None:
            raise RegisterNeuronIndexError(f"{error} On the command line: --index FILE.") from error
        raise


def _load_transformers_checkpoint(spec: str, device: str, image_size: int | None, **settings):
    """`load_model` of a Hugging Face checkpoint (a Hub id or a folder): a checkpoint of a family's model type as the
    family's tower (a classifier's, a backbone's or a dual encoder's folder gives its tower), any other model holding
    one tower of the families (a VLM, a DPT, ...) as the class it was saved as (``architectures``), its tower built
    with registers (`ttreg_hf.load_vlm`)."""
    import transformers

    from ttreg_hf.analysis.towers import register_tower
    from ttreg_hf.modeling.hosts import HOSTS
    from ttreg_hf.modeling.vlm import load_vlm, with_test_time_register_tower
    from ttreg_hf.registry import family_of, family_of_model_type, transformers_families

    config_dict = _config_dict(spec)
    model_type = config_dict.get("model_type")
    family = family_of_model_type(model_type)
    if family is not None:
        with user_path():
            model = _with_index_hint(family.model_class.from_pretrained, spec, **settings)
        return model.to(device).eval(), family.preprocessor(model, spec, image_size)
    config = transformers.AutoConfig.from_pretrained(spec)
    try:
        with_test_time_register_tower(config)
    except TypeError as error:
        known = ", ".join(t for family in transformers_families() for t in family.model_types)
        raise CommandError(
            f"{spec} holds a {model_type!r} model; folders of these model types load: {known}, and models that hold "
            f"one tower of theirs (VLMs, DPT, ...): {_one_line(error)}"
        ) from error
    name = (config.architectures or ["AutoModel"])[0]
    architecture = {host.__name__: host for host in HOSTS.model_classes}.get(name) or getattr(transformers, name, None)
    if not (isinstance(architecture, type) and issubclass(architecture, transformers.PreTrainedModel)):
        architecture = transformers.AutoModel
    with user_path():
        model = _with_index_hint(load_vlm, spec, config=config, model_class=architecture, **settings)
    tower = register_tower(model)
    return model.to(device).eval(), _tower_inputs(family_of(tower).preprocessor(tower, spec, image_size), tower)


def _config_dict(spec: str) -> dict:
    """The ``config.json`` of a Hugging Face checkpoint (a Hub id or a folder), as a dict; a folder without one, or a
    file that is not a model config, is refused."""
    import transformers

    folder = Path(spec)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise CommandError(f"{folder} is not a Hugging Face model folder (no config.json); MODEL is {MODEL_HELP}.")
    try:
        config_dict = transformers.PreTrainedConfig.get_config_dict(spec)[0]
    except ValueError as error:
        raise CommandError(f"The config.json of {spec} is not a model config ({_one_line(error)}).") from error
    return config_dict if isinstance(config_dict, dict) else {}


ZERO_SHOT_AUTO_CLASS = "AutoModelForZeroShotImageClassification"  # where a family declares its dual encoder


def load_dual_encoder(spec: str, device: str, weights: str | None = None, image_size: int | None = None, **settings):
    """The dual encoder (image and text towers) a CLI MODEL argument names, for zero-shot classification, in eval mode
    on ``device``: ``(model, preprocessor, tokenizer)``. A `transformers` CLIP / SigLIP / SigLIP2 checkpoint (a Hub id
    or a folder) loads as the class its family declares for `AutoModelForZeroShotImageClassification`, with the
    checkpoint's own tokenizer (`AutoTokenizer`); an open_clip model as `load_model` loads it, with
    ``open_clip.get_tokenizer``. Anything else (a tower alone, a VLM, timm, the planted model) is refused, naming what
    zero-shot needs. ``weights`` and ``settings`` as in `load_model`."""
    import transformers

    from ttreg_hf.analysis.towers import register_tower
    from ttreg_hf.registry import family_of_model_type

    parsed = parse_model_spec(spec)
    _check_weights(parsed, spec, weights)
    need = (
        "zero-shot needs a dual encoder with its text tower and tokenizer: a CLIP, SigLIP or SigLIP2 checkpoint (Hub "
        f"id or folder) or an open_clip model; {spec!r} is "
    )
    if parsed.kind == "open_clip":
        import open_clip

        model, preprocessor = load_model(spec, device, None, image_size, **settings)
        with user_path():
            tokenizer = open_clip.get_tokenizer(parsed.name)
        return model, preprocessor, tokenizer
    if parsed.kind != "transformers":
        what = {"name": "a vision tower", "timm": "a timm vision model"}
        raise CommandError(need + what[parsed.kind] + ".")
    config_dict = _config_dict(spec)
    model_type = config_dict.get("model_type")
    family = family_of_model_type(model_type)
    declared = [cls for name, cls in (family.auto_classes if family else ()) if name == ZERO_SHOT_AUTO_CLASS]
    if not declared or "text_config" not in config_dict:
        raise CommandError(need + f"a {model_type!r} checkpoint without a text tower.")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise CommandError(
            f"{spec} has no tokenizer that loads ({_one_line(error)}): zero-shot prompts its text tower through the "
            "checkpoint's own tokenizer (tokenizer.json or the tokenizer's vocabulary files, as save_pretrained "
            "writes them)."
        ) from error
    with user_path():
        model = _with_index_hint(declared[0].from_pretrained, spec, **settings)
    preprocessor = family.preprocessor(register_tower(model), spec, image_size)
    return model.to(device).eval(), preprocessor, tokenizer


def _tower_inputs(preprocessor, tower):
    """A host's preprocessing (a VLM's image processor) as its tower's inputs: of a tiling (anyres) processor's
    ``(batch, views, 3, H, W)`` pixel values, each image's first view, the whole image at the tower's resolution
    (LLaVA-NeXT, LLaVA-OneVision); the keys only the host reads (``image_sizes``, ...) are dropped."""
    import dataclasses
    import inspect

    accepted = inspect.signature(tower.forward).parameters

    def process(images):
        inputs = {key: value for key, value in preprocessor(images).items() if key in accepted}
        if inputs["pixel_values"].dim() == 5:
            inputs["pixel_values"] = inputs["pixel_values"][:, 0]
        return inputs

    return dataclasses.replace(preprocessor, process=process)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"ttreg: warning: {_one_line(message)}", file=sys.stderr)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-size", type=integer(1), help="square crop size (default: the checkpoint's image processor's)"
    )
    parser.add_argument("--weights", help="local checkpoint for a model name, in its upstream layout (offline)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _device(args: argparse.Namespace) -> str:
    """``--device``, checked before any model is loaded (default: cuda if available, else cpu)."""
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as error:  # not a device name
        raise CommandError(f"--device {args.device}: {_one_line(error)}") from None
    if device.type == "meta":
        raise CommandError("--device meta holds no data, so no model runs there: name a cpu or an accelerator.")
    try:
        torch.empty(0, device=device)  # an unknown index, or a type this machine has no device or build of, fails here
    except (RuntimeError, AssertionError, NotImplementedError, ImportError) as error:  # "not compiled with X" asserts,
        # a backend without its module (hpu), a dispatcher's list of every backend (mps on Linux)
        reason = _one_line(error).split(". ")[0][:200]
        raise CommandError(
            f"--device {args.device} is not on this machine ({reason}): use {_devices_here()}."
        ) from None
    return args.device


def _devices_here() -> str:
    """The devices this machine runs models on, for a message: the cpu and the accelerator's devices."""
    import torch

    accelerator = torch.accelerator.current_accelerator(check_available=True)
    count = torch.accelerator.device_count() if accelerator else 0
    return " or ".join(["cpu", *(f"{accelerator.type}:{index}" for index in range(count))])


@subcommand
def _find_neurons_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "find-neurons",
        help="find a checkpoint's register neurons and write an index",
        description="Find the register neurons of MODEL from the images in IMAGE_DIR and write a register-neuron index. "
        "Runs unchanged under `torchrun --nproc_per_node N` or `accelerate launch`, which split the images.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images (JPEG, PNG, ...)")
    parser.add_argument("--out", required=True, help="index file to write (.safetensors)")
    parser.add_argument("--threshold", type=positive_float, help="outlier norm threshold (default: automatic)")
    parser.add_argument(
        "--detection-layer",
        type=int,
        help="block whose output norms define outliers (default: the one the model reads from its tower: a VLM's "
        "vision_feature_layer, else the last)",
    )
    parser.add_argument(
        "--highest-layer",
        type=int,
        help="last layer searched, at most the detection layer (default: the detection layer)",
    )
    parser.add_argument(
        "--top-k", type=integer(1), help="number of neurons (default: smallest k that removes the outliers)"
    )
    parser.add_argument("--num-images", type=integer(1), default=500, help="random subset of the images to use")
    parser.add_argument(
        "--calibration-images", type=integer(1), default=64, help="images the automatic threshold comes from"
    )
    parser.add_argument(
        "--eval-images",
        type=integer(0),
        help="images with outliers the automatic k and the before/after ratios use (default: 1/32 of them, 8 to 32)",
    )
    parser.add_argument("--batch-size", type=integer(1), default=16)
    parser.add_argument("--seed", type=integer(0), default=0)
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        type=hub_repo_id,
        help="also upload the index with a model card to this Hub repository (as `ttreg push-index` does)",
    )
    _add_common(parser)
    parser.set_defaults(run=_find_neurons)


def _find_neurons(args: argparse.Namespace) -> int:
    from ttreg_hf.analysis.distributed import is_main_process
    from ttreg_hf.discovery import check_eval_images, find_register_neurons
    from ttreg_hf.images import ImageFolder

    out = check_output(args.out, args.overwrite)
    check_eval_images(args.eval_images, args.top_k)
    if args.push_to_hub:
        from huggingface_hub import is_offline_mode

        if is_offline_mode():
            raise CommandError("--push-to-hub needs the Hub, and HF_HUB_OFFLINE is set: unset it, or push later.")
    model, preprocessor = load_model(
        args.model, _device(args), args.weights, args.image_size, num_test_time_registers=0
    )
    with user_path():
        images = ImageFolder(args.image_dir, preprocessor)
    result = find_register_neurons(
        model,
        images,
        threshold=args.threshold,
        detection_layer=args.detection_layer,
        highest_layer=args.highest_layer,
        top_k=args.top_k,
        num_images=args.num_images,
        calibration_images=args.calibration_images,
        eval_images=args.eval_images,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint=args.model if not Path(args.model).is_dir() else Path(args.model).name,
    )
    if is_main_process():
        print(result.summary())
        if result.found:
            with user_path():
                print(f"Wrote {result.index.save(out)}")
            if args.push_to_hub:
                _push_index(result.index, args.push_to_hub)
    return EXIT_OK if result.found else EXIT_NO_OUTLIERS


@subcommand
def _inspect_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="plot patch norms and CLS attention without and with the test-time register",
        description="Write a figure of IMAGE through MODEL: the input, the last layer's patch-norm map and CLS "
        "attention map, without and with the test-time register, with the numbers.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--out", default="report.png", help="figure to write (.png, .pdf, .svg; default: report.png)")
    parser.add_argument(
        "--index",
        help="register-neuron index: a file, a shipped name or a Hub repo id owner/name[@revision][/path] (default: "
        "the one shipped for MODEL; the planted neurons for 'planted')",
    )
    _add_common(parser)
    parser.set_defaults(run=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from ttreg_hf.images import open_rgb

    out = check_output(args.out, args.overwrite)
    _check_figure_format(out)
    if not Path(args.image).is_file():
        raise CommandError(f"No image at {args.image}; check the path.")
    model, preprocessor = load_model(
        args.model, _device(args), args.weights, args.image_size, register_neurons=args.index
    )
    with user_path():
        image = open_rgb(args.image)
    _report(model, preprocessor, image, out, title=f"{args.model}: {Path(args.image).name}")
    return EXIT_OK


def _check_figure_format(path: Path) -> None:
    """Refuse a figure name whose suffix matplotlib cannot write, before any model is loaded."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return  # the report says what to install
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().removeprefix(".") not in formats:
        raise CommandError(
            f"--out {path}: a figure is written as one of {', '.join('.' + name for name in sorted(formats))}; name it "
            "with one of those suffixes."
        )


def _report(model, preprocessor, image, out: Path, title: str) -> None:
    """Print and save the inspect report of the PIL ``image`` through ``model``, with the model's own index."""
    from ttreg_hf.report import inspect_image, save_report

    inputs = preprocessor([image])
    inspections = inspect_image(model, inputs)
    print("\n".join(inspection.describe() for inspection in inspections))
    with user_path():
        print(f"Wrote {save_report(preprocessor.to_images(inputs)[0], inspections, out, title)}")


@subcommand
def _demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="discovery, edit and report end to end (default: offline, on the planted model)",
        description="Without arguments: build the planted model, find its register neurons on generated images, "
        "and write the inspect report of a generated image; offline, in well under a minute on a CPU. With --model: "
        "the same on a real model, with its shipped index (or --index, or discovery on --images). Writes report.png "
        "(and index.safetensors when it ran discovery) into --out-dir.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=PLANTED, help=MODEL_HELP)
    parser.add_argument("--image", help="image to inspect (default: a generated one)")
    parser.add_argument("--images", help="folder of images for discovery (a real model without an index)")
    parser.add_argument("--index", help="register-neuron index file, shipped name or Hub repo id (skips discovery)")
    parser.add_argument("--num-images", type=integer(1), default=48, help="generated images for discovery on 'planted'")
    parser.add_argument("--out-dir", default="ttreg_demo", help="folder to write into (default: ttreg_demo)")
    _add_common(parser)
    parser.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    if args.model == PLANTED:
        torch.set_num_threads(1)  # the planted model's matrices are too small to gain from threads, and lose a lot
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(threads)


def _run_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    from ttreg_hf.analysis.towers import register_tower
    from ttreg_hf.discovery import find_register_neurons
    from ttreg_hf.images import ImageFolder, open_rgb
    from ttreg_hf.planted import planted_index, planted_pixels, textured_images

    start = time.perf_counter()
    discover = not args.index and (args.images or args.model == PLANTED)
    out_dir = check_output(args.out_dir, args.overwrite, folder=True)
    report_file = check_output(out_dir / "report.png", args.overwrite)
    index_file = check_output(out_dir / "index.safetensors", args.overwrite) if discover else None
    if args.image and not Path(args.image).is_file():
        raise CommandError(f"No image at {args.image}; check the path.")
    settings = {"num_test_time_registers": 0} if discover else {"register_neurons": args.index}
    model, preprocessor = load_model(args.model, _device(args), args.weights, args.image_size, **settings)
    if args.image:
        with user_path():
            image = open_rgb(args.image)
    else:
        generated = textured_images(1, seed=2024, size=args.image_size or 224)[0]
        image = Image.fromarray((generated.permute(1, 2, 0) * 255).round().byte().numpy())
    if discover:
        with user_path():
            images = (
                ImageFolder(args.images, preprocessor)
                if args.images  # the planted model's own generated images, with its hand-written statistics
                else planted_pixels(textured_images(args.num_images, seed=0, size=args.image_size or 224))
            )
        result = find_register_neurons(model, images, checkpoint=args.model)
        print(result.summary())
        if not result.found:
            return EXIT_NO_OUTLIERS
        with user_path():
            print(f"Wrote {result.index.save(index_file)}")
        if args.model == PLANTED:
            print(_planted_recovery(result.index.neurons, planted_index()))
        register_tower(model).set_register_neurons(result.index, num_test_time_registers=1)
    _report(model, preprocessor, image, report_file, title=f"ttreg demo: {args.model}")
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    return EXIT_OK


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
        description="Write MODEL, as the class its checkpoint was saved as (a classifier keeps its head, a CLIPModel its "
        "text tower), with the register-neuron index INDEX to OUT: config.json with auto_map, the family's remote-code "
        "files, model.safetensors, the parent's preprocessor config, the index alone "
        "(register_neurons.safetensors) and a model card; an OpenCLIP model (open_clip:NAME) in open_clip's own layout "
        "instead (open_clip_config.json, open_clip_model.safetensors), with the index and a card. Upload it with "
        "`huggingface_hub.upload_folder`. OUT must be empty or new; with --overwrite, a folder holding only files an "
        "export writes is rewritten. The parent checkpoint's own folder is always refused.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"as for find-neurons: a Hugging Face checkpoint (Hub id or folder), or an OpenCLIP model "
        f"({OPEN_CLIP_PREFIX}NAME[:TAG], hf-hub:owner/name, local-dir:folder); model names, {TIMM_PREFIX}NAME and "
        "'planted' are refused with the reason",
    )
    parser.add_argument(
        "--pretrained",
        help=f"open_clip's pretrained tag or checkpoint file of a {OPEN_CLIP_PREFIX}NAME model (or {OPEN_CLIP_PREFIX}"
        "NAME:TAG)",
    )
    parser.add_argument("--index", required=True, help="register-neuron index file, or a shipped index name")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--license", help="licence of the base checkpoint (default: known for common checkpoints)")
    parser.add_argument("--repo-id", help="the Hub repository, for the card's usage examples")
    parser.add_argument("--overwrite", action="store_true", help="rewrite a folder of an earlier export")
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    check_output(args.out, args.overwrite, folder=True)
    parsed = parse_model_spec(args.model)
    if parsed.kind == "open_clip":
        return _export_open_clip(args, parsed)
    if args.pretrained:
        raise CommandError(f"--pretrained is for OpenCLIP models ({OPEN_CLIP_PREFIX}NAME), not {args.model!r}.")
    if parsed.kind != "transformers":
        why = {
            "name": "a model name is a loader, not a checkpoint: export its Hugging Face checkpoint (id or folder)",
            "timm": "a timm model is published with timm's own `save_for_hf` / `push_to_hub`",
        }[parsed.kind]
        raise CommandError(
            f"ttreg export writes Hugging Face and OpenCLIP checkpoints, and {args.model!r} is neither: {why}."
        )
    from ttreg_hf.export import export_model

    try:
        out = export_model(
            args.model, args.index, args.out, license=args.license, repo_id=args.repo_id, overwrite=args.overwrite
        )
    except (OSError, StrictDataclassError) as error:  # opening MODEL (writing OUT is an ExportError)
        if Path(args.model).exists():
            raise CommandError(_one_line(error)) from error
        raise CommandError(
            f"Could not fetch {args.model!r} ({_one_line(error)}); pass a local checkpoint folder as MODEL."
        ) from error
    print(f"Wrote {out}")
    return EXIT_OK


def _export_open_clip(args: argparse.Namespace, parsed: ModelSpec) -> int:
    try:
        from ttreg_hf.export_open_clip import export_open_clip
    except ModuleNotFoundError as error:
        if error.name != "open_clip":
            raise
        raise CommandError(f"{OPEN_CLIP_PREFIX}NAME needs open_clip: pip install open_clip_torch.") from error

    if parsed.tag and args.pretrained:
        raise CommandError(f"{args.model!r} names its pretrained tag already: drop --pretrained {args.pretrained}.")
    with user_path():  # opening the model and its --pretrained file
        out = export_open_clip(
            parsed.name,
            args.index,
            args.out,
            pretrained=parsed.tag or args.pretrained,
            license=args.license,
            repo_id=args.repo_id,
            overwrite=args.overwrite,
        )
    print(f"Wrote {out}")
    return EXIT_OK


@subcommand
def _evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure the edit off vs on on your images: outliers, attention, probes; a table, a JSON, a figure",
        description="Run MODEL over the images of DATA with the test-time register off and on, and report, each with "
        "a paired bootstrap interval: per layer the outlier ratio, max and median patch norm, CLS attention entropy "
        "and its share on outliers and registers; with DATA/train/CLASS/IMAGE and DATA/val/CLASS/IMAGE also k-NN and "
        "linear-probe accuracy on the CLS and mean-patch features; with --boxes, LOST's CorLoc; with --masks, a linear "
        "segmentation probe's mIoU; with --tasks zero-shot, a CLIP / SigLIP / open_clip model's zero-shot accuracy on "
        "DATA's class folders. Prints a table and writes evaluation.json and evaluation.png into --out-dir. Runs unchanged under `torchrun --nproc_per_node N`.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("data", metavar="DATA", help="folder of images, or of train/ and val/ class folders")
    parser.add_argument(
        "--index",
        help="register-neuron index: a file, a shipped name or a Hub repo id (default: the one shipped for MODEL; the "
        "planted neurons for 'planted')",
    )
    parser.add_argument(
        "--tasks",
        type=lambda text: text.split(","),
        help="comma-separated, among outliers,knn,linear,zero-shot,lost,segmentation (default: all that DATA, --boxes "
        "and --masks allow; zero-shot only when named: it loads MODEL's text tower and tokenizer, and reads DATA's "
        "class folders, DATA/CLASS/IMAGE or DATA/val/CLASS/IMAGE, whose names are the class names)",
    )
    parser.add_argument(
        "--template",
        type=prompt_template,
        help="zero-shot prompt, with {} where the class name goes (default: 'a photo of a {}.'); '_' in a folder name "
        "reads as a space",
    )
    parser.add_argument(
        "--boxes", help="object boxes for LOST's CorLoc: a folder of Pascal VOC XML files or a COCO JSON file"
    )
    parser.add_argument(
        "--masks",
        help="segmentation masks for the dense probe (DATA/train and DATA/val): a folder of PNGs named as the images, "
        "one class id per pixel, 255 ignored",
    )
    parser.add_argument("--out-dir", default="ttreg_evaluate", help="folder to write (default: ttreg_evaluate)")
    parser.add_argument(
        "--threshold", type=positive_float, help="outlier norm threshold (default: automatic per layer)"
    )
    parser.add_argument(
        "--calibration-images", type=integer(1), default=64, help="images the automatic thresholds come from"
    )
    parser.add_argument("--batch-size", type=integer(1), default=16)
    parser.add_argument("--resamples", type=integer(1), default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=integer(0), default=0, help="bootstrap seed")
    parser.add_argument("--no-figure", action="store_true", help="write no figure (no matplotlib needed)")
    _add_common(parser)
    parser.set_defaults(run=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from ttreg_hf.analysis.distributed import is_main_process
    from ttreg_hf.evaluation.data import read_dataset
    from ttreg_hf.evaluation.evaluate import check_tasks, evaluate
    from ttreg_hf.evaluation.zero_shot import TEMPLATE

    out_dir = check_output(args.out_dir, args.overwrite, folder=True)
    outputs = ["evaluation.json"] + ([] if args.no_figure else ["evaluation.png"])
    json_file, *figure = (check_output(out_dir / name, args.overwrite) for name in outputs)
    with user_path():  # DATA, and below the --boxes and --masks files
        dataset = read_dataset(args.data)
    zero_shot = "zero-shot" in (args.tasks or ())
    tasks = check_tasks(args.tasks, dataset, zero_shot, boxes=args.boxes is not None, masks=args.masks is not None)
    if args.template and not zero_shot:
        raise CommandError("--template is the zero-shot prompt: add zero-shot to --tasks, or drop --template.")
    load = load_dual_encoder if zero_shot else load_model
    model, preprocessor, *tokenizer = load(
        args.model, _device(args), args.weights, args.image_size, register_neurons=args.index
    )
    with user_path():
        result = evaluate(
            model,
            preprocessor,
            dataset,
            tasks=tasks,
            tokenizer=tokenizer[0] if tokenizer else None,
            template=args.template or TEMPLATE,
            boxes=args.boxes,
            masks=args.masks,
            batch_size=args.batch_size,
            threshold=args.threshold,
            calibration_images=args.calibration_images,
            num_resamples=args.resamples,
            seed=args.seed,
            model_name=args.model,
        )
    if is_main_process():
        print(result.table())
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"Wrote {result.save(json_file)}")
        if figure:
            print(f"Wrote {result.save_figure(figure[0])}")
    return EXIT_OK


def prompt_template(text: str) -> str:
    """An argparse ``type``: a zero-shot prompt template, with ``{}`` where the class name goes."""
    if "{}" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} has no {{}} where the class name goes, e.g. 'a photo of a {{}}.'")
    return text


def hub_repo_id(text: str) -> str:
    """An argparse ``type``: a Hub repository id ``owner/name``, checked before any model is loaded."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(_one_line(error)) from None
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'owner/name'")
    return text


@subcommand
def _push_index_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push-index",
        help="upload a register-neuron index alone, with a model card, to a Hub repository",
        description="Upload INDEX to the Hub model repository REPO_ID as register_neurons.safetensors, with a model "
        "card generated from its provenance (checkpoint, how it was found, threshold, outlier ratios, package "
        "version) and tagged `ttreg-index`; the repository is created if missing. The weights are not uploaded: "
        "load it with `register_neurons=REPO_ID` or `--index REPO_ID`. Logs in as `huggingface_hub` does (HF_TOKEN or "
        "`hf auth login`); HF_ENDPOINT names another Hub.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("index", metavar="INDEX", help="register-neuron index file (or a shipped name)")
    parser.add_argument("repo_id", metavar="REPO_ID", type=hub_repo_id, help="Hub repository, owner/name")
    parser.add_argument("--revision", help="branch to commit to, created from main if missing (default: main)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--commit-message", help="the commit's message")
    parser.set_defaults(run=_push_index_command)


def _push_index_command(args: argparse.Namespace) -> int:
    from ttreg_hf.index import load_index

    _push_index(
        load_index(args.index),
        args.repo_id,
        revision=args.revision,
        private=args.private or None,
        message=args.commit_message,
    )
    return EXIT_OK


def _push_index(index, repo_id: str, revision: str | None = None, private: bool | None = None, message=None) -> None:
    with user_path():  # the Hub's refusals (HfHubHTTPError is an OSError): not logged in, no access, offline
        commit = index.push_to_hub(repo_id, revision=revision, private=private, commit_message=message)
    print(f"Pushed the index to {repo_id}{f' (revision {revision})' if revision else ''}: {commit.commit_url}")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ttreg",
        description="Test-time registers for pretrained Vision Transformers.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ttreg_hf {version('ttreg_hf')}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ttreg``; returns the exit status (see `EXIT_CODES`)."""
    args = build_parser().parse_args(argv)
    from ttreg_hf.errors import TTRegError

    try:
        from ttreg_hf.analysis.distributed import init_from_environment

        init_from_environment()
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except (CommandError, TTRegError) as error:
        if args.debug:
            raise
        print(f"ttreg: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
