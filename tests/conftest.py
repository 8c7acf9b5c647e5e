import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from support import SHARED


@pytest.fixture
def shared_dir() -> Path:
    """`../shared`, or a clean skip in a fresh clone that has none."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists only beside the development checkout and in CI)")
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_compile_caches():
    """For a test that compiles (`torch.compile`, `torch.export`): it compiles from scratch and leaves nothing
    compiled behind. Code shared by all families (the edit, the MLPs' forwards) would otherwise pile up
    recompilations across tests and hit dynamo's per-function recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def images():
    """Four 56x56 images whose patches differ enough for outliers to land on different tokens per image."""
    return torch.randn(4, 3, 56, 56) * torch.linspace(0.5, 2.0, 4).view(4, 1, 1, 1)
