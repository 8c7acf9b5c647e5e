"""The one register tower of whatever model a user holds, and the layer its consumer reads.

Discovery, ``ttreg inspect`` and every analysis tool take a tower, a classifier, a backbone host (DPT, Depth
Anything, ZoeDepth, Mask2Former), a dual encoder (`CLIPModel`), a VLM (LLaVA, LLaVA-NeXT, LLaVA-OneVision), the
torch.hub DINOv2 model, an open_clip CLIP or a timm model (``features_only`` too): `register_tower` finds the
test-time-register tower they run on, and `consumer_layer` the block whose outputs the model reads from it (a VLM's
``vision_feature_layer``, a backbone's deepest ``out_indices``), where discovery measures the outliers by default.
"""

from dataclasses import dataclass

from torch import nn

from ..modeling.registers import TestTimeRegisterMixin


def register_tower(model: nn.Module) -> TestTimeRegisterMixin:
    """The test-time-register tower of ``model``: ``model`` itself, or the one such module inside it (the outermost:
    a tower's own parts are not towers). A model with none, or with several, is a `ValueError` that names them."""
    if isinstance(model, TestTimeRegisterMixin):
        return model
    towers: list[tuple[str, TestTimeRegisterMixin]] = []
    for path, module in model.named_modules():  # parents first: a tower's own parts come after it
        if isinstance(module, TestTimeRegisterMixin) and not any(path.startswith(f"{p}.") for p, _ in towers):
            towers.append((path, module))
    if len(towers) == 1:
        return towers[0][1]
    name = type(model).__name__
    if towers:
        found = ", ".join(f"{path} ({type(module).__name__})" for path, module in towers)
        raise ValueError(
            f"{name} has {len(towers)} towers with test-time registers ({found}): the analysis tools run on one. "
            "Pass the one to analyse, e.g. `model.get_submodule(path)`."
        )
    raise ValueError(
        f"{name} has no tower with test-time registers to analyse. Give it one, outputs unchanged: "
        "`ttreg_hf.to_test_time_registers(model, register_neurons={})` (transformers models and VLMs), "
        "`ttreg_hf.modeling.open_clip.to_test_time_registers(model, num_test_time_registers=0)` (open_clip) or "
        "`ttreg_hf.modeling.timm.to_test_time_registers(model, num_test_time_registers=0)` (timm)."
    )


@dataclass(frozen=True)
class ConsumerLayer:
    """The block (0-based) whose outputs ``model``'s consumer of its tower reads, and why (for the index's details
    and the CLI's output)."""

    layer: int
    rule: str


def consumer_layer(model: nn.Module) -> ConsumerLayer:
    """The block of `register_tower(model)` whose outputs ``model`` reads: a VLM's ``config.vision_feature_layer``
    (LLaVA: -2, the second-to-last block; of a list, the deepest), a `transformers` backbone's deepest
    ``out_indices``, else the last block (a tower, a classifier, a dual encoder, a timm ``features_only`` model, whose
    blocks end at its deepest index). Both name hidden states, where 0 is the embeddings and ``i`` block ``i - 1``."""
    tower = register_tower(model)
    num_layers = len(tower.transformer_blocks)
    selected = getattr(getattr(model, "config", None), "vision_feature_layer", None)
    if selected is not None:
        what = f"vision_feature_layer {selected} of {type(model).__name__}"
    else:
        selected = getattr(tower, "out_indices", None) if hasattr(tower, "stage_names") else None
        what = f"out_indices {list(selected)} of {type(tower).__name__}" if selected is not None else None
    if selected is None:
        return ConsumerLayer(num_layers - 1, "the last block")
    layers = [selected] if isinstance(selected, int) else list(selected)
    blocks = []
    for hidden_state in layers:
        if hidden_state == 0 or not -num_layers <= hidden_state <= num_layers:
            raise ValueError(
                f"The {what} names hidden state {hidden_state}, which is the embeddings or out of range for a tower "
                f"of {num_layers} blocks: no register neuron writes there. Pass detection_layer= (a block, 0 to "
                f"{num_layers - 1})."
            )
        blocks.append(hidden_state - 1 if hidden_state > 0 else num_layers + hidden_state)
    return ConsumerLayer(max(blocks), f"the {what}" + (", the deepest" if len(layers) > 1 else ""))
