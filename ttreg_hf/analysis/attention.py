"""Attention probabilities of one block, recomputed from the block's input (analysis only).

Fast attention kernels (SDPA, ``nn.MultiheadAttention(need_weights=False)``) never materialize the probabilities, so
they are recomputed from the block's input (and its keyword arguments, e.g. DINOv3's rotary embeddings) by the
family's ``attention_reader`` (see `ttreg_hf.family.Family`), most of them with `attention_probabilities`.
"""

from collections.abc import Callable

import torch
from torch import nn

from ..family import family_of

Reader = Callable[..., torch.Tensor]  # (block, its hidden-states input, **its keyword arguments) -> probabilities


def attention_probabilities(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scaling)`` per head, ``(batch, heads, tokens, tokens)``, in float32; ``queries`` and ``keys``
    are ``(batch, tokens, heads * head_dim)``. ``attention_mask`` (``(batch, tokens)``, true on real tokens) keeps
    every query off the padding keys, as the model's attention does."""
    batch, tokens, _ = queries.shape
    queries = queries.view(batch, tokens, num_heads, -1).transpose(1, 2)
    keys = keys.view(batch, tokens, num_heads, -1).transpose(1, 2)
    scores = queries.float() @ keys.float().transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention_reader(model: nn.Module) -> Reader:
    """The function that recomputes the attention probabilities of ``model``'s blocks from their inputs."""
    family = family_of(model)
    if family is None or family.attention_reader is None:
        raise NotImplementedError(
            f"No attention reader for {type(model).__name__}: give its family one (`Family.attention_reader`, see "
            "ttreg_hf.family), and register a family of your own with `ttreg_hf.family.register_family`."
        )
    return family.attention_reader
