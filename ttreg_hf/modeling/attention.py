"""Attention probabilities recomputed from a block's queries and keys: the math behind every family's attention
reader (`Family.attention_reader`), for the analysis tools, since fast kernels never materialize them."""

import torch


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
