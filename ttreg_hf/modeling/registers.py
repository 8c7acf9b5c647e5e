"""Register-token plumbing shared by every model family: one layout, one edit per listed layer, stripped outputs.

A family is a subclass of its parent model that declares where its parts are (`RegisterSeams`, plus the number of
tokens before the patches, ``num_prefix_tokens``) and adopts two parameter-free subclasses of the parent's modules:
one that appends the registers, one that calls the edit. Everything else — building the edits from the config,
stripping outputs, discovery and the analysis tools — reads the declaration.
"""

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import CONFIG_NAME, ModelOutput

from ..configs.registers import RegisterSettingsMixin, pop_register_settings, subclasses
from ..errors import TTRegTypeError, TTRegValueError
from ..family import check_close_keywords, check_keywords, closest_keyword_on_error, parameter_names, parent_class
from ..index import (
    RegisterIndexMismatchWarning,
    RegisterNeuronIndex,
    RegisterNeuronIndexError,
    fingerprinted_weight,
    weights_fingerprint,
)
from ..remote_code import remote_auto_map, write_remote_code
from .edit import RegisterNeuronEdit
from .layout import TokenLayout

IndexSpec = str | Path | Mapping | RegisterNeuronIndex


REGISTER_FIELDS = ("test_time_registers", "test_time_register_attentions")


class TestTimeRegisterOutputMixin:
    """Keeps ``return_dict=False`` tuples the parent's: the `REGISTER_FIELDS` are fields, never tuple entries."""

    def to_tuple(self) -> tuple:
        return tuple(self[key] for key in self.keys() if key not in REGISTER_FIELDS)


@dataclasses.dataclass
class TestTimeRegisterModelOutput(TestTimeRegisterOutputMixin, BaseModelOutputWithPooling):
    r"""
    test_time_registers (`torch.FloatTensor` of shape `(batch_size, num_test_time_registers, hidden_size)`):
        The test-time registers' rows of the final sequence, in the space of `last_hidden_state`, from which they are
        stripped. `None` when the edit is off.
    test_time_register_attentions (`tuple(torch.FloatTensor)`, one per layer, each of shape `(batch_size, num_heads,
    sequence_length, num_test_time_registers)`):
        The attention of every token (`sequence_length` as in `attentions`, registers excluded) onto the test-time
        registers, the columns cut from `attentions`: per row, `attentions` and these sum to 1. Returned with
        `output_attentions=True` when the edit is on.
    """

    test_time_registers: torch.FloatTensor | None = None
    test_time_register_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclasses.dataclass
class TestTimeRegisterEncoderOutput(TestTimeRegisterOutputMixin, BaseModelOutput):
    r"""
    An encoder's `BaseModelOutput` without the test-time registers (see `StripRegistersMixin`), with them in
    `test_time_registers` and `test_time_register_attentions` (see `TestTimeRegisterModelOutput`).
    """

    test_time_registers: torch.FloatTensor | None = None
    test_time_register_attentions: tuple[torch.FloatTensor, ...] | None = None


def strip_registers(outputs: ModelOutput, layout: TokenLayout, output_class: type[ModelOutput]) -> ModelOutput:
    """``outputs`` as an ``output_class`` with the parent's shapes: the registers cut from ``last_hidden_state``, every
    hidden state and every attention map, and exposed in the register fields. Without registers, the parent's tensors
    themselves (``retain_grad`` works on them)."""
    fields = dict(outputs.items())
    if not layout.num_registers:
        return output_class(**fields)
    fields["last_hidden_state"] = layout.strip_registers(outputs.last_hidden_state)
    fields["test_time_registers"] = layout.registers(outputs.last_hidden_state)
    if outputs.hidden_states is not None:
        fields["hidden_states"] = tuple(h if h is None else layout.strip_registers(h) for h in outputs.hidden_states)
    if outputs.attentions is not None:
        attentions = outputs.attentions
        fields["attentions"] = tuple(layout.strip_registers_from_attentions(a) for a in attentions)
        fields["test_time_register_attentions"] = tuple(layout.attentions_to_registers(a) for a in attentions)
    return output_class(**fields)


class StripRegistersMixin:
    """For an encoder whose outputs its model reads as patch grids (a backbone's feature maps): its forward returns
    them without the registers (`TestTimeRegisterEncoderOutput`). Mixed in before the parent encoder class and
    declared as a layout reader; an encoder that is a `PreTrainedModel` is rebuilt as the subclass, not adopted."""

    token_layout: TokenLayout

    def forward(self, *args, **kwargs) -> TestTimeRegisterEncoderOutput:
        return strip_registers(super().forward(*args, **kwargs), self.token_layout, TestTimeRegisterEncoderOutput)


@dataclass(frozen=True)
class RegisterSeams:
    """Where a model family keeps the parts test-time registers touch, as dotted attribute paths.

    appender: from the model, the module whose output gets the registers appended: its forward returns
        ``self.token_layout.append_registers(...)`` (after the position embedding, so the registers get none).
    blocks: from the model, the transformer blocks in order; their outputs are the residual stream.
    mlp: from each block, the MLP whose forward calls ``self.register_edit(...)`` on its hidden activations right
        after the activation function (after the gating for gated MLPs).
    layout_readers: from the model, further modules whose forward reads ``self.token_layout`` (e.g. one that strips
        the registers from intermediate outputs).
    modules: the parameter-free subclasses of the parent's modules that give those parts their register behaviour.
        `TestTimeRegisterMixin.adopt_register_modules` adopts each where a module of its direct base class stands:
        at the appender, a layout reader, a block or a block's MLP. A layout reader that is a `PreTrainedModel` (an
        encoder, whose class `transformers` tracks) is rebuilt as the subclass on the same weights instead.
    """

    appender: str
    blocks: str
    mlp: str
    layout_readers: tuple[str, ...] = ()
    modules: tuple[type[nn.Module], ...] = ()


class RegisterAppender(nn.Module):
    """Runs ``module`` (one that comes right after the position embedding, e.g. patch dropout), then appends the
    test-time registers: the appender of towers whose embedding is not a module of its own (OpenCLIP, timm).
    ``module`` should hold no parameters: the keys of those that it holds move under ``module.``."""

    token_layout: TokenLayout

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_layout.append_registers(self.module(tokens))


class EditAfterActivationMixin:
    """For the MLPs that compute ``fc2(activation_fn(fc1(x)))`` (DINOv2, CLIP, SigLIP, ViT, DeiT): their forward with the
    register-neuron edit right after the activation. Mixed in before the parent MLP class, then adopted.
    ``token_mask`` (padded batches) goes to the edit; see `RegisterNeuronEdit`."""

    register_edit: nn.Module

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.register_edit(self.activation_fn(self.fc1(hidden_states)), token_mask))


def adopt(module: nn.Module, subclass: type[nn.Module]) -> nn.Module:
    """Make ``module`` an instance of ``subclass``, which changes its forward but adds no parameters.

    The weights (and state-dict keys) stay as they are; `torch.nn.utils.parametrize` swaps classes the same way.
    The rule for an adopted subclass: no ``__init__`` and no state of its own — it overrides ``forward`` and reads
    only attributes the plumbing sets (``token_layout`` on the appender, ``register_edit`` on the MLPs).
    """
    if not issubclass(subclass, type(module)):
        raise TTRegTypeError(f"{subclass.__name__} does not subclass {type(module).__name__}.")
    module.__class__ = subclass
    return module


def build_sharing_weights(model_class: type[nn.Module], module: nn.Module, *args, **kwargs) -> nn.Module:
    """``model_class(*args, **kwargs)`` built on the meta device (no init cost), then given ``module``'s parameters and
    buffers themselves (the same tensors, so frozen weights, optimizers and devices carry over), in ``module``'s
    training mode: how a `PreTrainedModel` part becomes ours without changing its class. The edits inside are then
    built on the weights' device."""
    with torch.device("meta"):
        model = model_class(*args, **kwargs)
    ours, theirs = (dict(m.named_parameters(remove_duplicate=False)) for m in (model, module))
    if ours.keys() != theirs.keys():
        raise TTRegTypeError(
            f"{model_class.__name__} built from {type(module).__name__}'s config has other parameters "
            f"({', '.join(sorted(ours.keys() ^ theirs.keys())[:3])}, ...): it cannot take that module's weights. A "
            "module wrapped by adapters or quantization is no longer the parent's: give it registers before."
        )
    # not `load_state_dict(assign=True)`: it skips non-persistent buffers (`position_ids`) and resets `requires_grad`
    for name, tensor in [*theirs.items(), *module.named_buffers(remove_duplicate=False)]:
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, tensor)
    for part in model.modules():
        if isinstance(part, TestTimeRegisterMixin):  # its edits were built on the meta device
            part.apply_register_settings()
    return model.train(module.training)


def _subclass_to_adopt(module: nn.Module, subclasses: Sequence[type[nn.Module]]) -> type[nn.Module] | None:
    """The one of ``subclasses`` whose direct base is ``module``'s class, if any."""
    return next((subclass for subclass in subclasses if type(module) in subclass.__bases__), None)


def forward_calls(module: nn.Module, attribute: str) -> bool:
    """Whether the code of ``module``'s forward names ``attribute`` (e.g. ``register_edit``): how the plumbing checks
    that a declared seam does its part. A forward that delegates the call to a helper must name it itself."""
    forward = inspect.unwrap(type(module).forward)
    return attribute in forward.__code__.co_names


def check_pixel_values(pixel_values: torch.Tensor, patch_size: int | Sequence[int]) -> None:
    """Refuse inputs the parent would silently mangle: integer images and sizes the patch size does not divide."""
    if not pixel_values.is_floating_point():
        raise TTRegTypeError(
            f"pixel_values must be a floating-point tensor of normalized images, got {pixel_values.dtype}; "
            "run the images through the model's image processor (or convert and normalize them) first."
        )
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    height, width = pixel_values.shape[-2:]
    if height % patch_h or width % patch_w:
        raise TTRegValueError(
            f"Image size {height}x{width} is not a multiple of the patch size {patch_h}x{patch_w}: the parent model "
            f"would silently drop the remainder. Resize or crop to a multiple, e.g. "
            f"{max(height // patch_h, 1) * patch_h}x{max(width // patch_w, 1) * patch_w}."
        )


def check_image_size(pixel_values: torch.Tensor, image_size: int, interpolate_pos_encoding: bool) -> None:
    """Refuse, like `check_pixel_values`, a size other than the position table's unless the caller interpolates."""
    height, width = pixel_values.shape[-2:]
    if not interpolate_pos_encoding and (height, width) != (image_size, image_size):
        raise TTRegValueError(
            f"Image size {height}x{width} does not match the model's {image_size}x{image_size}: resize the images "
            "(the model's image processor does), or pass `interpolate_pos_encoding=True`."
        )


class TestTimeRegisterMixin:
    """Gives a vision transformer test-time registers; a model family declares only where its parts are.

    A family sets ``register_seams`` and ``num_prefix_tokens``, keeps its settings in ``self.config`` (a
    `TestTimeRegisterConfigMixin` with ``num_hidden_layers`` and ``mlp_width``) and calls `adopt_register_modules`
    once its parent is built (`PreTrainedTestTimeRegisterMixin` does). The config is the one truth: a register setting
    takes effect when it is written, through `set_register_neurons` or to the config's fields, which updates the
    layout and the edits in place (`apply_register_settings`), so ``save_pretrained`` saves exactly what runs and a
    forward only reads them.
    """

    register_seams: ClassVar[RegisterSeams]
    num_prefix_tokens: int = 1

    @property
    def register_appender(self) -> nn.Module:
        """The module that appends the test-time registers (``register_seams.appender``)."""
        return self.get_submodule(self.register_seams.appender)

    @property
    def transformer_blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks in order (``register_seams.blocks``)."""
        return self.get_submodule(self.register_seams.blocks)

    @property
    def register_edit_sites(self) -> list[nn.Module]:
        """Every block's MLP, whose ``register_edit`` slot holds its layer's edit (off when the layer lists no neuron)."""
        return [block.get_submodule(self.register_seams.mlp) for block in self.transformer_blocks]

    @property
    def token_layout(self) -> TokenLayout:
        """The layout of the sequence the blocks see."""
        return self.register_appender.token_layout

    def adopt_register_modules(self) -> None:
        """Adopt the declared subclasses (``register_seams.modules``) where their base classes stand at the seams:
        the appender, the layout readers, every block and every block's MLP. Weights and keys stay the parent's.
        A layout reader that is a `PreTrainedModel` is rebuilt as its subclass first (`build_sharing_weights`). Then
        give every MLP its ``register_edit`` (one `RegisterNeuronEdit` each, kept for the model's life), set them from
        the config and follow it: every later write of a register setting is applied at once."""
        seams = self.register_seams
        for path in seams.layout_readers:
            module = self.get_submodule(path)
            subclass = _subclass_to_adopt(module, seams.modules)
            if subclass is not None and isinstance(module, PreTrainedModel):
                self.set_submodule(path, build_sharing_weights(subclass, module, module.config))
        sites = [self.register_appender, *map(self.get_submodule, seams.layout_readers)]
        for block in self.transformer_blocks:
            sites += [block, block.get_submodule(seams.mlp)]
        for module in sites:
            subclass = _subclass_to_adopt(module, seams.modules)
            if subclass is not None:
                adopt(module, subclass)
        for mlp in self.register_edit_sites:
            mlp.register_edit = RegisterNeuronEdit()
        self.apply_register_settings()
        self.config.follow_register_settings(self.apply_register_settings)

    def __setstate__(self, state: dict) -> None:
        """A copy (`copy.deepcopy`) or an unpickled model follows its own config."""
        super().__setstate__(state)
        self.config.follow_register_settings(self.apply_register_settings)

    def check_register_seams(self) -> None:
        """Refuse seams that would leave the edit silently undone: an appender whose forward does not call
        ``self.token_layout.append_registers`` or an MLP whose forward does not call ``self.register_edit``."""
        seams, name = self.register_seams, type(self).__name__
        appender = self.register_appender
        if not forward_calls(appender, "append_registers"):
            raise TTRegTypeError(
                f"{name}.register_seams.appender is {seams.appender!r}, a {type(appender).__name__}, whose forward "
                "does not call `self.token_layout.append_registers(...)`: no register would be appended. Name the "
                "module after the position embedding, adopted as a subclass that appends (or a `RegisterAppender`)."
            )
        for layer, mlp in enumerate(self.register_edit_sites):
            if not forward_calls(mlp, "register_edit"):
                raise TTRegTypeError(
                    f"{name}.register_seams.mlp is {seams.mlp!r}, and block {layer}'s is a {type(mlp).__name__}, whose "
                    "forward does not call `self.register_edit(...)`: the edit would never run. Declare the MLP's "
                    "subclass that calls it in `register_seams.modules`, or fix the path."
                )

    def apply_register_settings(self) -> None:
        """Set the layout and every MLP's edit from the config's register settings, in place: the modules stay (a hook
        on an edit survives), their buffers made on their MLP's device (the current one for an offloaded MLP). Called
        when a setting is written; a forward only reads what this sets, so under `torch.compile` a settings change
        recompiles through dynamo's guards."""
        self.check_register_seams()
        config = self.config
        config.validate_test_time_registers()
        neurons = config.register_neuron_index
        layout = TokenLayout(self.num_prefix_tokens, config.num_test_time_registers if neurons else 0)
        for path in (self.register_seams.appender, *self.register_seams.layout_readers):
            self.get_submodule(path).token_layout = layout
        for layer, mlp in enumerate(self.register_edit_sites):
            listed = neurons.get(layer, ()) if layout.num_registers else ()
            device = next(mlp.parameters()).device
            mlp.register_edit.configure(
                listed,
                layout,
                config.register_scales,
                config.register_semantics,
                config.register_patch_mode,
                device=None if device.type == "meta" else device,  # an offloaded MLP's weights sit on meta
            )
        self.set_index_found_at()

    def set_index_found_at(self) -> None:
        """Give the first edited layer's edit the ``(image size, patch size)`` the index was found at, which it warns
        about when the model runs far from it (`warn_if_far_from_found_size`, once), and the other edits none."""
        neurons = self.config.register_neuron_index if self.token_layout.num_registers else {}
        for layer, mlp in enumerate(self.register_edit_sites):
            first = neurons and layer == min(neurons)
            mlp.register_edit.found_at = self.config.register_index_found_at if first else None

    def set_register_neurons(
        self,
        register_neurons: IndexSpec | None,
        *,
        num_test_time_registers: int | None = None,
        register_scale: float | list[float] | None = None,
        register_semantics: str | None = None,
        register_patch_mode: str | None = None,
        register_index_provenance: dict | None = None,
    ) -> "TestTimeRegisterMixin":
        """Attach an index (a dict, a file, a shipped name, a Hub repo id or a `RegisterNeuronIndex`): written to the
        config, which applies it at once. Settings left as `None` keep their config value, except the semantics and
        provenance, which follow an index file's. `set_register_neurons({})` turns the edit off. Nothing changes when
        a setting is invalid."""
        self.config.update_test_time_registers(
            register_neurons,
            num_test_time_registers=num_test_time_registers,
            register_scale=register_scale,
            register_semantics=register_semantics,
            register_patch_mode=register_patch_mode,
            register_index_provenance=register_index_provenance,
        )
        if register_neurons is not None:
            warn_if_other_weights(self)
        return self

    def strip_test_time_registers(self, outputs: ModelOutput, output_class: type[ModelOutput]) -> ModelOutput:
        """``outputs`` with the parent's shapes: registers cut from every token tensor and attention map, exposed in
        their own fields. Without registers, the parent's tensors themselves (``retain_grad`` works on them)."""
        return strip_registers(outputs, self.token_layout, output_class)


class KeywordRegisterSettingsMixin(TestTimeRegisterMixin):
    """For towers without a config of their own (OpenCLIP, timm): built like the parent, with the register settings
    (`REGISTER_SETTINGS`) as extra keywords; the family's `adopt_register_modules` gives the tower its config."""

    def __init__(self, *args, **kwargs):
        settings = pop_register_settings(kwargs)
        super().__init__(*args, **kwargs)
        self.adopt_register_modules()
        self.set_register_neurons(settings.pop("register_neurons", None), **settings)


def warn_if_other_weights(model: torch.nn.Module) -> None:
    """Warn (`RegisterIndexMismatchWarning`; Python's default filter shows it once per place) when the attached index
    records a weights fingerprint that is not ``model``'s. Called by the loaders once the weights are in place: one
    strided sample of at most 4096 values of the patch embedding (`weights_fingerprint`), copied to the host once per
    load, and only for an index that records a fingerprint. The fingerprint hashes float32 values, so a model in
    another dtype, or on the meta device, is not compared (the same weights in bfloat16 would always differ)."""
    fingerprint = (model.config.register_index_provenance or {}).get("weights_fingerprint")
    weight = fingerprinted_weight(model)
    if not fingerprint or weight.device.type == "meta" or weight.dtype != torch.float32:
        return
    own = weights_fingerprint(model)
    if own != fingerprint:
        found_for = ", ".join(model.config.register_index_provenance.get("checkpoints", {}).values())
        warnings.warn(
            f"This register-neuron index was found on other weights ({found_for or 'fingerprint ' + fingerprint}; "
            f"this model's fingerprint is {own}, the index's {fingerprint}): the neurons may "
            "not be this checkpoint's (the fingerprint hashes the patch embedding, which fine-tuning changes). Find "
            "this checkpoint's neurons with `ttreg find-neurons`.",
            RegisterIndexMismatchWarning,
            stacklevel=3,
        )


class RegisterEditOffWarning(UserWarning):
    """A model built with test-time registers asked for (``num_test_time_registers > 0``) but no index: edit off."""


def warn_if_edit_off(model: "PreTrainedTestTimeRegisterMixin") -> None:
    """Warn (`RegisterEditOffWarning`) when ``model`` was built with test-time registers but no index."""
    config = model.config
    if config.num_test_time_registers and config.register_neurons is None:
        warnings.warn(
            f"{type(model).__name__} was built with num_test_time_registers={config.num_test_time_registers} but "
            "no register_neurons, so the edit is off and it computes what its parent class does. Attach an index "
            "with `model.set_register_neurons(...)` (a dict, an index file or a shipped name), or set "
            "num_test_time_registers=0 to build the parent on purpose.",
            RegisterEditOffWarning,
            stacklevel=4,
        )


class SavesRemoteCodeMixin:
    """What every `transformers` class of the package saves and initialises as: the remote code beside the weights
    (`save_pretrained`), and the parent's weight init."""

    def save_pretrained(self, save_directory: str | Path, *args, push_to_hub: bool = False, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the family's remote code and an ``auto_map`` in ``config.json``: the
        folder also loads with plain `transformers` (``trust_remote_code=True``, the Auto class of the parent class)
        where ttreg_hf is not installed, while with ttreg_hf imported the Auto classes build the package's classes.
        `push_to_hub` and `Trainer` checkpoints save through here. A subclass of your own saves no remote code."""
        if push_to_hub:
            raise ValueError(
                "save_pretrained(push_to_hub=True) would upload before the remote code is written: call "
                "`model.push_to_hub(repo_id)`, which uploads everything save_pretrained writes."
            )
        auto_map = remote_auto_map(type(self), self.config)
        if auto_map is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        # the keys as the module tree has them, not `transformers`' older layout: the remote classes (named apart from
        # the parents) have no key conversions to read that layout with
        kwargs.setdefault("save_original_format", False)
        config, missing = self.config, object()
        previous = getattr(config, "auto_map", missing)
        config.auto_map = auto_map
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if previous is missing:
                del config.auto_map
            else:
                config.auto_map = previous
        if kwargs.get("is_main_process", True):
            write_remote_code(type(self), save_directory, self.config)

    @classmethod
    def is_custom_code(cls) -> bool:
        """`False`: to `transformers` a class defined outside it is custom code, whose modules keep their constructors'
        torch init; ours initialise as the parent does (its `_init_weights`), fresh or missing from a checkpoint."""
        return False


class TestTimeRegisterLoadingMixin(SavesRemoteCodeMixin):
    """What every `transformers` tower, classifier and dual encoder of the package does on top of its parent: parent
    configs accepted (and converted), and `from_pretrained` resolving the register-neuron index. The register
    settings live in ``config.register_config``: the config itself, or a composite config's ``vision_config``."""

    def __init__(self, config: PreTrainedConfig, *inputs, **kwargs):
        super().__init__(self.convert_config(config), *inputs, **kwargs)

    @classmethod
    def convert_config(cls, config: PreTrainedConfig) -> PreTrainedConfig:
        """``config`` as a ``cls.config_class``: a parent config (a `Dinov2Config` for `Dinov2TTRegModel`) is
        converted with every field kept and the register settings at their defaults."""
        if isinstance(config, cls.config_class):
            return config
        parent_config_class = super().config_class
        if not isinstance(config, parent_config_class):
            raise TTRegTypeError(
                f"{cls.__name__} needs a {cls.config_class.__name__} (or a {parent_config_class.__name__}, which it "
                f"converts), got a {type(config).__name__}."
            )
        return cls.config_class.from_parent_config(config)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, register_neurons: IndexSpec | None = None, **kwargs
    ):
        """`PreTrainedModel.from_pretrained`, plus the register-neuron index.

        The index is, in order: ``register_neurons`` (dict, file, shipped name), the one saved in the checkpoint's
        config, or the shipped index for this checkpoint id. Without one, loading fails (before any weights are
        downloaded) unless ``num_test_time_registers=0``. The config is read once, and the edits built once. As in
        the parent, keyword arguments that name config attributes (``num_labels``, ``out_indices``, the register
        settings) go to the config.
        """
        config = kwargs.pop("config", None)
        config_class = cls.config_class
        settings = register_settings(config_class.register_config_class())
        fields = {field.name for field in dataclasses.fields(config_class)} | settings
        overrides = {
            key: kwargs.pop(key)
            for key in list(kwargs)
            if key not in MODEL_KEYWORDS and (key in fields or (not key.startswith("_") and hasattr(config_class, key)))
        }
        properties = {name for name, value in inspect.getmembers(config_class) if isinstance(value, property)}
        known = {name for name in fields | properties if not name.startswith("_")} - set(MODEL_KEYWORDS)
        check_close_keywords(kwargs, known, f"{cls.__name__}.from_pretrained")  # the rest: `transformers` checks them
        if isinstance(config, PreTrainedConfig):
            config = cls.convert_config(config)
        config = starting_config(config_class, config, pretrained_model_name_or_path, kwargs)
        for key, value in sorted(overrides.items(), key=lambda item: item[0] in settings):  # a new sub-config first
            set_config_keyword(config.register_config if key in settings else config, key, value)
        config.register_config.attach_register_neurons(
            register_neurons,
            checkpoint=str(pretrained_model_name_or_path),
            register_semantics=overrides.get("register_semantics"),
        )
        valid = {*known, *from_pretrained_keywords(), "register_neurons"}
        with closest_keyword_on_error(kwargs, valid, f"{cls.__name__}.from_pretrained"):
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        for model in (loaded[0] if isinstance(loaded, tuple) else loaded).modules():  # `output_loading_info=True`
            if isinstance(model, TestTimeRegisterMixin):
                warn_if_other_weights(model)
        return loaded


class PreTrainedTestTimeRegisterMixin(TestTimeRegisterLoadingMixin, TestTimeRegisterMixin):
    """`TestTimeRegisterMixin` for `transformers` models: `TestTimeRegisterLoadingMixin`, and the edits built after the
    parent's init (their buffers refilled after a meta-device load)."""

    def __init__(self, config: PreTrainedConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self.adopt_register_modules()
        warn_if_edit_off(self)

    @classmethod
    def constructor_arguments(cls, parent_model: PreTrainedModel) -> dict:
        """The keyword arguments besides the config that build this class in the shape of ``parent_model`` (e.g. a
        `ViTModel` without a pooler): what `build_sharing_weights` passes when a parent part becomes ours."""
        return {}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # `transformers` initialises the model itself last, after the sub-models (e.g. `Dinov2Encoder`) that use their
        # own `_init_weights` and never reach the edits: (re)fill every edit's buffers here, e.g. after a meta-device load
        if module is self:
            for edit in self.modules():
                if isinstance(edit, RegisterNeuronEdit):
                    edit.reset_buffers()


def starting_config(config_class: type[PreTrainedConfig], config, source, kwargs: dict) -> PreTrainedConfig:
    """The config a `from_pretrained` of ``source`` starts from: a copy of ``config`` where one is given (the caller's
    stays as it was, as in the parent), else the one saved there (`saved_config`, with the Hub keywords of
    ``kwargs``)."""
    if isinstance(config, PreTrainedConfig):
        return copy.deepcopy(config)
    hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    return saved_config(config_class, config or source, **hub_kwargs)


def saved_config(config_class: type[PreTrainedConfig], source, **hub_kwargs) -> PreTrainedConfig:
    """``config_class.from_pretrained(source)``. An index in that config which the model cannot use is refused naming
    the file and the fix: the config keeps its index whatever the load's settings (``save_pretrained`` writes it)."""
    try:
        return config_class.from_pretrained(source, **hub_kwargs)
    except (StrictDataclassError, RegisterNeuronIndexError) as error:
        cause = error.__cause__ if isinstance(error, StrictDataclassError) else error
        if not isinstance(cause, RegisterNeuronIndexError):
            raise
        file = source if str(source).endswith(".json") else f"{source}/{CONFIG_NAME}"
        raise RegisterNeuronIndexError(
            f"{file} holds a register-neuron index this model cannot use: {cause} The config keeps its index whatever "
            "the load's settings (num_test_time_registers=0 too): mend or remove its `register_neurons` (and "
            "`register_index_provenance`), then give the index with register_neurons=."
        ) from error


def set_config_keyword(config: PreTrainedConfig, key: str, value) -> None:
    """``config.key = value`` as the parent's `from_pretrained` applies a keyword argument that names a config
    attribute: a dict given for a sub-config updates it (its class kept); one of the parent's vision configs given for
    a composite config's register sub-config is converted to ours (here, to refuse a config of another class before
    the strict field validation does, with our message)."""
    current = getattr(config, key, None)
    if isinstance(value, Mapping) and isinstance(current, PreTrainedConfig):
        value = type(current)(**{**current.to_dict(), **value})
    elif key == getattr(config, "register_config_key", None):
        value = config.as_register_config(value)
    setattr(config, key, value)


def register_settings(config_class: type) -> set[str]:
    """The fields a test-time-register config class adds to its parent's: the register settings and the family's own
    (``pool_registers``, ``position_interpolation``)."""
    parent = parent_class(config_class)
    return {field.name for field in dataclasses.fields(config_class)} - {f.name for f in dataclasses.fields(parent)}


def every_family_setting() -> set[str]:
    """The fields that any family's config adds to its parent's (`register_settings`, ``pool_registers`` ... too): what
    a loader that meets the tower's config only later takes for it."""
    ours = (
        config_class for config_class in subclasses(RegisterSettingsMixin) if getattr(config_class, "model_type", None)
    )
    return set().union(*map(register_settings, ours))


MODEL_KEYWORDS = ("dtype", "torch_dtype")  # config attributes that `from_pretrained` gives the model, not the config
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# what `from_pretrained` documents but takes through ``**kwargs`` (not in its signature)
LOADING_KWARGS = (
    "attn_implementation", "device_map", "max_memory", "offload_folder", "offload_buffers", "quantization_config",
    "variant", "output_loading_info", "key_mapping", "generation_config", "trust_remote_code", "adapter_name",
)  # fmt: skip


def from_pretrained_keywords() -> set[str]:
    """The keyword arguments `PreTrainedModel.from_pretrained` takes besides the config's fields: for the closest-name
    hint of a loader that passes the others on to it."""
    return {*parameter_names(PreTrainedModel.from_pretrained), *LOADING_KWARGS, *HUB_KWARGS, *MODEL_KEYWORDS}


def vision_tower_with_registers(model: nn.Module) -> PreTrainedTestTimeRegisterMixin:
    """The test-time-register tower inside ``model``, e.g. to call `set_register_neurons` on it."""
    towers = [module for module in model.modules() if isinstance(module, PreTrainedTestTimeRegisterMixin)]
    if len(towers) != 1:
        raise TTRegValueError(
            f"{type(model).__name__} has {len(towers)} vision towers with test-time registers, not one; give it one "
            "with `to_test_time_registers(model, register_neurons=...)`."
        )
    return towers[0]


def tower_with_registers(
    ours: type["PreTrainedTestTimeRegisterMixin"], tower: PreTrainedModel, config: PreTrainedConfig
) -> "PreTrainedTestTimeRegisterMixin":
    """``tower`` (of ``ours``' parent class) as ``ours``, built from ``config`` on the tower's own weights
    (`build_sharing_weights`); ``tower`` is left as it is."""
    return build_sharing_weights(ours, tower, config, **ours.constructor_arguments(tower))


def set_tower(model: PreTrainedModel, path: str, tower: PreTrainedTestTimeRegisterMixin) -> None:
    """Put ``tower`` at ``path``, and its modules that must stay on one device (our adopted embeddings) into the
    ``_no_split_modules`` that each model above it gathered from its children at init, for ``device_map``."""
    model.set_submodule(path, tower)
    parts = path.split(".")
    for owner in (model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts))):
        if isinstance(owner, PreTrainedModel) and isinstance(owner._no_split_modules, set):
            owner._no_split_modules.update(tower._no_split_modules)


class WithRegisterTowerMixin(TestTimeRegisterLoadingMixin):
    """For a parent model built around a tower of one of our families — a classifier (`Dinov2ForImageClassification`'s
    `dinov2`), a dual encoder (`CLIPModel`'s `vision_model`): the parent builds everything, then its one tower of
    ``tower_class``'s parent class is rebuilt as ``tower_class`` on the same weights (`build_sharing_weights`, as
    `to_test_time_registers` does to a loaded parent). The parent's forward runs unchanged on a tower that returns
    parent-shaped outputs, so its head and pooling never see the registers; the tower's register fields reach the
    caller wherever the parent returns the tower's output (`CLIPOutput.vision_model_output`).
    `vision_tower_with_registers(model)` is the tower."""

    tower_class: ClassVar[type[PreTrainedTestTimeRegisterMixin]]

    def __init__(self, config: PreTrainedConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        parent_tower = parent_class(self.tower_class)
        [(path, tower)] = [(path, module) for path, module in self.named_modules() if type(module) is parent_tower]
        set_tower(self, path, tower_with_registers(self.tower_class, tower, tower.config))

    def set_register_neurons(self, register_neurons: IndexSpec | None, **settings) -> "WithRegisterTowerMixin":
        """The tower's `set_register_neurons` (it writes the config, which this model saves)."""
        vision_tower_with_registers(self).set_register_neurons(register_neurons, **settings)
        return self


class WithRegisterTowerHostMixin(SavesRemoteCodeMixin):
    """For a model built around one vision tower or backbone of a family's parent class, whatever the family — a VLM
    (LLaVA's ``vision_config``), a depth or segmentation model (DPT's ``backbone_config``) — from a config whose
    sub-config is ours (`TestTimeRegisterHostConfigMixin`): the parent builds everything with its own tower (the Auto
    classes of a process without ttreg_hf do not know ours), which then becomes ours on the same weights
    (`build_sharing_weights`), as `to_test_time_registers` upgrades a loaded host, which becomes one in place
    (`adopt`). Its `save_pretrained` writes the remote code of the tower's family, with this class in it."""

    def __init__(self, config: PreTrainedConfig, *inputs, **kwargs):
        if not hasattr(config, "register_config_key"):
            raise TTRegTypeError(
                f"{type(self).__name__} is built from a {self.config_class.__name__}, whose tower config is ours; got "
                f"a {type(config).__name__}. Load a {parent_class(type(self)).__name__} checkpoint with `load_vlm`, or "
                "upgrade a loaded one with `to_test_time_registers`."
            )
        key = config.register_config_key
        ours = getattr(config, key)
        parent_config = ours.as_parent_config()
        setattr(config, key, parent_config)
        try:
            super().__init__(config, *inputs, **kwargs)
        finally:
            setattr(config, key, ours)
        tower_classes = {}
        for tower_class in subclasses(PreTrainedTestTimeRegisterMixin):
            # by model type: in the remote code, the config file transformers loaded is another module than the one
            # the modeling file imports (`convert_config` takes the config from one class to the other)
            if getattr(getattr(tower_class, "config_class", None), "model_type", None) == ours.model_type:
                tower_classes.setdefault(parent_class(tower_class), tower_class)
        towers = [(path, module) for path, module in self.named_modules() if type(module) in tower_classes]
        if len(towers) != 1:
            raise TTRegTypeError(
                f"{type(self).__name__} builds {len(towers)} towers of {', '.join(c.__name__ for c in tower_classes)}, "
                f"not one, from its {key}: a {type(ours).__name__} configures one tower."
            )
        [(path, tower)] = towers
        tower_class = tower_classes[type(tower)]
        set_tower(self, path, tower_with_registers(tower_class, tower, ours))
        setattr(config, key, self.get_submodule(path).config)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, register_neurons: IndexSpec | None = None, **kwargs
    ):
        """`PreTrainedModel.from_pretrained`, plus ``register_neurons`` and the register settings, as our towers'
        `from_pretrained` takes them (the Auto classes pass them here): they go to the tower's sub-config, which
        attaches the index (`attach_register_neurons`), before the weights load. Without them, the parent's."""
        settings = {name: kwargs.pop(name) for name in every_family_setting() if name in kwargs}
        if register_neurons is None and not settings:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        config = starting_config(cls.config_class, kwargs.pop("config", None), pretrained_model_name_or_path, kwargs)
        tower = config.register_config
        check_keywords(settings, register_settings(type(tower)), f"{cls.__name__}.from_pretrained")
        tower.update_test_time_registers(**settings)
        tower.attach_register_neurons(
            register_neurons,
            checkpoint=str(pretrained_model_name_or_path),
            register_semantics=settings.get("register_semantics"),
        )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
