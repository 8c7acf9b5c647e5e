"""The register-neuron edit against an independent hook-based implementation, on a tiny DINOv2."""

import pytest
import torch
from torch import nn

from ttreg_hf import Dinov2TTRegModel, RegisterNeuronEdit, TokenLayout
from ttreg_hf.settings import PATCH_MODES, SEMANTICS

from reference_edit import AUTOGRAD_MODES
from support import SPECS, parent_of, tiny_dinov2_config, with_registers


def test_swiglu_edit_sits_after_the_gating(images):
    model = Dinov2TTRegModel(tiny_dinov2_config(use_swiglu_ffn=True, register_neurons={0: [1, 9], 2: [30]})).eval()
    with torch.no_grad():
        expected = SPECS["dinov2"].reference(model, images)
        actual = with_registers(model(images))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_masked_patches_are_edited_like_the_reference(images):
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        expected = SPECS["dinov2"].reference(model, images, bool_masked_pos=mask)
        actual = with_registers(model(images, bool_masked_pos=mask))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("fresh_compile_caches")
def test_compiled_with_dynamic_shapes_follows_eager():
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for size in ((56, 56), (70, 42)):
            pixels = torch.randn(2, 3, *size)
            torch.testing.assert_close(
                with_registers(compiled(pixels)), with_registers(model(pixels)), atol=1e-6, rtol=0
            )


@pytest.mark.usefixtures("fresh_compile_caches")
def test_compiled_with_the_default_backend_equals_eager(images):
    """The docs' claim as users run it: `torch.compile(fullgraph=True)`, default backend (inductor; C++ on a CPU).

    SLOW: the C++ build takes ~50 s of CPU on a cold inductor cache (1.5-3 min wall on a loaded 2-core machine), ~20 s
    warm; the other compile tests use `aot_eager`, which builds nothing.
    """
    config = tiny_dinov2_config(num_test_time_registers=2, register_semantics="reference", register_patch_mode="mean")
    model = Dinov2TTRegModel(config).eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            with_registers(compiled(images)), with_registers(model(images)), atol=1e-5, rtol=1e-5
        )


def test_reference_semantics_writes_the_largest_magnitude_and_keeps_cls():
    layout = TokenLayout(num_prefix_tokens=1, num_registers=1)
    edit = RegisterNeuronEdit([0, 2], layout, [1.0], semantics="reference", patch_mode="zero")
    hidden = torch.tensor([[[9.0, 1.0, 4.0], [1.0, 5.0, -7.0], [2.0, 3.0, 1.0], [0.0, 0.0, 0.0]]])
    edited = edit(hidden.clone())
    torch.testing.assert_close(edited[0, 0], hidden[0, 0])  # CLS kept, although it holds the largest entry
    torch.testing.assert_close(edited[0, 1:3, [0, 2]], torch.zeros(2, 2))
    torch.testing.assert_close(edited[0, 1:3, 1], hidden[0, 1:3, 1])  # unlisted neuron untouched
    torch.testing.assert_close(edited[0, 3], torch.tensor([9.0, 0.0, 9.0]))


def test_reference_semantics_keeps_the_sign_of_the_largest_magnitude():
    layout = TokenLayout(num_prefix_tokens=1, num_registers=2)
    edit = RegisterNeuronEdit([1, 2], layout, [1.0, 0.5], semantics="reference", patch_mode="mean")
    hidden = torch.tensor([[[0.0, 1.0, 2.0], [0.0, -8.0, 3.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    edited = edit(hidden.clone())
    torch.testing.assert_close(edited[0, 3:, 1:], torch.tensor([[-8.0, -8.0], [-4.0, -4.0]]))
    torch.testing.assert_close(edited[0, 1:3, 1:], torch.tensor([[-3.0, 2.0], [-3.0, 2.0]]))  # the patch means
    torch.testing.assert_close(edited[0, 0], hidden[0, 0])


def test_paper_semantics_takes_each_neurons_max_and_resets_cls():
    layout = TokenLayout(num_prefix_tokens=1, num_registers=1)
    edit = RegisterNeuronEdit([0, 2], layout, [2.0], semantics="paper", patch_mode="zero")
    hidden = torch.tensor([[[9.0, 1.0, 4.0], [1.0, 5.0, -7.0], [2.0, 3.0, 1.0], [0.0, 0.0, 0.0]]])
    edited = edit(hidden)
    torch.testing.assert_close(edited[0, :3, [0, 2]], torch.zeros(3, 2))
    torch.testing.assert_close(edited[0, 3], torch.tensor([18.0, 0.0, 8.0]))


def test_sdpa_and_eager_attention_agree(images):
    model = Dinov2TTRegModel(tiny_dinov2_config()).eval()
    with torch.no_grad():
        eager = with_registers(model(images))
        model.set_attn_implementation("sdpa")
        sdpa = with_registers(model(images))
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


def test_a_scale_the_running_dtype_cannot_hold_is_refused_not_inf(images):
    model = Dinov2TTRegModel(tiny_dinov2_config(register_scale=1e5)).eval()
    with torch.no_grad():
        registers = model.to(torch.bfloat16)(images.bfloat16()).test_time_registers  # bfloat16 holds 1e5
        assert registers.isfinite().all() and registers.abs().max() > 1
        with pytest.raises(
            ValueError, match=r"register_scale 100000 overflows torch.float16 \(largest 65504\).*float32"
        ):
            model.to(torch.float16)(images.half())
    edit = RegisterNeuronEdit([0], TokenLayout(1, 1), [1e300])  # built directly, past any config check
    with pytest.raises(ValueError, match="register_scale 1e\\+300 overflows torch.float32"):
        edit(torch.randn(1, 4, 8))
    assert RegisterNeuronEdit([0], TokenLayout(1, 1), [1e30])(torch.randn(1, 4, 8)).isfinite().all()


@pytest.mark.parametrize("mode", AUTOGRAD_MODES)
def test_a_relu_mlp_is_edited_like_the_reference_in_every_autograd_mode(mode, images):
    """ReLU's backward reads its output, the activations the edit writes: editing them in place while autograd holds
    them would fail at backward ("modified by an inplace operation"). GELU's reads its input, so only a ReLU MLP
    checks the edit's choice; in eval mode, as for saliency maps, where the choice must not follow ``training``."""
    model = Dinov2TTRegModel(tiny_dinov2_config(hidden_act="relu", register_patch_mode="mean")).eval()
    parent = parent_of(model)
    with mode():
        actual = with_registers(model(images))
        expected = SPECS["dinov2"].reference(model, images, parent)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    if actual.requires_grad:
        actual.square().mean().backward()
        expected.square().mean().backward()
        name = "encoder.layer.1.mlp.fc1.weight"
        torch.testing.assert_close(
            model.get_parameter(name).grad, parent.get_parameter(name).grad, atol=1e-6, rtol=1e-4
        )


@pytest.mark.parametrize(
    "mode, trainable, in_place",
    [(torch.enable_grad, True, False), (torch.enable_grad, False, True), (torch.no_grad, True, True)]
    + [(torch.inference_mode, True, True)],
    ids=["autograd", "frozen weights", "no_grad", "inference_mode"],
)
def test_the_edit_is_in_place_exactly_when_autograd_does_not_hold_the_activations(mode, trainable, in_place):
    """No second full-size copy at inference (the activations are the largest tensor of a ViT's forward), and never
    an in-place write to activations autograd saved."""
    projection = nn.Linear(8, 16).requires_grad_(trainable)
    edit = RegisterNeuronEdit([1, 3], TokenLayout(1, 1), [1.0])
    with mode():
        activations = torch.relu(projection(torch.randn(2, 5, 8)))
        edited = edit(activations)
    assert (edited is activations) == in_place
    if edited.requires_grad:
        edited.sum().backward()
        assert projection.weight.grad is not None


@pytest.mark.parametrize("patch_mode", PATCH_MODES)
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_an_image_without_real_patches_is_finite_and_edited_as_alone(semantics, patch_mode):
    """In a padded batch, an image whose patches are all padding (and one with no real token at all) has mean 0 and
    no outlier; one without a real token gets register value 0. Finite, and the same in the batch as alone."""
    edit = RegisterNeuronEdit([1, 3], TokenLayout(0, 1), [1.0], semantics, patch_mode)
    activations = torch.randn(3, 7, 6) * 5
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:6] = False  # padded
    mask[1, :6] = False  # every patch is padding; the register is real
    mask[2] = False  # nothing is real
    with torch.no_grad():
        together = edit(activations.clone(), mask)
        alone = [edit(activations[i : i + 1].clone(), mask[i : i + 1])[0] for i in range(3)]
    assert together.isfinite().all()
    for image in range(3):
        assert torch.equal(together[image], alone[image])
    assert torch.equal(together[2, -1, [1, 3]], torch.zeros(2))
    if patch_mode == "mean":
        assert torch.equal(together[1, :6][:, [1, 3]], torch.zeros(6, 2))
