"""A tiny model of every declared family, with register neurons planted in it: what the family contract tests run
every entry point on (`tests/test_family_contract.py`). A family declared in `ttreg_hf` without a builder here fails
`test_every_declared_family_has_a_tiny_model`: adding a family adds it to every contract test."""

import open_clip
import torch
from PIL import Image
from timm.layers import SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

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
from ttreg_hf.images import normalize
from ttreg_hf.modeling.open_clip import to_test_time_registers as open_clip_tt
from ttreg_hf.modeling.timm import to_test_time_registers as timm_tt
from ttreg_hf.planted import plant_register_neurons, planting_sites, textured_images
from ttreg_hf.registry import family_of

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


# the MLP variants of the families, planted as they are
MLP_VARIANTS = {
    "dinov2-swiglu": lambda: Dinov2TTRegModel(
        Dinov2TTRegConfig(**HF, mlp_ratio=MLP // WIDTH, use_swiglu_ffn=True, **OFF)
    ),
    "dinov3-gated": lambda: DINOv3ViTTTRegModel(
        DINOv3ViTTTRegConfig(**HF, intermediate_size=MLP, use_gated_mlp=True, **OFF)
    ),
    "timm-registers-swiglu": lambda: timm_vit(reg_tokens=2, mlp_layer=SwiGLU),
    "timm-swiglu-packed": lambda: timm_vit(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU),  # DINOv2 ViT-g's GluMlp
}
# what discovery runs on with `tiny_images` (SigLIP2 takes NaFlex inputs: `naflex`)
PLANTABLE = {**{name: build for name, build in TINY.items() if name != "siglip2"}, **MLP_VARIANTS}


def planted(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model ``name`` (a family or one of `MLP_VARIANTS`) with its planted register neurons."""
    return plant({**TINY, **MLP_VARIANTS}[name], seed)


def tiny_images(num_images: int, seed: int) -> torch.Tensor:
    """Textured images of the tiny models' size, normalized with ImageNet's statistics."""
    return normalize(textured_images(num_images, seed=seed, size=SIZE), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def naflex(images, max_patches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Each ``(3, H, W)`` image as SigLIP2's processor gives it: patches flattened channel-last, padded with zeros to
    ``max_patches`` (default: none), a mask (1 real, 0 padding), the grid's shape."""
    inputs, patch = [], NAFLEX_PATCH
    for image in images:
        rows, columns = image.shape[1] // patch, image.shape[2] // patch
        patches = image.unflatten(1, (rows, patch)).unflatten(3, (columns, patch))  # (3, rows, patch, columns, patch)
        patches = patches.permute(1, 3, 2, 4, 0).flatten(2).flatten(0, 1)
        padding = (max_patches or len(patches)) - len(patches)
        inputs.append(
            {
                "pixel_values": torch.nn.functional.pad(patches, (0, 0, 0, padding)),
                "pixel_attention_mask": torch.tensor([1] * len(patches) + [0] * padding),
                "spatial_shapes": torch.tensor([rows, columns]),
            }
        )
    return inputs


def analysis_inputs(name: str) -> dict[str, torch.Tensor]:
    """Two images as the family's model takes them; SigLIP2's from its processor, padded (one is 2:1)."""
    images = textured_images(2, seed=3, size=SIZE)
    if name != "siglip2":
        return {"pixel_values": (images - 0.5) / 0.25}
    pictures = [Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()) for image in images]
    pictures[1] = pictures[1].resize((SIZE, SIZE // 2))
    model = TINY["siglip2"]()
    inputs = dict(family_of(model).default_image_processor(model.config)(pictures, return_tensors="pt"))
    assert not inputs["pixel_attention_mask"].all()  # the batch is padded
    return inputs
