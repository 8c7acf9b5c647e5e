"""A tiny model of every declared family, with register neurons planted in it: what the family contract tests run
every entry point on (`tests/test_family_contract.py`). A family declared in `ttreg_hf` without a builder here fails
`test_every_declared_family_has_a_tiny_model`: adding a family adds it to every contract test."""

import open_clip
import torch
from timm.models.vision_transformer import VisionTransformer

from ttreg_hf import (
    CLIPVisionTTRegConfig,
    CLIPVisionTTRegModel,
    DeiTTTRegConfig,
    DeiTTTRegModel,
    Dinov2TTRegConfig,
    Dinov2TTRegModel,
    DINOv3ViTTTRegConfig,
    DINOv3ViTTTRegModel,
    Siglip2VisionTTRegConfig,
    Siglip2VisionTTRegModel,
    SiglipVisionTTRegConfig,
    SiglipVisionTTRegModel,
    ViTTTRegConfig,
    ViTTTRegModel,
)
from ttreg_hf.modeling.open_clip import to_test_time_registers as open_clip_tt
from ttreg_hf.modeling.timm import to_test_time_registers as timm_tt
from ttreg_hf.planted import plant_register_neurons, planting_sites

WIDTH, DEPTH, HEADS, MLP, PATCH, SIZE = 64, 4, 4, 128, 8, 96
NAFLEX_PATCH = (
    12  # SigLIP2: 3 divides its area, so a filter laid out for channel-first patches is not zero on uniform ones
)
LAYER, NEURONS = 2, (21, 60)
HF = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, patch_size=PATCH, image_size=SIZE)
OFF = dict(register_neurons={}, num_test_time_registers=1)  # registers asked for, no index yet: the edit is off
NAFLEX = {**HF, "patch_size": NAFLEX_PATCH, "num_patches": (SIZE // NAFLEX_PATCH) ** 2}
del NAFLEX["image_size"]


def timm_vit(**arch) -> torch.nn.Module:
    """A tiny timm ViT with test-time registers asked for (edit off); ``arch`` goes to `VisionTransformer`."""
    vit = VisionTransformer(
        img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH,
        num_classes=0, **arch,
    )  # fmt: skip
    return timm_tt(vit, num_test_time_registers=1)


TINY = {
    "dinov2": lambda: Dinov2TTRegModel(Dinov2TTRegConfig(**HF, mlp_ratio=MLP // WIDTH, **OFF)),
    "clip": lambda: CLIPVisionTTRegModel(CLIPVisionTTRegConfig(**HF, intermediate_size=MLP, **OFF)),
    "siglip": lambda: SiglipVisionTTRegModel(SiglipVisionTTRegConfig(**HF, intermediate_size=MLP, **OFF)),
    "siglip2": lambda: Siglip2VisionTTRegModel(Siglip2VisionTTRegConfig(**NAFLEX, intermediate_size=MLP, **OFF)),
    "vit": lambda: ViTTTRegModel(ViTTTRegConfig(**HF, intermediate_size=MLP, **OFF)),
    "deit": lambda: DeiTTTRegModel(DeiTTTRegConfig(**HF, intermediate_size=MLP, **OFF)),
    "dinov3": lambda: DINOv3ViTTTRegModel(
        DINOv3ViTTTRegConfig(**HF, intermediate_size=MLP, num_register_tokens=2, **OFF)
    ),
    "open_clip": lambda: open_clip_tt(
        open_clip.transformer.VisionTransformer(SIZE, PATCH, WIDTH, DEPTH, HEADS, MLP / WIDTH, output_dim=16),
        num_test_time_registers=1,
    ),
    "timm": lambda: timm_vit(),
}


# the text tower of the composite models (`CLIPTTRegModel`, ...): one small layer
TEXT = dict(
    hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=99,
    max_position_embeddings=16,
)  # fmt: skip


def tiny_model(family: str, model_class: type) -> torch.nn.Module:
    """A tiny ``model_class`` (one of ``family``'s classes) on the family's tiny tower config, edit off: a classifier
    or backbone on that config itself, a composite model with it as its ``vision_config`` and a one-layer text tower."""
    config = TINY[family]().config
    if not isinstance(config, model_class.config_class):
        config = model_class.config_class(vision_config=config.to_dict(), text_config=TEXT)
    return model_class(config).eval()


@torch.no_grad()
def plant(build, seed: int = 0) -> torch.nn.Module:
    """``build()`` in eval mode, with `NEURONS` of block `LAYER` planted as register neurons (seeded)."""
    torch.manual_seed(seed)
    model = build().eval()
    plant_register_neurons(planting_sites(model), LAYER, NEURONS, seed=seed)
    return model


def planted(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``family`` with its planted register neurons."""
    return plant(TINY[family], seed)
