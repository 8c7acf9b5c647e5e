"""The benchmark scripts run, and what they compare is the same computation (no timing assertions here)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forward_benchmark_quick_run_prints_a_table_row():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "forward.py"), "--quick", "--no-memory"], capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| DINOv2 ViT-S/14")]
    assert len(rows) == 1
    ratios = [float(x) for x in re.findall(r"\| (\d+\.\d{3}) ", rows[0])]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)


@pytest.mark.parametrize("name", ["DINOv2 ViT-S/14", "CLIP ViT-B/16", "OpenCLIP ViT-B/16"])
def test_forward_benchmark_variants_compute_the_same_edit(name):
    forward = load_script("forward")
    pixels = torch.randn(1, 3, 224, 224)
    outputs = {}
    with torch.inference_mode():
        for variant in forward.VARIANTS:
            output = forward.build(name, variant, "cpu", torch.float32, compiled=False)(pixels)
            outputs[variant] = output if torch.is_tensor(output) else output.pooler_output
    torch.testing.assert_close(outputs["ttreg"], outputs["hooks"], atol=1e-5, rtol=0)
    assert not torch.allclose(outputs["ttreg"], outputs["parent"], atol=1e-3)
