"""Named models and the torch.hub entry points (`hubconf.py` re-exports the ``*_tt_reg`` functions).

Each entry is a short factory over one private builder per family, as in facebookresearch/dinov2's
``hub/backbones.py``. The register-neuron index is ``register_neurons`` (a dict, an index file or a shipped index
name) if given, else the shipped one for that checkpoint, else an error that says how to make one.
"""

from collections.abc import Callable
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub.constants import is_offline_mode
from torch import nn

from .configs.registers import warn_if_other_weights
from .modeling.clip import CLIPVisionTTRegModel
from .modeling.dinov2_original import DINOV2_ARCHS, DINOV2_URL, DinoVisionTransformerTTReg, dinov2_config, load_dinov2
from .modeling.dinov3 import DINOv3ViTTTRegModel
from .modeling.registers import IndexSpec, TestTimeRegisterMixin
from .modeling.siglip import Siglip2VisionTTRegModel, SiglipVisionTTRegModel
from .modeling.vit import DeiTTTRegModel, ViTTTRegModel


def _check_downloadable(url: str) -> None:
    """Offline (``HF_HUB_OFFLINE=1``), a URL that torch.hub has not cached is an error, not a network attempt."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if is_offline_mode() and not cached.is_file():
        raise OSError(f"offline (HF_HUB_OFFLINE is set) and {url} is not in torch.hub's cache {cached.parent}")


def _dinov2(arch: str, pretrained: bool, weights: str | Path | None, register_neurons: IndexSpec | None, **settings):
    config = dinov2_config(arch, **settings)
    semantics = settings.get("register_semantics")
    config.attach_register_neurons(register_neurons, checkpoint=f"dinov2_{arch}", register_semantics=semantics)
    if pretrained and weights is None:
        weights = DINOV2_URL.format(arch=arch)
        _check_downloadable(weights)
    model = load_dinov2(config, weights)
    warn_if_other_weights(model)
    return model


# name -> (open_clip model name, LAION-2B pretrained tag), the checkpoints of the paper
OPENCLIP_CHECKPOINTS = {
    "openclip_vitb16": ("ViT-B-16", "laion2b_s34b_b88k"),
    "openclip_vitl14": ("ViT-L-14", "laion2b_s32b_b82k"),
}
CLIP_VITL14_336 = "openai/clip-vit-large-patch14-336"  # LLaVA-1.5's vision tower
CLIP_VITL14_336_ARCH = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)


def _openclip(
    name: str,
    pretrained: bool,
    weights: str | Path | None = None,
    register_neurons: IndexSpec | None = None,
    **settings,
) -> nn.Module:
    """The whole open_clip model (image and text towers); ``weights`` is a local open_clip checkpoint file."""
    from .modeling.open_clip import create_model_and_transforms  # open_clip is an optional dependency

    model_name, tag = OPENCLIP_CHECKPOINTS[name]
    pretrained_tag = str(weights) if weights else tag if pretrained else None
    model, _, _ = create_model_and_transforms(
        model_name, pretrained_tag, register_neurons=register_neurons, checkpoint=name, **settings
    )
    return model.eval()


VIT_B16_ARCH = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16
)
DINOV3_VITL16_ARCH = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=16,
    num_register_tokens=4,
)
SIGLIP_SO400M_ARCH = dict(  # LLaVA-OneVision's vision tower
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
SIGLIP2_B16_NAFLEX_ARCH = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_patches=256,
    patch_size=16,
)
# name -> (model class, `transformers` checkpoint, its architecture for random weights, model arguments)
TRANSFORMERS_CHECKPOINTS = {
    "clip_vitl14_336": (CLIPVisionTTRegModel, CLIP_VITL14_336, CLIP_VITL14_336_ARCH, {}),
    "vit_base_patch16_224_in21k": (ViTTTRegModel, "google/vit-base-patch16-224-in21k", VIT_B16_ARCH, {}),
    # a classifier checkpoint: it holds no pooler, so the model gets none rather than a random one
    "deit_base_distilled_patch16_224": (
        DeiTTTRegModel,
        "facebook/deit-base-distilled-patch16-224",
        VIT_B16_ARCH,
        {"add_pooling_layer": False},
    ),
    "dinov3_vitl16": (DINOv3ViTTTRegModel, "facebook/dinov3-vitl16-pretrain-lvd1689m", DINOV3_VITL16_ARCH, {}),
    "siglip_so400m_patch14_384": (SiglipVisionTTRegModel, "google/siglip-so400m-patch14-384", SIGLIP_SO400M_ARCH, {}),
    "siglip2_base_patch16_naflex": (
        Siglip2VisionTTRegModel,
        "google/siglip2-base-patch16-naflex",
        SIGLIP2_B16_NAFLEX_ARCH,
        {},
    ),
}


def _transformers(
    name: str, pretrained: bool, weights: str | Path | None, register_neurons: IndexSpec | None, **settings
) -> TestTimeRegisterMixin:
    """``weights`` is a local `transformers` checkpoint folder."""
    model_class, checkpoint, arch, model_kwargs = TRANSFORMERS_CHECKPOINTS[name]
    if pretrained or weights:
        return model_class.from_pretrained(
            weights or checkpoint, register_neurons=register_neurons, **model_kwargs, **settings
        ).eval()
    config = model_class.config_class(**arch, **settings)
    config.attach_register_neurons(
        register_neurons, checkpoint=name, register_semantics=settings.get("register_semantics")
    )
    return model_class(config, **model_kwargs).eval()


def _openclip_tower(name: str, **kwargs) -> nn.Module:
    return _openclip(name, **kwargs).visual


_LOADERS: dict[str, Callable[..., TestTimeRegisterMixin]] = {
    **{f"dinov2_{arch}": partial(_dinov2, arch) for arch in DINOV2_ARCHS},
    **{name: partial(_openclip_tower, name) for name in OPENCLIP_CHECKPOINTS},
    **{name: partial(_transformers, name) for name in TRANSFORMERS_CHECKPOINTS},
}
MODEL_NAMES = tuple(_LOADERS)


def load_tt_model(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    register_neurons: IndexSpec | None = None,
    **settings,
) -> TestTimeRegisterMixin:
    """The test-time-register model called ``name`` (one of `MODEL_NAMES`) as the package's model class.

    ``pretrained=False`` gives random weights (offline); ``weights`` is a local checkpoint in the upstream layout;
    ``settings`` are config fields such as ``num_test_time_registers`` or ``register_semantics``; the DINOv2 models
    compute upstream DINOv2's numerics unless ``position_interpolation="transformers"`` (see `Dinov2TTRegConfig`).
    """
    if name not in _LOADERS:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
    return _LOADERS[name](pretrained=pretrained, weights=weights, register_neurons=register_neurons, **settings)


def _dinov2_hub(arch: str, **kwargs) -> DinoVisionTransformerTTReg:
    return DinoVisionTransformerTTReg(load_tt_model(f"dinov2_{arch}", **kwargs))


def dinov2_vits14_tt_reg(pretrained: bool = True, **kwargs) -> DinoVisionTransformerTTReg:
    """DINOv2 ViT-S/14 with test-time registers (no shipped index: pass ``register_neurons``)."""
    return _dinov2_hub("vits14", pretrained=pretrained, **kwargs)


def dinov2_vitb14_tt_reg(pretrained: bool = True, **kwargs) -> DinoVisionTransformerTTReg:
    """DINOv2 ViT-B/14 with test-time registers (no shipped index: pass ``register_neurons``)."""
    return _dinov2_hub("vitb14", pretrained=pretrained, **kwargs)


def dinov2_vitl14_tt_reg(pretrained: bool = True, **kwargs) -> DinoVisionTransformerTTReg:
    """DINOv2 ViT-L/14 with a test-time register and the authors' published index (45 neurons, layers 12-17)."""
    return _dinov2_hub("vitl14", pretrained=pretrained, **kwargs)


def dinov2_vitg14_tt_reg(pretrained: bool = True, **kwargs) -> DinoVisionTransformerTTReg:
    """DINOv2 ViT-g/14 (SwiGLU) with test-time registers (no shipped index: pass ``register_neurons``)."""
    return _dinov2_hub("vitg14", pretrained=pretrained, **kwargs)


def openclip_vitb16_tt_reg(pretrained: bool = True, **kwargs) -> nn.Module:
    """OpenCLIP ViT-B/16 (LAION-2B) with a test-time register: the whole CLIP model (no shipped index: pass one)."""
    return _openclip("openclip_vitb16", pretrained=pretrained, **kwargs)


def openclip_vitl14_tt_reg(pretrained: bool = True, **kwargs) -> nn.Module:
    """OpenCLIP ViT-L/14 (LAION-2B) with a test-time register: the whole CLIP model (no shipped index: pass one)."""
    return _openclip("openclip_vitl14", pretrained=pretrained, **kwargs)


def clip_vitl14_336_tt_reg(pretrained: bool = True, **kwargs) -> CLIPVisionTTRegModel:
    """OpenAI CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower, with a test-time register (no shipped index: pass one)."""
    return load_tt_model("clip_vitl14_336", pretrained=pretrained, **kwargs)


def vit_base_patch16_224_in21k_tt_reg(pretrained: bool = True, **kwargs) -> ViTTTRegModel:
    """Google ViT-B/16 (ImageNet-21k) with a test-time register (no shipped index: pass one)."""
    return load_tt_model("vit_base_patch16_224_in21k", pretrained=pretrained, **kwargs)


def deit_base_distilled_patch16_224_tt_reg(pretrained: bool = True, **kwargs) -> DeiTTTRegModel:
    """DeiT-B/16 distilled, without a pooler, with a test-time register (no shipped index: pass one)."""
    return load_tt_model("deit_base_distilled_patch16_224", pretrained=pretrained, **kwargs)


def dinov3_vitl16_tt_reg(pretrained: bool = True, **kwargs) -> DINOv3ViTTTRegModel:
    """DINOv3 ViT-L/16 (LVD-1689M; a gated hub repository) with a test-time register (no shipped index: pass one)."""
    return load_tt_model("dinov3_vitl16", pretrained=pretrained, **kwargs)


def siglip_so400m_patch14_384_tt_reg(pretrained: bool = True, **kwargs) -> SiglipVisionTTRegModel:
    """SigLIP So400m/14 at 384 px, LLaVA-OneVision's tower, with a test-time register (no shipped index: pass one)."""
    return load_tt_model("siglip_so400m_patch14_384", pretrained=pretrained, **kwargs)


def siglip2_base_patch16_naflex_tt_reg(pretrained: bool = True, **kwargs) -> Siglip2VisionTTRegModel:
    """SigLIP2 B/16 NaFlex (variable resolution) with a test-time register (no shipped index: pass one)."""
    return load_tt_model("siglip2_base_patch16_naflex", pretrained=pretrained, **kwargs)
