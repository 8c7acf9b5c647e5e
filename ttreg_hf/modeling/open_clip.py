"""OpenCLIP's `VisionTransformer` with test-time registers, subclassed at open_clip's seams.

The weights and state-dict keys stay as they are: the registers are appended by a `RegisterAppender` around
`patch_dropout` (before `ln_pre`), the edit sits in a parameter-free ``register_edit`` slot between the activation
and ``c_proj`` of every block's MLP, and the registers are stripped before pooling and from `forward_intermediates`.
"""

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg
from open_clip.transformer import Transformer, VisionTransformer
from torch import nn

from ..configs.registers import REGISTER_SETTINGS, TestTimeRegisterConfig, pop_register_settings
from .layout import TokenLayout
from .registers import IndexSpec, RegisterAppender, RegisterSeams, TestTimeRegisterMixin, adopt, check_pixel_values


class TTRegTransformer(Transformer):
    """open_clip's `Transformer` whose intermediates come without the test-time registers (the last output keeps them)."""

    token_layout: TokenLayout

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, intermediates = super().forward_intermediates(x, *args, **kwargs)
        return x, [self.token_layout.strip_registers(tokens) for tokens in intermediates]


class OpenCLIPTTRegMLP(nn.Sequential):
    """open_clip's ``Sequential(c_fc, activation, c_proj)`` MLP with the register-neuron edit after the activation."""

    register_edit: nn.Module

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fc, activation, projection = self[0], self[1], self[2]
        return projection(self.register_edit(activation(fc(hidden_states))))


def adopt_mlp(mlp: nn.Module) -> OpenCLIPTTRegMLP:
    """``mlp`` as an `OpenCLIPTTRegMLP` (weights and keys kept), after checking it has the expected structure."""
    layers = list(mlp.children())
    if not (
        type(mlp) is nn.Sequential
        and len(layers) == 3
        and isinstance(layers[0], nn.Linear)
        and isinstance(layers[2], nn.Linear)
    ):
        raise TypeError(
            "Test-time registers expect open_clip's MLP `Sequential(c_fc: Linear, activation, c_proj: Linear)`, got "
            f"{mlp!r}; this open_clip model or version builds its blocks differently and is not supported."
        )
    return adopt(mlp, OpenCLIPTTRegMLP)


class OpenCLIPTTRegVisionTransformer(TestTimeRegisterMixin, VisionTransformer):
    """open_clip's [`VisionTransformer`] with test-time registers; every output keeps the parent's shape.

    Build one like the parent, with the register settings as extra keywords (``register_neurons=...``,
    ``num_test_time_registers=...``), or convert a tower in place with `to_test_time_registers`.
    ``config`` is a `TestTimeRegisterConfig`.
    """

    config: TestTimeRegisterConfig
    register_seams = RegisterSeams(
        appender="patch_dropout", blocks="transformer.resblocks", mlp="mlp", layout_readers=("transformer",)
    )

    def __init__(self, *args, **kwargs):
        settings = pop_register_settings(kwargs)
        super().__init__(*args, **kwargs)
        self.adopt_register_modules()
        self.set_register_neurons(settings.pop("register_neurons", None), **settings)

    def adopt_register_modules(self) -> None:
        """Give the tower its config, the appender, the intermediates' stripping and the edit slots (edit off)."""
        blocks = self.transformer.resblocks
        self.config = TestTimeRegisterConfig(num_hidden_layers=len(blocks), mlp_width=blocks[0].mlp[0].out_features)
        self.patch_dropout = RegisterAppender(self.patch_dropout)  # dropout never drops the registers
        adopt(self.transformer, TTRegTransformer)
        for block in blocks:
            adopt_mlp(block.mlp)
        self.refresh_test_time_registers()

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        self.refresh_test_time_registers()
        check_pixel_values(x, self.patch_size)
        if tuple(x.shape[-2:]) != tuple(self.image_size):
            raise ValueError(
                f"Image size {x.shape[-2]}x{x.shape[-1]} does not match the model's "
                f"{self.image_size[0]}x{self.image_size[1]}: preprocess the images with the model's transform."
            )
        return super()._embeds(x)

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super()._pool(self.token_layout.strip_registers(x))


def to_test_time_registers(model: nn.Module, register_neurons: IndexSpec | None = None, **settings) -> nn.Module:
    """Turn an open_clip model's ``visual`` (or a `VisionTransformer` itself) into an `OpenCLIPTTRegVisionTransformer`.

    In place, weights kept; returns ``model``. ``settings`` are `TestTimeRegisterConfig` fields such as
    ``num_test_time_registers`` (0: edit off). Without ``register_neurons`` the edit stays off until
    `set_register_neurons` gets an index.
    """
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"Test-time registers need open_clip's VisionTransformer tower (ViT-* models), not {type(visual).__name__}."
        )
    if not isinstance(visual, OpenCLIPTTRegVisionTransformer):
        adopt(visual, OpenCLIPTTRegVisionTransformer).adopt_register_modules()
    visual.set_register_neurons(register_neurons, **settings)
    return model


def checkpoint_uses_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip's pretrained config says the ``pretrained`` weights were trained with QuickGELU (OpenAI's)."""
    return bool(pretrained) and get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False)


def create_model_and_transforms(
    model_name: str,
    pretrained: str | None = None,
    *,
    register_neurons: IndexSpec | None = None,
    checkpoint: str | None = None,
    **kwargs,
):
    """`open_clip.create_model_and_transforms` with a test-time-register vision tower: ``(model, train, val)``.

    ``register_neurons`` is required unless ``num_test_time_registers=0`` or an index ships for ``checkpoint`` (the
    id it is looked up by; default ``"MODEL (PRETRAINED)"``); other register settings
    (``num_test_time_registers``, ``register_scale``, ...) go to the tower, everything else to open_clip. The
    activation follows the checkpoint: QuickGELU for weights open_clip marks so (OpenAI's), even under a GELU
    model name such as ``"ViT-B-16"`` (open_clip itself only warns); ``force_quick_gelu=False`` opts out.
    """
    settings = pop_register_settings(kwargs)
    config = tower_config(model_name, **settings)
    checkpoint = checkpoint or (f"{model_name} ({pretrained})" if pretrained else model_name)
    config.attach_register_neurons(
        register_neurons, checkpoint=checkpoint, register_semantics=settings.get("register_semantics")
    )
    kwargs.setdefault("force_quick_gelu", checkpoint_uses_quick_gelu(model_name, pretrained))  # False opts out
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_name, pretrained, **kwargs)
    settings = {name: getattr(config, name) for name in REGISTER_SETTINGS}
    return to_test_time_registers(model, **settings), preprocess_train, preprocess_val


def tower_config(model_name: str, **settings) -> TestTimeRegisterConfig:
    """The register settings of open_clip model ``model_name``'s vision tower, from open_clip's model config (no
    download): its depth and MLP width bound the index."""
    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg")
    if vision is None:
        raise ValueError(f"Unknown open_clip model {model_name!r}; see `open_clip.list_models()`.")
    width = int(vision.get("width", 768))
    return TestTimeRegisterConfig(
        num_hidden_layers=int(vision.get("layers", 12)), mlp_width=int(width * vision.get("mlp_ratio", 4.0)), **settings
    )
