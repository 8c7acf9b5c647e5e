"""Discovery throughput: `find_register_neurons` against the model's bare batched forward, side by side.

On a planted-neuron model, for 256 and 1024 generated images, on two distributions: the images as the model expects
them (``normalised``), and the same images left in [0, 1] (``unnormalised``: about 30 % of the planted model's patch
tokens are outliers, most calibration tokens sit above the provisional bound). Images per second of (a) the model's bare batched forward
(batch 16, no statistics: the ceiling of any tool that has to run the model), (b) discovery with a given threshold and
k (``eval_images=0``: no before / after ratio), (c) discovery with its defaults (automatic threshold, automatic k).
They run in one process, in rounds that rotate their order; each ratio to (a) is the median over rounds of one round's
ratio, so that drift on a shared machine cancels out, in wall-clock time (the headline) and in this process's CPU time
(all its threads; steadier where other processes take the cores). Also: the extra peak memory of (c) in a fresh process
(`peak_memory.py`), flat in the number of images, and whether (b) and (c) find the planted neurons.

    python benchmarks/discovery.py                     # the DINOv2-shaped planted model, 224 px, CPU
    python benchmarks/discovery.py --quick             # 16 images, one round (a smoke test)
    python benchmarks/discovery.py --model clip        # a family's tiny planted model, as tests/family_models.py builds it
    python benchmarks/discovery.py --device cuda --dtype bfloat16 --compile
    python benchmarks/discovery.py --processes 2       # and (c) under torchrun: 1 process against 2
    python benchmarks/discovery.py --threads 1         # one thread per process (steadier on a shared machine)
    python benchmarks/discovery.py --distributions unnormalised  # the outlier-heavy distribution only
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ttreg_hf.analysis.distributed import all_reduce, init_from_environment, is_main_process, rank_and_world_size
from ttreg_hf.discovery import find_register_neurons
from ttreg_hf.images import normalize
from ttreg_hf.planted import build_planted_model, planted_index, textured_images

from peak_memory import EXACT_CPU_ENV, extra_peak_mib  # benchmarks/peak_memory.py

BATCH_SIZE = 16
DISTRIBUTIONS = ("normalised", "unnormalised")
TESTS = Path(__file__).resolve().parents[1] / "tests"


def family_models():
    """tests/family_models.py, the one definition of every family's tiny planted model (a helper module of the tests,
    not a test file; put on the path for the import only)."""
    sys.path.insert(0, str(TESTS))
    try:
        import family_models
    finally:
        sys.path.remove(str(TESTS))
    return family_models


def model_names() -> list[str]:
    return ["planted", *family_models().PLANTABLE, "siglip2"]


def build(name: str, num_images: int, device: str, dtype: torch.dtype, distribution: str = "normalised"):
    """The planted model on ``device`` in ``dtype``, ``num_images`` images of ``distribution`` for it (on the CPU, in
    float32: discovery moves each batch), and the planted neurons as an index."""
    if name == "planted":
        model = build_planted_model(num_test_time_registers=0)
        images = textured_images(num_images, seed=0)
        truth = planted_index()
    else:
        tiny = family_models()
        model = tiny.planted(name)
        images = textured_images(num_images, seed=0, size=tiny.SIZE)
        truth = {tiny.LAYER: tuple(tiny.NEURONS)}
    if distribution == "normalised":  # as the tests and the planted model's preprocessing do
        images = normalize(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    if name == "siglip2":
        images = family_models().naflex(images)
    return model.to(device, dtype), images, {layer: sorted(ids) for layer, ids in truth.items()}


def batches(images, device: str, dtype: torch.dtype) -> list:
    """The bare forward's inputs, stacked (key by key for keyword inputs) in advance."""
    if isinstance(images, torch.Tensor):
        return [batch.to(device, dtype) for batch in images.split(BATCH_SIZE)]
    chunks = [images[i : i + BATCH_SIZE] for i in range(0, len(images), BATCH_SIZE)]
    return [
        {
            key: torch.stack([image[key] for image in chunk]).to(
                device, dtype if chunk[0][key].is_floating_point() else None
            )
            for key in chunk[0]
        }
        for chunk in chunks
    ]


def methods(model, images, threshold: float, top_k: int, device: str, dtype: torch.dtype) -> dict:
    """name -> function returning its `DiscoveryResult` (`None` for the bare forward)."""
    stacked = batches(images, device, dtype)

    def bare_forward():
        with torch.no_grad():
            for batch in stacked:
                model(**batch) if isinstance(batch, dict) else model(batch)

    def discovery(**settings):
        return find_register_neurons(model, images, batch_size=BATCH_SIZE, **settings)

    return {
        "bare forward": bare_forward,
        "given": lambda: discovery(threshold=threshold, top_k=top_k, eval_images=0),
        "defaults": discovery,
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(functions: dict, rounds: int, device: str) -> tuple[dict[str, list[float]], dict, dict]:
    """Run times in seconds, wall-clock and this process's CPU time, in rounds calling every function once, in an
    order rotating from round to round; and what each returned."""
    names, returned = list(functions), {}
    times, cpu_times = {name: [] for name in functions}, {name: [] for name in functions}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            returned[name] = functions[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times, returned


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Throughput of ``numerator`` over ``denominator``: the median over rounds of one round's ratio."""
    return statistics.median(d / n for n, d in zip(times[numerator], times[denominator]))


def prepare(args, num_images: int, distribution: str = "normalised"):
    """The model (compiled if asked), the images, the truth, and the given threshold and k: the automatic threshold
    of the first 16 images and the number of planted neurons."""
    dtype = getattr(torch, args.dtype)
    model, images, truth = build(args.model, num_images, args.device, dtype, distribution)
    if args.compile:
        model.compile()
    threshold = find_register_neurons(model, images[:16], top_k=1, eval_images=0).threshold
    return model, images, truth, threshold, sum(len(ids) for ids in truth.values()), dtype


def _child_memory(args, num_images: int, distribution: str) -> None:
    """Extra peak memory of discovery with its defaults, beyond the model and the images (a fresh process)."""
    model, images, *_ = prepare(args, num_images, distribution)
    find_register_neurons(model, images[:BATCH_SIZE], top_k=1, eval_images=0)  # warm-up: lazy initialisations
    print(json.dumps({"peak": extra_peak_mib(lambda: find_register_neurons(model, images), args.device)}))


def _child_processes(args, num_images: int) -> None:
    """Discovery with its defaults in this process's share (under torchrun): img/s over all processes, and what
    rank 0 found."""
    init_from_environment()
    rank, world_size = rank_and_world_size()
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world_size))
    else:  # one GPU per process, as init_from_environment chose
        args.device = f"cuda:{torch.cuda.current_device()}"
    model, images, truth, *_ = prepare(args, num_images)
    find_register_neurons(model, images[: 2 * BATCH_SIZE * world_size])  # warm-up
    rates, result = [], None
    for _ in range(args.rounds):
        all_reduce(torch.zeros(1))  # start together
        start = time.perf_counter()
        result = find_register_neurons(model, images, batch_size=BATCH_SIZE)
        all_reduce(torch.zeros(1))
        rates.append(num_images / (time.perf_counter() - start))
    if is_main_process():
        neurons = {str(layer): sorted(ids) for layer, ids in result.index.neurons.items()}
        details = {k: v for k, v in result.index.details.items() if k != "scores"}
        print(json.dumps({"ips": statistics.median(rates), "neurons": neurons, "details": details}))


def _child(mode: str, args, num_images: int, distribution: str = "normalised") -> dict:
    command = [sys.executable, __file__, *_passed(args), "--child", json.dumps([mode, num_images, distribution])]
    env = {**os.environ, **(EXACT_CPU_ENV if mode == "memory" else {})}  # exact peaks cost time: not when timing
    if mode.startswith("torchrun"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", mode[8:]]
        command = [*launcher, *command[1:]]
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // int(mode[8:])))
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _passed(args) -> list[str]:
    """The settings a child process needs, as arguments."""
    passed = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--rounds", str(args.rounds)]
    return passed + (["--compile"] if args.compile else []) + (["--threads", str(args.threads)] if args.threads else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="planted", help="planted (default), or a family: " + ", ".join(model_names()[1:])
    )
    parser.add_argument("--images", type=int, nargs="+", default=[256, 1024], help="numbers of images (256 1024)")
    parser.add_argument(
        "--distributions", nargs="+", choices=DISTRIBUTIONS, default=list(DISTRIBUTIONS), help="image distributions"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each method (3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="model.compile() first (warm-up untimed)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads per process (default: torch's; under torchrun, the cores / N)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak memory")
    parser.add_argument("--processes", type=int, default=1, help="also time (c) under torchrun: 1 vs this many")
    parser.add_argument("--quick", action="store_true", help="16 images, one round, no memory (a smoke test)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        mode, num_images, distribution = json.loads(args.child)
        if mode.startswith("torchrun"):
            return _child_processes(args, num_images)
        return _child_memory(args, num_images, distribution)
    if args.quick:
        args.images, args.rounds, args.no_memory = [16], 1, True

    threads = f"{torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(
        f"torch {torch.__version__}, {args.device} ({threads}), {args.dtype}{', compiled' if args.compile else ''}; "
        f"model {args.model}; batch {BATCH_SIZE}; {args.rounds} rounds"
    )
    print(
        "| images | distribution | bare forward img/s | given img/s | **given / bare** | defaults img/s | **defaults / bare** | "
        "in CPU time: given / bare, defaults / bare | threshold (automatic) | k | extra peak MiB (defaults) | "
        "planted neurons found |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for num_images, distribution in ((n, d) for n in args.images for d in args.distributions):
        model, images, truth, threshold, top_k, dtype = prepare(args, num_images, distribution)
        functions = methods(model, images, threshold, top_k, args.device, dtype)
        warmup = methods(model, images[: 4 * BATCH_SIZE], threshold, top_k, args.device, dtype)
        interleaved(warmup if not args.compile else functions, 1, args.device)  # compiled: every shape seen first
        times, cpu_times, results = interleaved(functions, args.rounds, args.device)
        result = results["defaults"]
        found = [
            {layer: sorted(ids) for layer, ids in results[name].index.neurons.items()} if results[name].found else {}
            for name in ("given", "defaults")
        ]
        rate = {name: num_images / statistics.median(seconds) for name, seconds in times.items()}
        peak = "-" if args.no_memory else f"{_child('memory', args, num_images, distribution)['peak']:.0f}"
        print(
            f"| {num_images} | {distribution} | {rate['bare forward']:.1f} | {rate['given']:.1f} | "
            f"**{paired_ratio(times, 'given', 'bare forward'):.2f}** | {rate['defaults']:.1f} | "
            f"**{paired_ratio(times, 'defaults', 'bare forward'):.2f}** | "
            f"{paired_ratio(cpu_times, 'given', 'bare forward'):.2f} / "
            f"{paired_ratio(cpu_times, 'defaults', 'bare forward'):.2f} | {result.threshold:.4g} | {result.top_k} | "
            f"{peak} | {'yes' if found[0] == found[1] == truth else 'no'} |"
        )
    if args.processes > 1:
        threads = args.threads or f"{os.cpu_count()} / N"
        print(f"\nDefaults under torchrun ({args.device}), each process with {threads} threads:\n")
        print("| images | processes | img/s | speed-up | same index as 1 process |")
        print("|---|---|---|---|---|")
        for num_images in args.images:
            one, many = (_child(f"torchrun{n}", args, num_images) for n in (1, args.processes))
            same = one["neurons"] == many["neurons"] and one["details"] == many["details"]
            print(f"| {num_images} | 1 | {one['ips']:.1f} | 1.00 | - |")
            print(
                f"| {num_images} | {args.processes} | {many['ips']:.1f} | {many['ips'] / one['ips']:.2f} | "
                f"{'yes' if same else 'no'} |"
            )


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
