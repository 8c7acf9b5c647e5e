"""The benchmark scripts run, and what they compare is the same computation (no timing assertions here)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def load_script(monkeypatch):
    """Import a benchmark script as `python benchmarks/NAME.py` would (its folder first on the path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return _load_script


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forward_benchmark_quick_run_prints_a_table_row():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "forward.py"), "--quick", "--no-memory"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| DINOv2 ViT-S/14")]
    assert len(rows) == 1
    ratios = [float(x) for x in re.findall(r"\| (\d+\.\d{3}) ", rows[0])]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)


FORWARD_MODELS = [
    "DINOv2 ViT-S/14",
    "DINOv2 ViT-B/14",
    "DINOv2 ViT-L/14",
    "CLIP ViT-B/16",
    "OpenCLIP ViT-B/16",
    "ViT-B/16",
    "DeiT-B/16 distilled",
    "DINOv3 ViT-B/16",
    "SigLIP B/16",
    "SigLIP2 B/16 NaFlex",
    "timm ViT-B/16",
]


def test_forward_benchmark_rows_are_all_smoke_tested(load_script):
    assert list(load_script("forward").MODELS) == FORWARD_MODELS


@pytest.mark.parametrize(
    "name, size",
    [(name, "tiny") for name in FORWARD_MODELS] + [("DINOv2 ViT-S/14", "base")],  # real weights if there
)
def test_forward_benchmark_variants_compute_the_same_edit(name, size, load_script):
    """(a) the parent, (b) ttreg_hf, (c) the hooks, as the benchmark builds them: (b) and (c) make the same edit."""
    forward = load_script("forward")
    inputs = forward.example_inputs(name, 2, "cpu", torch.float32, size)
    outputs = {}
    with torch.inference_mode():
        for variant in forward.VARIANTS:
            output = forward.build(name, variant, "cpu", torch.float32, compiled=False, size=size)(*inputs)
            outputs[variant] = output if torch.is_tensor(output) else output.pooler_output
    torch.testing.assert_close(outputs["ttreg"], outputs["hooks"], atol=1e-5, rtol=0)
    assert not torch.allclose(outputs["ttreg"], outputs["parent"], atol=1e-3)


@pytest.mark.parametrize("model", ["planted", "siglip2"])  # SigLIP2: keyword inputs (NaFlex)
def test_discovery_benchmark_quick_run_agrees_with_the_planted_truth(model):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "discovery.py"), "--quick", "--model", model],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 16 |"))
    assert row.rstrip().endswith("| yes |")  # given threshold and k, and the defaults: the planted neurons


def test_discovery_benchmark_knows_every_familys_planted_model(load_script):
    from ttreg_hf.registry import families

    names = load_script("discovery").model_names()
    ours = {family.name for family in families() if family.model_class.__module__.startswith("ttreg_hf.")}
    assert names[0] == "planted" and ours <= set(names) and len(set(names)) == len(names)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_call_s_temporary_allocation(load_script):
    extra_peak_mib = load_script("peak_memory").extra_peak_mib
    assert extra_peak_mib(lambda: torch.ones(64 * 2**20 // 4).sum(), "cpu") >= 60
    assert extra_peak_mib(lambda: torch.ones(16).sum(), "cpu") < 8
