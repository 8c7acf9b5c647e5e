"""An independent, deliberately plain implementation of the edit, for tests only.

Forward hooks on an unmodified parent model: one appends the zero registers to the embedding output, the others
rewrite the input of each listed MLP's output projection (= the activations right after the activation function, and
after the gating for SwiGLU) with Python loops over images and neurons. Nothing is shared with `ttreg_hf.modeling`.
"""

from contextlib import contextmanager

import pytest
import torch

# the package edits a copy of the activations when autograd needs them and edits them in place otherwise: a test of
# the edit's values runs the model under each mode (`with mode():`), so that both branches are checked
AUTOGRAD_MODES = [
    pytest.param(mode, id=mode.__name__) for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode)
]


def _edit_one_image(acts, neurons, num_prefix, num_registers, scales, semantics, patch_mode):
    """acts: (tokens, width) of one image, edited in place; every value is read from an untouched copy."""
    source = acts.clone()
    num_tokens = acts.shape[0]
    patch_end = num_tokens - num_registers
    if semantics == "reference":
        block = source[:, neurons]
        flat_position = int(block.abs().flatten().argmax())
        value_for = {n: block.flatten()[flat_position] for n in neurons}
        reset_rows = range(num_prefix, patch_end)
    else:
        value_for = {n: source[:, n].max() for n in neurons}
        reset_rows = range(0, patch_end)
    for n in neurons:
        patch_values = source[num_prefix:patch_end, n].float()
        mean, std = patch_values.mean(), patch_values.std()
        for t in reset_rows:
            if patch_mode == "zero":
                acts[t, n] = 0
            elif patch_mode == "mean" or patch_mode == "only_outliers" and float(source[t, n]) > float(mean + std):
                acts[t, n] = mean
        for r in range(num_registers):
            acts[patch_end + r, n] = scales[r] * value_for[n]


@contextmanager
def hooked_register_edit(
    append_site,
    down_projections,
    neurons,
    num_registers=1,
    num_prefix=1,
    scale=1.0,
    semantics="paper",
    patch_mode="zero",
):
    """Run the parent model with the edit done by hooks.

    append_site: the module whose output gets the registers appended. down_projections: {layer: the MLP's output
    projection}. The model's outputs then contain the registers (nothing strips them).
    """
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * num_registers

    def append(module, args, output):
        zeros = output.new_zeros(output.shape[0], num_registers, output.shape[-1])
        return torch.cat([output, zeros], dim=1)

    def make_pre_hook(layer_neurons):
        def pre_hook(module, args):
            acts = args[0].clone()
            for i in range(acts.shape[0]):
                _edit_one_image(acts[i], layer_neurons, num_prefix, num_registers, scales, semantics, patch_mode)
            return (acts, *args[1:])

        return pre_hook

    handles = [append_site.register_forward_hook(append)]
    handles += [
        down_projections[layer].register_forward_pre_hook(make_pre_hook(list(ids))) for layer, ids in neurons.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
