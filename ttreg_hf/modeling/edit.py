"""The register-neuron edit: the one implementation every model family uses."""

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import TTRegValueError
from ..index import RegisterIndexMismatchWarning
from ..settings import PATCH_MODES, SEMANTICS
from .layout import TokenLayout

IMAGE_SIZE_TOLERANCE = 1.5  # an index applies within 1.5x of the image side it was found at, either way
NO_REGISTERS = TokenLayout(num_prefix_tokens=1, num_registers=0)  # the layout of an edit that is off


def warn_if_far_from_found_size(found_at: tuple[int, int] | None, num_patches: int) -> None:
    """Warn (`RegisterIndexMismatchWarning`) when ``num_patches`` patch tokens (a square image's, or the same area) put the image side more than
    `IMAGE_SIZE_TOLERANCE` times away from the ``found_at = (image size, patch size)`` of the attached index, in
    pixels. Python ints only: no host sync, nothing traced under `torch.compile` (which skips the check)."""
    if found_at is None or torch.compiler.is_compiling():
        return
    image_size, patch_size = found_at
    side = math.sqrt(num_patches) * patch_size
    if not 1 / IMAGE_SIZE_TOLERANCE <= side / image_size <= IMAGE_SIZE_TOLERANCE:
        warnings.warn(
            f"The register-neuron index was found at {image_size} px; this model runs at about {side:.0f} px "
            f"({num_patches} patches of {patch_size} px), more than {IMAGE_SIZE_TOLERANCE}x away, where it may miss "
            f"outlier neurons (an index found at 518 px misses outliers at 224 px on DINOv2-S/B). Run at about "
            f"{image_size} px, or find the neurons at this size with `ttreg find-neurons --image-size`.",
            RegisterIndexMismatchWarning,
            stacklevel=2,
        )


def check_edit_arguments(
    neurons: Sequence[int], layout: TokenLayout, scale: Sequence[float], semantics: str, patch_mode: str
) -> None:
    """Refuse what `RegisterNeuronEdit.configure` cannot do (a model configures its edits from its validated config)."""
    if semantics not in SEMANTICS:
        raise TTRegValueError(f"Unknown register semantics {semantics!r}; choose one of {SEMANTICS}.")
    if patch_mode not in PATCH_MODES:
        raise TTRegValueError(f"Unknown patch mode {patch_mode!r}; choose one of {PATCH_MODES}.")
    if neurons and len(scale) != layout.num_registers:
        raise TTRegValueError(f"Got {len(scale)} register scales for {layout.num_registers} test-time registers.")
    if neurons and layout.num_registers == 0:
        raise TTRegValueError("A register-neuron edit with neurons needs at least one test-time register.")


class RegisterNeuronEdit(nn.Module):
    """Moves the register neurons' activations of one MLP onto the test-time registers.

    Applied to the MLP hidden activations ``h[b, t, n]`` right after the activation function (after the gating for
    SwiGLU). Every image is edited on its own; nothing leaves the device, and no Python branch depends on tensor
    values (only on settings and on whether autograd needs the input).

    * ``semantics="paper"`` (Algorithm 2 of "Vision Transformers Don't Need Trained Registers"): the register value of
      neuron ``n`` is ``max_t h[b, t, n]``; every non-register token, CLS included, is reset by ``patch_mode``.
    * ``semantics="reference"`` (the authors' released code): one value per image, the signed entry of largest
      magnitude over all tokens and all listed neurons, written to every listed neuron; prefix tokens are kept and
      only patch tokens are reset.

    Register ``r`` receives ``scale[r] * value``. ``patch_mode`` says what reset tokens get: ``zero``; ``mean`` (the
    mean over patch tokens); ``only_outliers`` (values above mean + 1 std of the patch tokens become the mean; the
    std is the unbiased one, as ``torch.std``); ``same`` (untouched).

    ``token_mask`` (``(batch, tokens)``, registers included, true on real tokens), given by the MLP of a family with
    padded batches (variable-resolution inputs), keeps padding out of the register value and the patch statistics.
    An image with no real patch has mean 0 and no outlier; one with no real token at all gets register value 0.
    """

    # (image size, patch size) in pixels that the attached index was found at, on one edit of the model (the plumbing
    # sets it from the config): its forward warns once when the image is far from that size
    found_at: tuple[int, int] | None = None

    def __init__(
        self,
        neurons: Sequence[int] = (),
        layout: TokenLayout = NO_REGISTERS,
        scale: Sequence[float] = (),
        semantics: str = "paper",
        patch_mode: str = "zero",
    ) -> None:
        super().__init__()
        self.configure(neurons, layout, scale, semantics, patch_mode)

    def configure(
        self,
        neurons: Sequence[int],
        layout: TokenLayout,
        scale: Sequence[float],
        semantics: str = "paper",
        patch_mode: str = "zero",
        device: torch.device | str | None = None,
    ) -> None:
        """Set what the edit does, in place (the module stays, and the hooks on it): no ``neurons`` turns it off, so
        that the activations pass unchanged. The buffers are made on ``device`` (default: the current one)."""
        check_edit_arguments(neurons, layout, scale, semantics, patch_mode)
        self.neuron_ids = tuple(int(n) for n in neurons)
        self.scale_values = tuple(float(s) for s in scale) if neurons else ()
        self.largest_scale = max((abs(s) for s in self.scale_values), default=0.0)
        self.layout = layout
        self.semantics = semantics
        self.patch_mode = patch_mode
        neuron_ids = torch.tensor(self.neuron_ids, dtype=torch.long, device=device)
        self.register_buffer("neurons", neuron_ids, persistent=False)
        self.register_buffer("scale", torch.tensor(self.scale_values, device=device).view(1, -1, 1), persistent=False)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Refill the buffers, e.g. by `_init_weights` after a meta-device load (where they were made without data)."""
        self.neurons.copy_(torch.tensor(self.neuron_ids, dtype=torch.long))
        self.scale.copy_(torch.tensor(self.scale_values).view(1, -1, 1))

    def extra_repr(self) -> str:
        if not self.neuron_ids:
            return "off"
        return (
            f"neurons={list(self.neuron_ids)}, registers={self.layout.num_registers}, "
            f"semantics={self.semantics!r}, patch_mode={self.patch_mode!r}"
        )

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.neuron_ids:
            return hidden_states
        # settings and dtype only: no sync, no graph break
        if self.largest_scale > torch.finfo(hidden_states.dtype).max:
            raise TTRegValueError(
                f"register_scale {self.largest_scale:g} overflows {hidden_states.dtype} (largest "
                f"{torch.finfo(hidden_states.dtype).max:g}): every register would be inf. Use a smaller scale or run "
                "the model in float32 or bfloat16."
            )
        neurons = self.neurons.to(hidden_states.device, non_blocking=True)  # a no-op unless the MLP is offloaded
        activations = hidden_states.index_select(-1, neurons)  # (batch, tokens, listed neurons)
        valid = None if token_mask is None else token_mask.to(activations.device, torch.bool).unsqueeze(-1)
        num_kept = 0 if self.semantics == "paper" else self.layout.num_prefix_tokens
        end = self.layout.num_tokens_without_registers(activations)
        warn_if_far_from_found_size(self.found_at, end - self.layout.num_prefix_tokens)
        edited = torch.cat(
            (
                activations[:, :num_kept],
                self._reset(activations[:, num_kept:end], self.layout.patches(activations), valid),
                self.scale.to(activations.device, activations.dtype) * self._register_value(activations, valid),
            ),
            dim=1,
        )
        # in place when autograd does not need the activations: no second full-size copy at inference
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            return hidden_states.index_copy(-1, neurons, edited)
        return hidden_states.index_copy_(-1, neurons, edited)

    def _register_value(self, activations: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Per image, shape ``(batch, 1, listed neurons)``; ``valid`` (``(batch, tokens, 1)``) leaves padding out."""
        if self.semantics == "paper":
            if valid is None:
                return activations.amax(dim=1, keepdim=True)
            value = activations.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)
        else:
            flat = activations.flatten(1)
            magnitude = activations.abs() if valid is None else activations.abs().masked_fill(~valid, -1)
            largest = flat.gather(1, magnitude.flatten(1).argmax(dim=1, keepdim=True))
            value = largest.unsqueeze(-1).expand(-1, 1, activations.shape[-1])
            if valid is None:
                return value
        return torch.where(valid.any(dim=1, keepdim=True), value, 0)  # no real token: nothing to move

    def _reset(self, tokens: torch.Tensor, patches: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if self.patch_mode == "same":
            return tokens
        if self.patch_mode == "zero":
            return torch.zeros_like(tokens)
        patches = patches.float()
        if valid is None:
            mean, std = patches.mean(dim=1, keepdim=True), patches.std(dim=1, keepdim=True)
        else:  # over the real patches only; with none, the mean is 0 and the std NaN (as torch.std of one value): no outlier
            valid_patches = self.layout.patches(valid).float()
            count = valid_patches.sum(dim=1, keepdim=True)
            mean = (patches * valid_patches).sum(dim=1, keepdim=True) / count.clamp(min=1)
            std = (((patches - mean) ** 2 * valid_patches).sum(dim=1, keepdim=True) / (count - 1).clamp(min=0)).sqrt()
        if self.patch_mode == "mean":
            return mean.to(tokens.dtype).expand_as(tokens)
        threshold = mean + std
        return torch.where(tokens.float() > threshold, mean, tokens.float()).to(tokens.dtype)
