"""The token layout: the one place that knows where prefix tokens, patches and test-time registers sit."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """Tokens are ``[prefix (CLS, trained registers) | patches | test-time registers]``.

    Test-time registers are appended last, so every parent-class convention that indexes from the front
    (``[:, 0]`` is CLS, ``[:, num_prefix_tokens:]`` are patches once the registers are stripped) keeps working.
    """

    num_prefix_tokens: int
    num_registers: int

    def append_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``num_registers`` zero tokens (no position embedding) after the patches."""
        if self.num_registers == 0:
            return tokens
        registers = tokens.new_zeros(tokens.shape[0], self.num_registers, tokens.shape[-1])
        return torch.cat((tokens, registers), dim=1)

    def append_registers_to_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A ``(batch, tokens)`` attention mask extended with ones: every token may attend to the registers."""
        if attention_mask is None or self.num_registers == 0:
            return attention_mask
        return torch.nn.functional.pad(attention_mask, (0, self.num_registers), value=1)

    def num_tokens_without_registers(self, tokens: torch.Tensor) -> int:
        return tokens.shape[1] - self.num_registers

    def strip_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` without the test-time registers: the parent model's layout and shape."""
        return tokens[:, : self.num_tokens_without_registers(tokens)]

    def registers(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.num_tokens_without_registers(tokens) :]

    def strip_registers_from_attentions(self, attentions: torch.Tensor) -> torch.Tensor:
        """``(..., tokens, tokens)`` attention maps without the registers' rows and columns: the parent's shape."""
        end = attentions.shape[-1] - self.num_registers
        return attentions[..., :end, :end]

    def attentions_to_registers(self, attentions: torch.Tensor) -> torch.Tensor:
        """The attention of every non-register token onto the registers, ``(..., tokens - registers, registers)``."""
        end = attentions.shape[-1] - self.num_registers
        return attentions[..., :end, end:]

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.num_prefix_tokens : self.num_tokens_without_registers(tokens)]


def feature_maps(patch_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(batch, height * width, dim)`` patch tokens as ``(batch, dim, height, width)`` maps (``NCHW``)."""
    return patch_tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2).contiguous()
