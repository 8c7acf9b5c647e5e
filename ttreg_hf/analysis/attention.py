"""Attention probabilities of one block, recomputed from the block's input (analysis only).

Fast attention kernels (SDPA, ``nn.MultiheadAttention(need_weights=False)``) never materialize the probabilities, so
they are recomputed here from the block's input (and its keyword arguments, e.g. DINOv3's rotary embeddings). One
small function per block family, found through the block's class hierarchy: a new family adds one entry to
`ATTENTION_READERS`.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

from ..upstream import lookup_by_class


def _probabilities(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scaling: float) -> torch.Tensor:
    """``softmax(q k^T * scaling)`` per head, ``(batch, heads, tokens, tokens)``."""
    batch, tokens, _ = queries.shape
    queries = queries.view(batch, tokens, num_heads, -1).transpose(1, 2)
    keys = keys.view(batch, tokens, num_heads, -1).transpose(1, 2)
    return torch.softmax(queries.float() @ keys.float().transpose(-1, -2) * scaling, dim=-1)


def _dinov2(block: nn.Module, hidden_states: torch.Tensor, **_) -> torch.Tensor:
    attention, normed = block.attention, block.norm1(hidden_states)
    return _probabilities(
        attention.q_proj(normed), attention.k_proj(normed), attention.num_attention_heads, attention.scaling
    )


def _clip(block: nn.Module, hidden_states: torch.Tensor, **_) -> torch.Tensor:
    attention, normed = block.self_attn, block.layer_norm1(hidden_states)
    return _probabilities(attention.q_proj(normed), attention.k_proj(normed), attention.num_heads, attention.scale)


def _vit(block: nn.Module, hidden_states: torch.Tensor, **_) -> torch.Tensor:
    attention, normed = block.attention, block.layernorm_before(hidden_states)
    queries, keys = attention.q_proj(normed), attention.k_proj(normed)
    return _probabilities(queries, keys, attention.num_attention_heads, attention.scaling)


def _dinov3(block: nn.Module, hidden_states: torch.Tensor, position_embeddings=None, **_) -> torch.Tensor:
    """With RoPE on the patches (and, through ttreg_hf's rotation table, the identity on the test-time registers)."""
    attention, normed = block.attention, block.norm1(hidden_states)
    shape = (*normed.shape[:2], attention.num_heads, attention.head_dim)
    queries = attention.q_proj(normed).view(shape).transpose(1, 2)
    keys = attention.k_proj(normed).view(shape).transpose(1, 2)
    if position_embeddings is not None:
        queries, keys = apply_rotary_pos_emb(queries, keys, *position_embeddings)
    return torch.softmax(queries.float() @ keys.float().transpose(-1, -2) * attention.scaling, dim=-1)


def _open_clip(block: nn.Module, hidden_states: torch.Tensor, **_) -> torch.Tensor:
    attention = block.attn  # nn.MultiheadAttention, batch first
    queries, keys, _ = nn.functional.linear(
        block.ln_1(hidden_states), attention.in_proj_weight, attention.in_proj_bias
    ).chunk(3, dim=-1)
    return _probabilities(queries, keys, attention.num_heads, attention.head_dim**-0.5)


def _timm(block: nn.Module, hidden_states: torch.Tensor, **_) -> torch.Tensor:
    attention = block.attn  # timm's `Attention` (pre-norm `Block`)
    if type(attention).__name__ != "Attention":
        raise NotImplementedError(f"No attention reader for timm's {type(attention).__name__}.")
    qkv = attention.qkv(block.norm1(hidden_states)).unflatten(-1, (3, attention.num_heads, attention.head_dim))
    queries, keys = attention.q_norm(qkv[..., 0, :, :]), attention.k_norm(qkv[..., 1, :, :])  # norms act per head
    return _probabilities(queries.flatten(2), keys.flatten(2), attention.num_heads, attention.scale)


Reader = Callable[..., torch.Tensor]  # (block, its hidden-states input, **its keyword arguments) -> probabilities
ATTENTION_READERS: dict[str, Reader] = {
    "transformers.models.dinov2.modeling_dinov2.Dinov2Layer": _dinov2,
    "transformers.models.clip.modeling_clip.CLIPEncoderLayer": _clip,
    "transformers.models.siglip.modeling_siglip.SiglipEncoderLayer": _clip,
    "transformers.models.siglip2.modeling_siglip2.Siglip2EncoderLayer": _clip,  # without the padding mask
    "transformers.models.vit.modeling_vit.ViTLayer": _vit,
    "transformers.models.deit.modeling_deit.DeiTLayer": _vit,
    "transformers.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTLayer": _dinov3,
    "open_clip.transformer.ResidualAttentionBlock": _open_clip,
    "timm.models.vision_transformer.Block": _timm,
}


def attention_reader(block: nn.Module) -> Reader:
    """The function that recomputes ``block``'s attention probabilities from its input."""
    reader = lookup_by_class(ATTENTION_READERS, block)
    if reader is not None:
        return reader
    raise NotImplementedError(
        f"No attention reader for blocks of type {type(block).__name__}; add one to "
        "ttreg_hf.analysis.attention.ATTENTION_READERS."
    )
