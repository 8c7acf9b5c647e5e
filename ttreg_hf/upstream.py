"""The internals of our dependencies that ttreg_hf imports beyond their top-level public API.

Subclassing a model means depending on its modules (`Dinov2MLP`, open_clip's `Transformer`, ...), which a release
may move or rename. This is the one list of them: `tests/test_upstream.py` checks that every such import in the
package is listed here and that each resolves, and names the installed version of the package that moved one.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

INTERNALS: dict[str, tuple[str, ...]] = {
    "transformers": (
        "transformers.conversion_mapping.get_checkpoint_conversion_mapping",
        "transformers.conversion_mapping.register_checkpoint_conversion_mapping",
        "transformers.image_utils.IMAGENET_DEFAULT_MEAN",
        "transformers.image_utils.IMAGENET_DEFAULT_STD",
        "transformers.image_utils.PILImageResampling",
        "transformers.modeling_outputs.BackboneOutput",
        "transformers.modeling_outputs.BaseModelOutput",
        "transformers.modeling_outputs.BaseModelOutputWithPooling",
        "transformers.models.auto.modeling_auto",
        "transformers.models.clip.modeling_clip.CLIPMLP",
        "transformers.models.clip.modeling_clip.CLIPVisionEmbeddings",
        "transformers.models.clip.modeling_clip.CLIPVisionModelOutput",
        "transformers.models.deit.modeling_deit.DeiTEmbeddings",
        "transformers.models.deit.modeling_deit.DeiTMLP",
        "transformers.models.dinov2.modeling_dinov2.Dinov2Embeddings",
        "transformers.models.dinov2.modeling_dinov2.Dinov2Encoder",
        "transformers.models.dinov2.modeling_dinov2.Dinov2MLP",
        "transformers.models.dinov2.modeling_dinov2.Dinov2PatchEmbeddings",
        "transformers.models.dinov2.modeling_dinov2.Dinov2SwiGLUFFN",
        "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTBackboneOutput",
        "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTEmbeddings",
        "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTEncoder",
        "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTGatedMLP",
        "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTMLP",
        "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTRopePositionEmbedding",
        "transformers.models.dinov3_vit.modeling_dinov3_vit.apply_rotary_pos_emb",
        "transformers.models.siglip.modeling_siglip.SiglipMLP",
        "transformers.models.siglip.modeling_siglip.SiglipMultiheadAttentionPoolingHead",
        "transformers.models.siglip.modeling_siglip.SiglipVisionEmbeddings",
        "transformers.models.siglip2.modeling_siglip2.Siglip2EncoderLayer",
        "transformers.models.siglip2.modeling_siglip2.Siglip2MLP",
        "transformers.models.siglip2.modeling_siglip2.Siglip2MultiheadAttentionPoolingHead",
        "transformers.models.siglip2.modeling_siglip2.Siglip2VisionEmbeddings",
        "transformers.models.vit.modeling_vit.ViTEmbeddings",
        "transformers.models.vit.modeling_vit.ViTMLP",
        "transformers.utils.ModelOutput",
        "transformers.utils.cached_file",
        "transformers.utils.generic.can_return_tuple",
    ),
    "open_clip_torch": (
        "open_clip.constants.HF_CONFIG_NAME",
        "open_clip.constants.HF_SAFE_WEIGHTS_NAME",
        "open_clip.factory.parse_model_name",
        "open_clip.model.CLIPVisionCfg",
        "open_clip.push_to_hf_hub.save_config_for_hf",
        "open_clip.transformer.LayerNorm",
        "open_clip.transformer.LayerNormFp32",
        "open_clip.pretrained.get_pretrained_cfg",
        "open_clip.transform.PreprocessCfg",
        "open_clip.transform.image_transform_v2",
        "open_clip.transformer.Transformer",
        "open_clip.transformer.VisionTransformer",
    ),
    "timm": (
        "timm.layers.GluMlp",
        "timm.layers.Mlp",
        "timm.layers.SwiGLU",
        "timm.models.FeatureDictNet",
        "timm.models.FeatureGraphNet",
        "timm.models.FeatureHookNet",
        "timm.models._features.FeatureGetterNet",
        "timm.models.deit.VisionTransformerDistilled",
        "timm.models.vision_transformer.VisionTransformer",
    ),
}


def missing_internals() -> list[str]:
    """The listed names that do not resolve with the installed packages, each with the package's version."""
    missing = []
    for distribution, names in INTERNALS.items():
        for name in names:
            module_name, attribute = name.rsplit(".", 1)
            try:
                getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError) as error:
                missing.append(f"{name} ({distribution} {_version(distribution)}): {error}")
    return missing


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"
