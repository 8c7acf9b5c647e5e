"""Attention probabilities of one block, recomputed from the block's input (analysis only).

Fast attention kernels (SDPA, ``nn.MultiheadAttention(need_weights=False)``) never materialize the probabilities, so
they are recomputed from the block's input (and its keyword arguments, e.g. DINOv3's rotary embeddings) by the
family's ``attention_reader`` (see `ttreg_hf.family.Family`), most of them with `attention_probabilities`.
"""

from collections.abc import Callable

import torch
from torch import nn

from ..registry import family_of

Reader = Callable[..., torch.Tensor]  # (block, its hidden-states input, **its keyword arguments) -> probabilities


def attention_reader(model: nn.Module) -> Reader:
    """The function that recomputes the attention probabilities of ``model``'s blocks from their inputs."""
    family = family_of(model)
    if family is None or family.attention_reader is None:
        raise NotImplementedError(
            f"No attention reader for {type(model).__name__}: give its family one (`Family.attention_reader`, see "
            "ttreg_hf.family), and register a family of your own with `ttreg_hf.family.register_family`."
        )
    return family.attention_reader
