"""The package's timm models in timm's own registry: ``ttreg_<architecture>`` for timm's architectures.

`register_timm_models` (called by `ttreg_hf.modeling.timm` when it is imported) registers, with timm's public
`register_model`, one entrypoint per architecture of the timm modules that define the family's parent classes
(``vision_transformer``, ``deit``), with the parent's pretrained tags (`generate_default_cfgs`): then
``timm.create_model("ttreg_vit_large_patch14_dinov2.lvd142m", pretrained=True)`` builds our model, and
``timm.list_models("ttreg_*")`` lists them. As timm's own model modules do, this module holds the entrypoints (in
``__all__``) and their ``default_cfgs``; timm lists it as its module ``timm_registry``.
"""

from collections.abc import Callable, Iterable

import timm
from timm.models import generate_default_cfgs, get_arch_pretrained_cfgs, register_model

PREFIX = "ttreg_"  # timm's name of ours: the prefix, then timm's architecture name
default_cfgs = {}  # ``{our name: DefaultCfg}``, read by `register_model`


def timm_architectures(parents: Iterable[type]) -> list[str]:
    """timm's architecture names of the models that the timm modules defining ``parents`` register."""
    return timm.list_models(module=sorted({parent.__module__.rpartition(".")[2] for parent in parents}))


def register_timm_models(parents: Iterable[type], create_model: Callable) -> None:
    """Register ``ttreg_<architecture>`` for every architecture of `timm_architectures`: an entrypoint calling
    ``create_model(architecture, pretrained, **kwargs)``, with the architecture's pretrained configs. Idempotent."""
    architectures = [name for name in timm_architectures(parents) if PREFIX + name not in globals()]
    cfgs = {PREFIX + tagged: cfg for name in architectures for tagged, cfg in get_arch_pretrained_cfgs(name).items()}
    default_cfgs.update(generate_default_cfgs(cfgs))
    for name in architectures:
        globals()[PREFIX + name] = register_model(_entrypoint(name, create_model))


def _entrypoint(architecture: str, create_model: Callable) -> Callable:
    def entrypoint(pretrained: bool = False, **kwargs):
        return create_model(architecture, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = PREFIX + architecture
    entrypoint.__doc__ = f"timm's ``{architecture}`` with test-time registers (`ttreg_hf.modeling.timm.create_model`)."
    return entrypoint
