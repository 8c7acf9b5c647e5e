"""Where a ViT keeps the weights the planted test bench writes (`ttreg_hf.planted.plant_register_neurons`): each
family declares its own (`Family.planting_sites`) with these types."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


class LinearRows(NamedTuple):
    """Rows of a packed projection as planting sees a Linear, e.g. the query rows of timm's ``qkv`` or of
    ``nn.MultiheadAttention``'s ``in_proj``: views, so writing them writes the model's weights."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, linear: nn.Module, rows: slice, weight: str = "weight", bias: str = "bias") -> "LinearRows":
        """``rows`` of ``linear``'s ``weight`` and ``bias`` parameters (named as given)."""
        bias_tensor = getattr(linear, bias, None)
        return cls(getattr(linear, weight)[rows], None if bias_tensor is None else bias_tensor[rows])


Projection = nn.Linear | LinearRows


@dataclass(frozen=True)
class BlockSites:
    """The projections of one transformer block that planting writes to.

    mlp_in: the MLP's input projection, whose output goes through the activation (for a gated MLP, the gate).
    mlp_out: the MLP's output projection, which reads the hidden activations (after the gating).
    mlp_up: for a gated MLP ``act(gate(x)) * up(x)``, the ``up`` projection; planting sets a planted neuron's row to
        the constant 1 (zero weights, bias 1), so the product is the gate's activation. It needs a bias.
    query, key: the attention's query and key projections, for the attention sink (`None`: no sink in this block,
        e.g. under RoPE, which rotates the keys of the patches).
    attention_out: the attention's output projection (optional), quieted with ``quiet_channels``.
    """

    mlp_in: Projection
    mlp_out: Projection
    mlp_up: Projection | None = None
    query: Projection | None = None
    key: Projection | None = None
    attention_out: Projection | None = None


@dataclass(frozen=True)
class PlantingSites:
    """Where a ViT keeps the weights `plant_register_neurons` writes; `planting_sites` knows the package's families.

    patch_projection: the patch embedding, an ``nn.Conv2d`` over ``(3, H, W)`` images or an ``nn.Linear`` over
        pre-patchified input flattened channel-last, ``(patch, patch, 3)`` (as SigLIP2's image processor does).
    blocks: the transformer blocks' `BlockSites`, in order (pre-norm blocks with LayerNorm).
    num_heads: attention heads (the sink writes one query and one key row per head).
    prefix_tokens: the learned tokens before the patches (CLS, distillation, trained registers), each a tensor
        whose last dimension is the width; none for SigLIP.
    position_embedding: the position table added to the tokens (optional): quieted with the patch projection, and
        where the patch projection has no bias (OpenCLIP's), the anchor goes there instead.
    """

    patch_projection: nn.Conv2d | nn.Linear
    blocks: Sequence[BlockSites]
    num_heads: int
    prefix_tokens: Sequence[torch.Tensor] = ()
    position_embedding: torch.Tensor | None = None


def block_sites(
    layers, attention: Callable, mlp_in: str = "fc1", mlp_out: str = "fc2", mlp_up: str | None = None, sink: bool = True
) -> list[BlockSites]:
    """`BlockSites` of blocks whose MLP keeps its projections as ``mlp_in`` / ``mlp_out`` (/ ``mlp_up``) and whose
    ``attention(block)`` has ``q_proj``, ``k_proj`` and ``o_proj`` (or ``out_proj``); ``sink=False``: no sink."""
    sites = []
    for block in layers:
        mlp, attn = block.mlp, attention(block)
        sites.append(
            BlockSites(
                getattr(mlp, mlp_in),
                getattr(mlp, mlp_out),
                getattr(mlp, mlp_up) if mlp_up else None,
                attn.q_proj if sink else None,
                attn.k_proj if sink else None,
                getattr(attn, "o_proj", None) or attn.out_proj,
            )
        )
    return sites
