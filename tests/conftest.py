import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """`../shared`, or a clean skip in a fresh clone that has none."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists only beside the development checkout and in CI)")
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Every test compiles from scratch: code shared by all families (the edit, the MLPs' forwards) would otherwise
    pile up recompilations across tests and hit dynamo's per-function recompile limit."""
    yield
    torch._dynamo.reset()


def tiny_dinov2_config(**overrides):
    """A 3-layer, 32-wide DINOv2 config with test-time-register fields (eager attention, so maps can be returned)."""
    from ttreg_hf import Dinov2TTRegConfig

    settings = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        register_neurons={1: [3, 70, 5], 2: [7, 100]},
    )
    config = Dinov2TTRegConfig(**{**settings, **overrides})
    config._attn_implementation = "eager"
    return config


@pytest.fixture
def images():
    """Four 56x56 images whose patches differ enough for outliers to land on different tokens per image."""
    return torch.randn(4, 3, 56, 56) * torch.linspace(0.5, 2.0, 4).view(4, 1, 1, 1)
