"""The internals of our dependencies that ttreg_hf depends on beyond their top-level public API, in one place.

Subclassing a model means depending on its modules (`Dinov2MLP`, open_clip's `Transformer`, ...), which a release
may move or rename: `INTERNALS` lists every such import (`tests/test_upstream.py` checks that every one in the package
is listed and resolves). Some of our code goes further: it re-states a parent's forward with the edit inserted, or
reads, writes or overrides a private name. `PINS` lists each such place with what of ours depends on it, and
`pin_drift` (run by `tests/test_upstream_pins.py`) reports, naming it and the installed version, a re-stated source
whose hash changed, a private name that is gone, or a private keyword no longer taken: re-check the code named in
``used_by`` against the new release, then update the pin (`python -m ttreg_hf.upstream` prints the current hashes).
"""

import hashlib
import importlib
import inspect
import textwrap
from dataclasses import dataclass
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
        "transformers.utils.CONFIG_NAME",
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
        "timm.models.generate_default_cfgs",
        "timm.models.get_arch_pretrained_cfgs",
        "timm.models.register_model",
        "timm.models.deit.VisionTransformerDistilled",
        "timm.models.vision_transformer.VisionTransformer",
    ),
}


@dataclass(frozen=True)
class Pin:
    """One piece of a dependency that our code re-states or reaches into.

    name: the dotted path of the object (module, then attributes), e.g. a parent's ``forward``.
    used_by: our code that depends on it, and how: what to re-check when it changes.
    sha256: for code we re-state (our subclass's method is the parent's with the edit inserted), or whose order of
        calls we rely on: the hash of its dedented source in the versions we test. Empty: presence only.
    keywords: private keyword arguments we pass to it: it must still take each.
    mentions: private attribute names that its source must still use (set by it, read by us).
    """

    name: str
    used_by: str
    sha256: str = ""
    keywords: tuple[str, ...] = ()
    mentions: tuple[str, ...] = ()


_TF = "transformers.models"
_MLP_WITH_EDIT = "EditAfterActivationMixin.forward (fc2(register_edit(activation_fn(fc1(x)))))"
PINS: tuple[Pin, ...] = (
    # parent forwards we re-state with the edit inserted
    Pin(
        f"{_TF}.clip.modeling_clip.CLIPMLP.forward",
        _MLP_WITH_EDIT,
        "211ee8122b5977522a08b7bd8b25bb982d5e12dd903405b95ee4131b21b3b112",
    ),
    Pin(
        f"{_TF}.dinov2.modeling_dinov2.Dinov2MLP.forward",
        _MLP_WITH_EDIT,
        "338c4c52ceafcc08e599b05babbafd17ca44c1317ed176656eab8a3f79512210",
    ),
    Pin(
        f"{_TF}.siglip.modeling_siglip.SiglipMLP.forward",
        _MLP_WITH_EDIT,
        "211ee8122b5977522a08b7bd8b25bb982d5e12dd903405b95ee4131b21b3b112",
    ),
    Pin(
        f"{_TF}.siglip2.modeling_siglip2.Siglip2MLP.forward",
        _MLP_WITH_EDIT,
        "211ee8122b5977522a08b7bd8b25bb982d5e12dd903405b95ee4131b21b3b112",
    ),
    Pin(
        f"{_TF}.vit.modeling_vit.ViTMLP.forward",
        _MLP_WITH_EDIT,
        "338c4c52ceafcc08e599b05babbafd17ca44c1317ed176656eab8a3f79512210",
    ),
    Pin(
        f"{_TF}.deit.modeling_deit.DeiTMLP.forward",
        _MLP_WITH_EDIT,
        "338c4c52ceafcc08e599b05babbafd17ca44c1317ed176656eab8a3f79512210",
    ),
    Pin(
        f"{_TF}.dinov2.modeling_dinov2.Dinov2SwiGLUFFN.forward",
        "dinov2.Dinov2TTRegSwiGLUFFN.forward",
        "b4e9c2637c7f11724d63cff81b7d6ff8e3db8c2fc1345912c8d9871bd4eebc6a",
    ),
    Pin(
        f"{_TF}.dinov3_vit.modeling_dinov3_vit.DINOv3ViTMLP.forward",
        "dinov3.DINOv3ViTTTRegMLP.forward",
        "b800b765d21bbbc1bc804ac4b7df88edec9b58e6918c63522507e69b71fa5d8e",
    ),
    Pin(
        f"{_TF}.dinov3_vit.modeling_dinov3_vit.DINOv3ViTGatedMLP.forward",
        "dinov3.DINOv3ViTTTRegGatedMLP.forward",
        "b4e9c2637c7f11724d63cff81b7d6ff8e3db8c2fc1345912c8d9871bd4eebc6a",
    ),
    Pin(
        f"{_TF}.siglip2.modeling_siglip2.Siglip2EncoderLayer.forward",
        "siglip.Siglip2TTRegEncoderLayer.forward (the padding mask to the MLP)",
        "54797b80970bca45dd74a6dcc1d17cec80f57ec586c3fce4807d07db636decaa",
    ),
    Pin(
        f"{_TF}.clip.modeling_clip.CLIPVisionModelWithProjection.forward",
        "clip.CLIPVisionTTRegModelWithProjection.forward (the same composition, the register fields kept)",
        "14b4ba36a07969c71c56f62ad8c63b89949d16250b7946af49e45d90f2bf6662",
    ),
    Pin(
        "timm.layers.mlp.Mlp.forward",
        "timm.TimmTTRegMlp.forward",
        "7b5ff3fc93ec073879d4247450d3e4b3dc456396fd0a8516db4b47d527240ebc",
    ),
    Pin(
        "timm.layers.mlp.GluMlp.forward",
        "timm.TimmTTRegGluMlp.forward",
        "b70790c86b2ee1f5614fa060c09a8d274e0258fd5e41022dfdc35b2e8d970429",
    ),
    Pin(
        "timm.layers.mlp.SwiGLU.forward",
        "timm.TimmTTRegSwiGLU.forward",
        "10c450d4463ae7060b53910b48a7e37b44aee0a635f169b62d1fc8778b361bf5",
    ),
    # parent code whose order of calls we rely on
    Pin(
        "timm.models.vision_transformer.VisionTransformer.forward_features",
        "timm.TimmTTRegVisionTransformer: the registers appended at `patch_drop`, right after `_pos_embed`",
        "7d991c757b76e1e81bcd7618dd08f9d6b14f137ca4b3573bb7255716c67d1ce1",
    ),
    Pin(
        "open_clip.transformer.VisionTransformer.forward",
        "open_clip.OpenCLIPTTRegVisionTransformer: `_embeds`, then `patch_dropout` (our appender), then `_pool`; "
        "`forward_with_registers` re-states it, the registers' tokens taken before `_pool`",
        "42d84d00c202e19780d65e6391144b3dd6640ed6b5092666d2fd315f64c6063a",
    ),
    Pin(
        "open_clip.transformer.VisionTransformer.forward_intermediates",
        "open_clip.OpenCLIPTTRegVisionTransformer.forward_intermediates: run with NLC outputs (the class token split "
        "off, the registers last), then the registers cut and the parent's NCHW reshape re-stated",
        "babd45556ef242d6b1a3e677f3660db731f3ec2f66431757b4ff831fd717ada8",
    ),
    # private names we override, read or write
    Pin(
        "timm.models._input.get_model_args",
        "timm.TimmTTRegVisionTransformer._model_args (the register settings in what `save_for_hf` writes)",
        mentions=("_model_args",),
    ),
    Pin(
        "timm.models._factory.create_model",
        "timm.TimmTTRegVisionTransformer._model_args (what timm records there, our settings taken out)",
        mentions=("_model_args",),
    ),
    Pin("open_clip.transformer.VisionTransformer._embeds", "open_clip.OpenCLIPTTRegVisionTransformer._embeds (checks)"),
    Pin("open_clip.transformer.VisionTransformer._pool", "open_clip.OpenCLIPTTRegVisionTransformer._pool (strips)"),
    Pin(
        "transformers.modeling_utils.PreTrainedModel._init_weights",
        "registers.PreTrainedTestTimeRegisterMixin._init_weights",
    ),
    Pin(
        "transformers.modeling_utils.PreTrainedModel.is_custom_code",
        "registers.TestTimeRegisterLoadingMixin.is_custom_code (False: ours initialise as the parent does)",
        "233f8de05832aa194c2f4f71288f9403cf31167778958bda628dde5d6e033e3e",
    ),
    Pin(
        "transformers.utils.generic.ModelOutput.to_tuple",
        "registers.TestTimeRegisterOutputMixin.to_tuple (the register fields left out of tuples)",
        "4390ed8ee464c75ed80731c449a18cf702d6603a2281ddaba0afd6eb346f7567",
    ),
    Pin(
        "transformers.configuration_utils.PreTrainedConfig._attn_implementation",
        "configs.registers: kept when a parent config converts",
    ),
    Pin(
        "transformers.modeling_utils.PreTrainedModel.post_init",
        "registers.set_tower: updates the `_no_split_modules` set each model gathers from its children",
        mentions=("_no_split_modules",),
    ),
    *(
        Pin(f"{_TF}.{path}._no_split_modules", "the family's `_no_split_modules` extends its parent's")
        for path in (
            "clip.modeling_clip.CLIPVisionModel",
            "dinov2.modeling_dinov2.Dinov2Model",
            "dinov3_vit.modeling_dinov3_vit.DINOv3ViTModel",
            "siglip.modeling_siglip.SiglipVisionModel",
            "siglip2.modeling_siglip2.Siglip2VisionModel",
            "vit.modeling_vit.ViTModel",
            "deit.modeling_deit.DeiTModel",
        )
    ),
    Pin(
        "transformers.modeling_utils.PreTrainedModel._from_config",
        "family._load_transformers, dinov2_original.load_dinov2: random weights built in ``config.dtype``",
    ),
    Pin(
        "transformers.conversion_mapping.register_checkpoint_conversion_mapping",
        "family.register_auto_classes: our classes and model types get their parents' key conversions",
        keywords=("overwrite",),
    ),
    Pin(
        "transformers.utils.hub.cached_files",
        "export._write_preprocessor_config: `cached_file` without raising on a missing file or connection",
        keywords=("_raise_exceptions_for_missing_entries", "_raise_exceptions_for_connection_errors"),
    ),
    Pin(
        "accelerate.hooks.add_hook_to_module",
        "vlm._vision_tower: a dispatched tower (`device_map`) is recognised by its modules' `_hf_hook`",
        mentions=("_hf_hook",),
    ),
    Pin(
        "transformers.conversion_mapping.register_checkpoint_conversion_mapping",
        "each class registers its parent's checkpoint key conversions under its own name",
        keywords=("model_type_or_class_name", "mapping", "overwrite"),
    ),
    Pin("transformers.conversion_mapping.get_checkpoint_conversion_mapping", "the parent's conversions, read"),
)

DISTRIBUTIONS = {
    "transformers": "transformers",
    "open_clip": "open_clip_torch",
    "timm": "timm",
    "accelerate": "accelerate",
}


def source_sha256(obj) -> str:
    """The hash of ``obj``'s dedented source (a function, a class)."""
    return hashlib.sha256(textwrap.dedent(inspect.getsource(obj)).encode()).hexdigest()


def resolve(name: str):
    """The object at the dotted path ``name``: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no module of {name} can be imported")


def pin_drift() -> list[str]:
    """Each pin the installed packages no longer match, as one line that names it, the version and what of ours to
    re-check."""
    drift = []
    for pin in PINS:
        distribution = DISTRIBUTIONS[pin.name.split(".")[0]]
        where = f"{pin.name} ({distribution} {_version(distribution)}; used by {pin.used_by})"
        try:
            obj = resolve(pin.name)
        except (ImportError, AttributeError) as error:
            drift.append(f"{where}: gone ({error})")
            continue
        function = getattr(obj, "__func__", obj)  # a classmethod's function
        if pin.sha256 and source_sha256(function) != pin.sha256:
            drift.append(f"{where}: its source changed (sha256 {source_sha256(function)}, pinned {pin.sha256})")
        missing = [key for key in pin.keywords if key not in inspect.signature(function).parameters]
        if missing:
            drift.append(f"{where}: no longer takes {', '.join(missing)}")
        unused = [name for name in pin.mentions if name not in inspect.getsource(function)]
        if unused:
            drift.append(f"{where}: no longer uses {', '.join(unused)}")
    return drift


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


if __name__ == "__main__":  # the current hash of every re-stated source, to update `PINS` after a re-check
    for pin in PINS:
        if pin.sha256:
            print(pin.name, source_sha256(getattr(resolve(pin.name), "__func__", resolve(pin.name))))
