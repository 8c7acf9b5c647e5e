"""Tiny models built around a tower — depth and segmentation models on a backbone, classifiers and dual encoders
loaded as their parents, LLaVA, LLaVA-NeXT and LLaVA-OneVision — that `test_task_models.py`, `test_vlm.py` and
`test_hosts_remote.py` run, as `family_models` holds the tiny tower of every family."""

import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForZeroShotImageClassification,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    DeiTForMaskedImageModeling,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    Dinov2ForImageClassification,
    DPTConfig,
    DPTForDepthEstimation,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mask2FormerConfig,
    Mask2FormerModel,
    Qwen2Config,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    ViTConfig,
    ViTForMaskedImageModeling,
    ZoeDepthConfig,
    ZoeDepthForDepthEstimation,
)

from ttreg_hf import (
    CLIPTTRegModel,
    DeiTTTRegForImageClassificationWithTeacher,
    DeiTTTRegForMaskedImageModeling,
    Dinov2TTRegConfig,
    Dinov2TTRegForImageClassification,
    SiglipTTRegModel,
    ViTTTRegForMaskedImageModeling,
)

NEURONS = {1: [3, 40], 2: [7]}
TOWER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, patch_size=14, image_size=42)
DINOV2 = dict(**TOWER, mlp_ratio=2)
VISION = dict(**TOWER, intermediate_size=64)
TEXT = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=16,
    max_position_embeddings=64, eos_token_id=2,
)  # fmt: skip
DEPTH_ANYTHING = dict(
    reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32], fusion_hidden_size=8, head_hidden_size=8,
    reassemble_factors=[2, 1, 0.5],
)  # fmt: skip


def tiny_backbone_config(ours: bool, **fields):
    config_class = Dinov2TTRegConfig if ours else Dinov2Config
    return config_class(**DINOV2, **fields, **({"register_neurons": NEURONS} if ours else {}))


# the depth and segmentation models on a backbone: model class, its config from a backbone config, the backbone's
# fields, the output to compare
BACKBONE_HOSTS = {
    "dpt": (
        DPTForDepthEstimation,
        lambda backbone: DPTConfig(
            backbone_config=backbone, is_hybrid=False, hidden_size=32, neck_hidden_sizes=[8, 16, 32],
            fusion_hidden_size=8, reassemble_factors=[2, 1, 0.5],
        ),
        dict(out_indices=[1, 2, 3], reshape_hidden_states=False),
        "predicted_depth",
    ),
    "depth_anything": (
        DepthAnythingForDepthEstimation,
        lambda backbone: DepthAnythingConfig(backbone_config=backbone, **DEPTH_ANYTHING),
        dict(out_indices=[1, 2, 3], reshape_hidden_states=False),
        "predicted_depth",
    ),
    "zoedepth": (
        ZoeDepthForDepthEstimation,
        lambda backbone: ZoeDepthConfig(
            backbone_config=backbone, backbone_hidden_size=32, reassemble_factors=[4, 2, 1, 0.5],
            neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, num_relative_features=8, bottleneck_features=16,
            patch_size=14, num_attractors=[4, 2, 2, 1], bin_embedding_dim=16,
            bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0, "name": "nyu"}],
        ),
        dict(out_indices=[0, 1, 2, 3], reshape_hidden_states=False),
        "predicted_depth",
    ),
    "mask2former": (  # its segmentation head needs scipy; the model is what takes the backbone
        Mask2FormerModel,
        lambda backbone: Mask2FormerConfig(
            backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1,
            encoder_feedforward_dim=64, dim_feedforward=64, decoder_layers=2, num_queries=5, num_attention_heads=2,
            feature_strides=[14, 14, 14], common_stride=14,
        ),
        dict(out_indices=[1, 2, 3]),
        "pixel_decoder_last_hidden_state",
    ),
}  # fmt: skip


def tiny_clip(model_class, **fields):
    return model_class(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16, **fields)).eval()


# a loaded parent, its inputs, the output to compare, the Auto class that reloads it, the class it reloads as
LOADED = {
    "dinov2-classifier": (
        lambda: Dinov2ForImageClassification(Dinov2Config(**DINOV2, num_labels=3)),
        "logits",
        AutoModelForImageClassification,
        Dinov2TTRegForImageClassification,
    ),
    "deit-with-teacher": (  # DeiT has two classifiers for one config: the saved name picks ours
        lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**VISION, num_labels=3)),
        "logits",
        AutoModelForImageClassification,
        DeiTTTRegForImageClassificationWithTeacher,
    ),
    "vit-masked-image-modeling": (  # a tower with a mask token; the decoder reads the patches
        lambda: ViTForMaskedImageModeling(ViTConfig(**VISION, encoder_stride=14)),
        "reconstruction",
        AutoModelForMaskedImageModeling,
        ViTTTRegForMaskedImageModeling,
    ),
    "deit-masked-image-modeling": (
        lambda: DeiTForMaskedImageModeling(DeiTConfig(**VISION, encoder_stride=14)),
        "reconstruction",
        AutoModelForMaskedImageModeling,
        DeiTTTRegForMaskedImageModeling,
    ),
    "clip-model": (
        lambda: tiny_clip(CLIPModel),
        "logits_per_image",
        AutoModelForZeroShotImageClassification,
        CLIPTTRegModel,
    ),
    "siglip-model": (
        lambda: SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)),
        "logits_per_image",
        AutoModel,
        SiglipTTRegModel,
    ),
}


# ---- VLMs

IMAGE_TOKEN, PAD = 63, 0
VLM_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=14)
VLM_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD,
)
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
IMAGE_SIZES = torch.tensor([[56, 40], [30, 56]])  # two aspect ratios: different tiles, unpadding and token counts


def llava():
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VLM_TOWER, image_size=56),
        text_config=LlamaConfig(**VLM_TEXT),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
        vision_feature_layer=[-3, -1],
    )
    return LlavaForConditionalGeneration(config), dict(pixel_values=torch.randn(2, 3, 56, 56))


def llava_next():
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VLM_TOWER, image_size=28),
        text_config=LlamaConfig(**VLM_TEXT),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=PINPOINTS,
    )
    images = dict(pixel_values=torch.randn(2, 5, 3, 28, 28), image_sizes=IMAGE_SIZES)  # a base image and up to 4 tiles
    return LlavaNextForConditionalGeneration(config), images


def llava_onevision():
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**VLM_TOWER, image_size=28, vision_use_head=False),
        text_config=Qwen2Config(**VLM_TEXT),
        image_token_index=IMAGE_TOKEN,
        video_token_index=62,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
    )
    images = dict(pixel_values=torch.randn(2, 5, 3, 28, 28), image_sizes=IMAGE_SIZES)
    return LlavaOnevisionForConditionalGeneration(config), images
