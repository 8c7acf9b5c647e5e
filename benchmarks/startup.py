"""Start-up time of the command line and the package: a markdown table of wall-clock medians over fresh processes.

    python benchmarks/startup.py [--runs 7]

Each row runs its command ``--runs`` times in a new interpreter (the first run is a warm-up that fills the OS file
cache and is not counted). Target: ``ttreg --help`` under 2 s on the CI machine.
"""

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ttreg_cli"]
COMMANDS = {
    "ttreg --help": [*CLI, "--help"],
    "ttreg --version": [*CLI, "--version"],
    "ttreg find-neurons --help": [*CLI, "find-neurons", "--help"],
    "import ttreg_hf": [sys.executable, "-c", "import ttreg_hf"],
    "import ttreg_hf; from ttreg_hf import Dinov2TTRegModel": [
        sys.executable,
        "-c",
        "import ttreg_hf; from ttreg_hf import Dinov2TTRegModel",
    ],
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
}


def wall_times(command: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (median reported)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, {args.runs} runs each\n")
    print("| command | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, command in COMMANDS.items():
        times = wall_times(command, args.runs)
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
