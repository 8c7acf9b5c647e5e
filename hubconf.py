"""torch.hub entry points: ``torch.hub.load("<owner>/ttreg_hf", "dinov2_vitl14_tt_reg")``.

Every entry takes ``pretrained`` (False: random weights, offline), ``register_neurons`` (a dict, an index file or a
shipped index name) and config fields such as ``num_test_time_registers`` (0 turns the edit off); the ``*_lc``
classifiers also take ``layers`` (1 or 4, upstream's heads) and ``head_weights`` (a local head file).
"""

dependencies = ["torch", "transformers", "safetensors", "huggingface_hub"]

from ttreg_hf.hub import (  # noqa: E402,F401
    clip_vitl14_336_tt_reg,
    deit_base_distilled_patch16_224_tt_reg,
    dinov2_vitb14_tt_reg,
    dinov2_vitb14_tt_reg_lc,
    dinov2_vitg14_tt_reg,
    dinov2_vitg14_tt_reg_lc,
    dinov2_vitl14_tt_reg,
    dinov2_vitl14_tt_reg_lc,
    dinov2_vits14_tt_reg,
    dinov2_vits14_tt_reg_lc,
    dinov3_vitl16_tt_reg,
    openclip_vitb16_tt_reg,
    openclip_vitl14_tt_reg,
    siglip2_base_patch16_naflex_tt_reg,
    siglip_so400m_patch14_384_tt_reg,
    vit_base_patch16_224_in21k_tt_reg,
)
