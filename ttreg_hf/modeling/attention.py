"""Attention probabilities recomputed from a block's queries and keys: the math behind every family's attention
reader (`Family.attention_reader`), for the analysis tools, since fast kernels never materialize them."""

import torch
from torch import nn


def attention_probabilities(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scaling)`` per head, ``(batch, heads, queries, tokens)``, in float32; ``queries`` are
    ``(batch, queries, heads * head_dim)`` (every token's, or the first few tokens': their rows only), ``keys``
    ``(batch, tokens, heads * head_dim)``. ``attention_mask`` (``(batch, tokens)``, true on real tokens) keeps every
    query off the padding keys, as the model's attention does."""
    queries = queries.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    keys = keys.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    scores = queries.float() @ keys.float().transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def fused_projection(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, part: int) -> torch.Tensor:
    """``inputs`` through one third of a fused ``[queries; keys; values]`` projection (``part`` 0, 1 or 2): what that
    slice of its output would be, without computing the other two."""
    weight = weight.chunk(3)[part]
    return nn.functional.linear(inputs, weight, None if bias is None else bias.chunk(3)[part])
