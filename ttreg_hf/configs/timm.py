"""The test-time-register settings of a timm `VisionTransformer`."""

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict

from .registers import TestTimeRegisterConfigMixin


@strict
@dataclass
class TimmTTRegConfig(TestTimeRegisterConfigMixin):
    r"""
    The test-time-register settings of a timm `VisionTransformer`, which has no config object of its own.

    num_hidden_layers (`int`, *optional*, defaults to 12):
        Number of transformer blocks (``len(model.blocks)``).
    mlp_width (`int`, *optional*, defaults to 3072):
        Number of neurons in each MLP hidden layer, after the gating for gated MLPs (``mlp.fc2.in_features``).
        The defaults are ViT-B's.
    """

    num_hidden_layers: int = 12
    mlp_width: int = 3072
