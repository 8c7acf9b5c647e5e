"""The analysis tools on every family under what researchers do to them: settings changed inside a tool, padded
SigLIP2 batches, and bad layers, neurons and images — each refused with the model's own message, never a silent
wrong number."""

import pytest
import torch

from ttreg_hf.analysis import (
    ablate_neurons,
    capture,
    rewrite_activations,
    run_with_cache,
    shift_outliers,
    summarize_layers,
    with_register_neurons,
)
from ttreg_hf.analysis.metrics import automatic_threshold, patch_norms
from ttreg_hf.evaluation.evaluate import _forward
from ttreg_hf.images import image_processor_preprocessor
from ttreg_hf.registry import family_of
from ttreg_hf.report import inspect_image

from family_models import LAYER, NEURONS, TINY, analysis_inputs, naflex, planted

INDEX = {LAYER: list(NEURONS)}


def split(inputs: dict) -> tuple[torch.Tensor, dict]:
    inputs = dict(inputs)
    return inputs.pop("pixel_values"), inputs


def tokens(output) -> torch.Tensor:
    """The token tensor of a forward (OpenCLIP and timm towers return one tensor)."""
    return getattr(output, "last_hidden_state", output)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_a_settings_change_inside_a_tool_is_followed(name):
    """Writing a config field inside a tool rebuilds the edits at the next forward: the tools act on, and report,
    what that forward runs — the ablation still ablates, the cache holds the layer and the layout it ran with."""
    model, (pixel_values, keywords) = planted(name), split(analysis_inputs(name))

    def run():
        return tokens(model(pixel_values, **keywords))

    with ablate_neurons(model, INDEX):
        model.config.register_neurons = {str(LAYER + 1): [3]}  # written directly, as the docs allow
        model.config.num_test_time_registers = 2
        inside = run()
    with ablate_neurons(model, INDEX):  # hooked after the rebuild
        expected = run()
    assert torch.equal(inside, expected) and not torch.allclose(inside, run())
    with capture(model, mlp=[1], blocks=[1]) as cache:
        model.config.num_test_time_registers = 3
        run()
    _, fresh = run_with_cache(model, pixel_values, mlp=[1], blocks=[1], **keywords)
    assert cache.layout.num_registers == fresh.layout.num_registers == 3
    assert torch.equal(cache.mlp_activations[1], fresh.mlp_activations[1])
    assert torch.equal(cache.block_outputs[1], fresh.block_outputs[1])
    with with_register_neurons(model, {}), shift_outliers(model, INDEX, 0):
        model.config.register_neurons = {str(LAYER): list(NEURONS)}
        with pytest.raises(ValueError, match="edit off, and the settings changed inside it"):
            run()


def message(call) -> str:
    with pytest.raises(Exception) as error:
        call()
    return str(error.value)


@pytest.mark.parametrize("name", TINY)
def test_the_tools_check_layers_neurons_and_images_as_the_model_does(name):
    model, (pixel_values, keywords) = planted(name), split(analysis_inputs(name))
    depth, width = len(model.transformer_blocks), model.config.mlp_width

    def enter(tool, *args):
        with tool(model, *args):
            pass

    past_depth = message(lambda: run_with_cache(model, pixel_values, mlp=[depth], **keywords))
    assert past_depth == f"Layer {depth} is out of range: the model has {depth} layers (0-based, or negative)."
    assert message(lambda: enter(ablate_neurons, {depth: [0]})) == past_depth
    assert message(lambda: enter(rewrite_activations, {depth: lambda a: a})) == past_depth
    assert message(lambda: enter(shift_outliers, {depth: [0]}, 0)) == past_depth
    for neurons in ({LAYER: [width]}, {LAYER: [-1]}, {LAYER: [3, 3]}, {LAYER: [1.5]}):
        from_the_model = message(lambda neurons=neurons: model.set_register_neurons(neurons))
        for tool, args in ((ablate_neurons, ()), (shift_outliers, (0,))):
            from_the_tool = message(lambda tool=tool, args=args, neurons=neurons: enter(tool, neurons, *args))
            assert from_the_tool and from_the_tool in from_the_model, (neurons, from_the_tool, from_the_model)
    with torch.no_grad(), ablate_neurons(model, {LAYER: []}):  # no neuron: nothing ablated
        assert torch.equal(tokens(model(pixel_values, **keywords)), tokens(model(pixel_values, **keywords)))
    integers = (pixel_values * 40 + 128).clamp(0, 255).to(torch.uint8)
    from_the_tool = message(lambda: run_with_cache(model, integers, **keywords))
    assert "must be a floating-point tensor of normalized images, got torch.uint8" in from_the_tool
    if name != "timm":  # timm's tower leaves the dtype to torch, whose error is its own
        assert from_the_tool == message(lambda: model(integers, **keywords))


@pytest.mark.parametrize("index", [{}, INDEX], ids=["edit off", "edit on"])
def test_a_padded_siglip2_batch_summarizes_as_its_images_do_alone(index):
    """Padding is neither a patch nor an outlier, nor a query of the attention averaged without a CLS token: the
    batch's summary is the mean of each image's own, and its automatic threshold is that of the real patches."""
    model = planted("siglip2").set_register_neurons(index)
    pixel_values, keywords = split(analysis_inputs("siglip2"))
    mask, shapes = keywords["pixel_attention_mask"], keywords["spatial_shapes"]
    _, batch = run_with_cache(model, pixel_values, attentions="all", **keywords)
    registers = torch.ones(2, batch.layout.num_registers, dtype=torch.bool)
    assert torch.equal(batch.token_mask, torch.cat([mask.bool(), registers], dim=1))
    alone, norms = [], []
    for image, (rows, columns) in enumerate(shapes.tolist()):
        real = rows * columns
        inputs = dict(pixel_attention_mask=mask[image : image + 1, :real], spatial_shapes=shapes[image : image + 1])
        _, cache = run_with_cache(model, pixel_values[image : image + 1, :real], attentions="all", **inputs)
        alone.append(summarize_layers(cache, threshold=100.0))
        norms.append(patch_norms(cache.block_outputs[LAYER + 1], cache.layout).flatten())
    assert mask[1].sum() < mask.shape[1]  # the second image is padded
    for layer, summary in enumerate(summarize_layers(batch, threshold=100.0)):
        for field, value in vars(summary).items():
            expected = [vars(summaries[layer])[field] for summaries in alone]
            if expected[0] is None:
                assert value is None, field
            else:
                assert value == pytest.approx(sum(expected) / 2, rel=1e-4, abs=1e-6), (layer, field)
    if not index:  # the planted outliers are there, and counted
        assert 0 < summarize_layers(batch, threshold=100.0)[-1].outliers_per_image < mask.sum() / 2
    threshold = summarize_layers(batch)[LAYER + 1].threshold
    assert threshold == pytest.approx(automatic_threshold(torch.cat(norms)), rel=1e-5)


@torch.no_grad()
def test_shifting_the_outliers_in_a_padded_siglip2_batch_shifts_each_image_as_alone():
    model = planted("siglip2")
    pixel_values, keywords = split(analysis_inputs("siglip2"))
    mask, shapes = keywords["pixel_attention_mask"], keywords["spatial_shapes"]
    with shift_outliers(model, INDEX, 5):
        batch = model(pixel_values, **keywords).last_hidden_state
        for image, (rows, columns) in enumerate(shapes.tolist()):
            real = rows * columns
            inputs = dict(pixel_attention_mask=mask[image : image + 1, :real], spatial_shapes=shapes[image : image + 1])
            alone = model(pixel_values[image : image + 1, :real], **inputs).last_hidden_state
            torch.testing.assert_close(batch[image, :real], alone[0], atol=1e-4, rtol=1e-5)
    first_padding = int(mask[1].sum())
    with shift_outliers(model, INDEX, first_padding), pytest.raises(ValueError, match=r"padding in image\(s\) \[1\]"):
        model(pixel_values, **keywords)


@torch.no_grad()
def test_a_padded_siglip2_batch_is_read_on_each_images_own_patch_grid():
    """What reads patches as a grid (evaluation's LOST boxes, `inspect_image`'s maps, the images shown) takes a NaFlex
    image's own rows x columns, as its processor gives them, and leaves the padding out."""
    model = planted("siglip2")
    inputs = analysis_inputs("siglip2")
    grids = [tuple(shape) for shape in inputs["spatial_shapes"].tolist()]
    assert grids[0] != grids[1]  # the second image is 2:1
    forward = _forward(model, inputs, ["lost"])
    assert forward.grids == grids
    preprocessor = image_processor_preprocessor(family_of(model).default_image_processor(model.config), "SigLIP2")
    mean, std = torch.tensor(preprocessor.mean), torch.tensor(preprocessor.std)
    for image, (shown, (rows, columns)) in enumerate(zip(preprocessor.to_images(inputs), grids)):
        real = rows * columns
        alone = {key: value[image : image + 1] for key, value in inputs.items()}
        assert inspect_image(model, alone, register_neurons={})[0].norm_map.shape == (rows, columns)
        alone = {
            "pixel_values": alone["pixel_values"][:, :real],
            "pixel_attention_mask": alone["pixel_attention_mask"][:, :real],
            "spatial_shapes": alone["spatial_shapes"],
        }
        assert forward.lost_boxes[image] == _forward(model, alone, ["lost"]).lost_boxes[0]
        patches = inputs["pixel_values"][image, :real].unflatten(-1, (-1, 3))
        assert torch.allclose(naflex([shown])[0]["pixel_values"], (patches * std + mean).clamp(0, 1).flatten(-2))
