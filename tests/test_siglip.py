"""`SiglipVisionTTRegModel` and `Siglip2VisionTTRegModel` against the parent classes and the hook-based reference."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    Siglip2Config,
    Siglip2Model,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from ttreg_hf import Siglip2VisionTTRegModel, SiglipVisionTTRegConfig, SiglipVisionTTRegModel

from reference_edit import hooked_register_edit
from support import with_registers

NEURONS = {1: [3, 40, 5], 2: [7]}
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
SIGLIP = dict(**COMMON, image_size=28, patch_size=7)  # 16 patches
SIGLIP2 = dict(**COMMON, num_patches=16, patch_size=4)  # a 4x4 position grid, 48 values per patch
SHAPES = ((3, 4), (2, 3))  # the NaFlex test batch: 12 and 6 patches, the second padded to 12
SETTINGS = [("paper", "zero"), ("reference", "mean"), ("paper", "only_outliers")]


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory):
    """A tiny full `SiglipModel` checkpoint (vision keys under ``vision_model.``, as on the Hub)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip")
    SiglipModel(SiglipConfig(vision_config=SIGLIP, text_config=TEXT)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip2_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip2")
    Siglip2Model(Siglip2Config(vision_config=SIGLIP2, text_config=TEXT)).save_pretrained(path)
    return path


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 28, 28) * torch.linspace(0.5, 2.0, 3).view(3, 1, 1, 1)


def naflex_image(height, width, seed):
    """One patchified image, ``(1, height * width, 48)``, with its mask and spatial shape."""
    patches = torch.randn(1, height * width, 48, generator=torch.Generator().manual_seed(seed))
    return patches, torch.ones(1, height * width, dtype=torch.long), torch.tensor([[height, width]])


def naflex_batch():
    """The images of `SHAPES` padded to one length; padding is large, so any leak into the edit shows."""
    images = [naflex_image(h, w, seed) for seed, (h, w) in enumerate(SHAPES)]
    length = max(p.shape[1] for p, _, _ in images)
    pixel_values = 30 * torch.randn(len(images), length, 48)
    mask = torch.zeros(len(images), length, dtype=torch.long)
    for i, (patches, _, _) in enumerate(images):
        pixel_values[i, : patches.shape[1]], mask[i, : patches.shape[1]] = patches[0], 1
    return images, (pixel_values, mask, torch.cat([s for _, _, s in images]))


def hooked(parent, num_registers=1, **settings):
    down_projections = {layer: parent.encoder.layers[layer].mlp.fc2 for layer in NEURONS}
    return hooked_register_edit(
        parent.embeddings, down_projections, NEURONS, num_registers=num_registers, num_prefix=0, **settings
    )


def test_loads_parent_checkpoint_weights(siglip_checkpoint, siglip2_checkpoint):
    for parent_class, model_class, checkpoint in (
        (SiglipVisionModel, SiglipVisionTTRegModel, siglip_checkpoint),
        (Siglip2VisionModel, Siglip2VisionTTRegModel, siglip2_checkpoint),
    ):
        parent_state = parent_class.from_pretrained(checkpoint).state_dict()
        model_state = model_class.from_pretrained(checkpoint, register_neurons=NEURONS).state_dict()
        assert model_state.keys() == parent_state.keys()
        assert all(torch.equal(value, parent_state[key]) for key, value in model_state.items())


def assert_bit_identical(actual, expected):
    assert actual.test_time_registers is None
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(actual.pooler_output, expected.pooler_output)
    assert all(torch.equal(a, e) for a, e in zip(actual.hidden_states, expected.hidden_states, strict=True))


def test_edit_off_is_bit_identical_to_parent(siglip_checkpoint, siglip2_checkpoint, pixels):
    parent = SiglipVisionModel.from_pretrained(siglip_checkpoint).eval()
    model = SiglipVisionTTRegModel.from_pretrained(siglip_checkpoint, num_test_time_registers=0).eval()
    assert_bit_identical(model(pixels, output_hidden_states=True), parent(pixels, output_hidden_states=True))
    assert all(torch.equal(a, e) for a, e in zip(model(pixels, return_dict=False), parent(pixels, return_dict=False)))
    parent = Siglip2VisionModel.from_pretrained(siglip2_checkpoint).eval()
    model = Siglip2VisionTTRegModel.from_pretrained(siglip2_checkpoint, num_test_time_registers=0).eval()
    _, batch = naflex_batch()
    assert_bit_identical(model(*batch, output_hidden_states=True), parent(*batch, output_hidden_states=True))


@pytest.mark.parametrize("pool_registers", [True, False])
@pytest.mark.parametrize("semantics, patch_mode", SETTINGS)
def test_siglip_matches_hooked_reference(siglip_checkpoint, pixels, semantics, patch_mode, pool_registers):
    parent = SiglipVisionModel.from_pretrained(siglip_checkpoint).eval()
    settings = dict(register_scale=[1.0, 0.5], register_semantics=semantics, register_patch_mode=patch_mode)
    model = SiglipVisionTTRegModel.from_pretrained(
        siglip_checkpoint,
        register_neurons=NEURONS,
        num_test_time_registers=2,
        pool_registers=pool_registers,
        **settings,
    ).eval()
    with torch.no_grad(), hooked(parent, 2, scale=[1.0, 0.5], semantics=semantics, patch_mode=patch_mode):
        expected = parent(pixels, output_hidden_states=True)  # the parent's head pools the registers too
    pooled_with, pooled_without = expected.pooler_output, parent.head(expected.last_hidden_state[:, :-2])
    assert not torch.allclose(pooled_with, pooled_without, atol=1e-3)  # the head's view of the registers shows
    with torch.no_grad():
        actual = model(pixels, output_hidden_states=True)
    torch.testing.assert_close(with_registers(actual), expected.last_hidden_state, atol=1e-5, rtol=0)
    pooled = pooled_with if pool_registers else pooled_without
    torch.testing.assert_close(actual.pooler_output, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.hidden_states[-2], expected.hidden_states[-2][:, :-2], atol=1e-5, rtol=0)


def test_gradients_match_the_reference(siglip_checkpoint, pixels):
    parent = SiglipVisionModel.from_pretrained(siglip_checkpoint)
    model = SiglipVisionTTRegModel.from_pretrained(
        siglip_checkpoint, register_neurons=NEURONS, register_patch_mode="mean"
    )
    model(pixels).pooler_output.square().mean().backward()
    with hooked(parent, patch_mode="mean"):
        parent(pixels).pooler_output.square().mean().backward()
    for name in ("encoder.layers.1.mlp.fc1.weight", "embeddings.patch_embedding.weight", "head.probe"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, parent.get_parameter(name).grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 5e-3), (torch.bfloat16, 5e-2)])
def test_half_precision_matches_the_reference_in_that_precision(siglip_checkpoint, pixels, dtype, tolerance):
    parent = SiglipVisionModel.from_pretrained(siglip_checkpoint, dtype=dtype).eval()
    model = SiglipVisionTTRegModel.from_pretrained(
        siglip_checkpoint, register_neurons=NEURONS, register_patch_mode="only_outliers", dtype=dtype
    ).eval()
    with torch.no_grad(), hooked(parent, patch_mode="only_outliers"):
        expected = parent(pixels.to(dtype))
    with torch.no_grad():
        actual = model(pixels.to(dtype))
    assert actual.pooler_output.dtype == dtype
    torch.testing.assert_close(with_registers(actual), expected.last_hidden_state, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=tolerance, rtol=tolerance)


def test_siglip_batch_invariance_and_shapes(siglip_checkpoint, pixels):
    model = SiglipVisionTTRegModel.from_pretrained(
        siglip_checkpoint, register_neurons=NEURONS, num_test_time_registers=2
    )
    with torch.no_grad():
        batched = model.eval()(pixels, output_hidden_states=True)
        assert batched.last_hidden_state.shape == (3, 16, 32) and batched.pooler_output.shape == (3, 32)
        assert batched.test_time_registers.shape == (3, 2, 32)
        assert [h.shape for h in batched.hidden_states] == [(3, 16, 32)] * 4
        for i in range(len(pixels)):
            single = model(pixels[i : i + 1])
            for field in ("last_hidden_state", "pooler_output", "test_time_registers"):
                torch.testing.assert_close(single[field], batched[field][i : i + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("pool_registers", [True, False])
@pytest.mark.parametrize("semantics, patch_mode", SETTINGS)
def test_siglip2_matches_hooked_reference(siglip2_checkpoint, semantics, patch_mode, pool_registers):
    parent = Siglip2VisionModel.from_pretrained(siglip2_checkpoint).eval()
    model = Siglip2VisionTTRegModel.from_pretrained(
        siglip2_checkpoint,
        register_neurons=NEURONS,
        register_semantics=semantics,
        register_patch_mode=patch_mode,
        pool_registers=pool_registers,
    ).eval()
    pixel_values, mask, shapes = naflex_image(3, 4, seed=0)
    with torch.no_grad(), hooked(parent, semantics=semantics, patch_mode=patch_mode):
        expected = parent(pixel_values, torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1), shapes)
        pooled_without = parent.head(expected.last_hidden_state[:, :-1], mask)
    assert not torch.allclose(expected.pooler_output, pooled_without, atol=1e-3)
    with torch.no_grad():
        actual = model(pixel_values, mask, shapes)
    torch.testing.assert_close(with_registers(actual), expected.last_hidden_state, atol=1e-5, rtol=0)
    pooled = expected.pooler_output if pool_registers else pooled_without
    torch.testing.assert_close(actual.pooler_output, pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool_registers", [True, False])
@pytest.mark.parametrize("semantics, patch_mode", SETTINGS)
def test_siglip2_padded_batch_equals_each_image_alone(siglip2_checkpoint, semantics, patch_mode, pool_registers):
    model = Siglip2VisionTTRegModel.from_pretrained(
        siglip2_checkpoint,
        register_neurons=NEURONS,
        num_test_time_registers=2,
        register_semantics=semantics,
        register_patch_mode=patch_mode,
        pool_registers=pool_registers,
    ).eval()
    images, batch = naflex_batch()
    with torch.no_grad():
        batched = model(*batch)
        assert batched.last_hidden_state.shape == (2, 12, 32) and batched.test_time_registers.shape == (2, 2, 32)
        for i, image in enumerate(images):
            alone = model(*image)
            num_patches = image[0].shape[1]
            real_tokens = batched.last_hidden_state[i, :num_patches]
            torch.testing.assert_close(real_tokens, alone.last_hidden_state[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.test_time_registers[i], alone.test_time_registers[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.pooler_output[i], alone.pooler_output[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_siglip2_gradient_checkpointing_recomputes_with_the_token_mask(siglip2_checkpoint, use_reentrant):
    """Checkpointed layers are recomputed in backward, after the forward returned: the recomputed edit must see the
    padded batch's mask again (without it, padding leaks into the register value and the gradients are wrong)."""
    _, batch = naflex_batch()
    grads = []
    for checkpointing in (False, True):
        model = Siglip2VisionTTRegModel.from_pretrained(siglip2_checkpoint, register_neurons=NEURONS).train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        outputs = model(*batch)
        (outputs.pooler_output.square().mean() + outputs.test_time_registers.square().mean()).backward()
        grads.append(model.get_parameter("encoder.layers.0.mlp.fc1.weight").grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


@pytest.mark.usefixtures("fresh_compile_caches")
def test_siglip_compiles_fullgraph(siglip_checkpoint, pixels):
    model = SiglipVisionTTRegModel.from_pretrained(
        siglip_checkpoint, register_neurons=NEURONS, register_semantics="reference", register_patch_mode="only_outliers"
    ).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(with_registers(compiled(pixels)), with_registers(model(pixels)), atol=1e-6, rtol=0)


@pytest.mark.usefixtures("fresh_compile_caches")
def test_siglip2_compiles_fullgraph_with_the_token_mask(siglip2_checkpoint):
    model = Siglip2VisionTTRegModel.from_pretrained(siglip2_checkpoint, register_neurons=NEURONS).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _, batch = naflex_batch()
    with torch.no_grad():
        expected, actual = model(*batch), compiled(*batch)
    torch.testing.assert_close(with_registers(actual), with_registers(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-6, rtol=0)


def test_save_load_round_trip_with_automodel(siglip2_checkpoint, tmp_path):
    model = Siglip2VisionTTRegModel.from_pretrained(
        siglip2_checkpoint, register_neurons=NEURONS, register_scale=2.0, pool_registers=False
    ).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is Siglip2VisionTTRegModel
    assert reloaded.config.register_neuron_index == model.config.register_neuron_index
    assert reloaded.config.pool_registers is False
    _, batch = naflex_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(*batch).pooler_output, model(*batch).pooler_output)
        reloaded.config.pool_registers = True  # the config is what runs, and what `save_pretrained` saves
        pooling = Siglip2VisionTTRegModel.from_pretrained(
            siglip2_checkpoint, register_neurons=NEURONS, register_scale=2.0
        ).eval()
        assert torch.equal(reloaded(*batch).pooler_output, pooling(*batch).pooler_output)


def test_bad_inputs_are_clear_errors(siglip_checkpoint, siglip2_checkpoint):
    model = SiglipVisionTTRegModel.from_pretrained(siglip_checkpoint, register_neurons=NEURONS)
    with pytest.raises(ValueError, match="does not match the model's 28x28.*interpolate_pos_encoding"):
        model(torch.randn(1, 3, 35, 35))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    model = Siglip2VisionTTRegModel.from_pretrained(siglip2_checkpoint, register_neurons=NEURONS)
    pixel_values, mask, shapes = naflex_image(3, 4, seed=0)
    with pytest.raises(ValueError, match="one entry per patch"):
        model(pixel_values, mask[:, :-1], shapes)


def test_hub_entries_build_the_architectures():
    from hubconf import siglip2_base_patch16_naflex_tt_reg, siglip_so400m_patch14_384_tt_reg

    with torch.device("meta"):  # built without allocating them
        so400m = siglip_so400m_patch14_384_tt_reg(pretrained=False, register_neurons={26: [0, 4303]})
        naflex = siglip2_base_patch16_naflex_tt_reg(pretrained=False, register_neurons={11: [3072 - 1]})
    assert isinstance(so400m, SiglipVisionTTRegModel) and isinstance(naflex, Siglip2VisionTTRegModel)
    assert (so400m.config.image_size, so400m.config.num_hidden_layers, so400m.config.mlp_width) == (384, 27, 4304)
    assert (naflex.config.num_patches, naflex.config.patch_size, naflex.config.pool_registers) == (256, 16, True)


def test_planted_siglip_pooling_justifies_the_default(monkeypatch):
    """`benchmarks/siglip_pooling.py`: with the registers, the head pools as the unedited model; without, as if no
    outlier was ever written. The default (`pool_registers=True`) is the first."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("siglip_pooling", benchmarks / "siglip_pooling.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    results = benchmark.measure(num_images=2)
    original, clean = results["original (no edit)"], results["clean (planted neurons silenced)"]
    with_registers, without = results["edit, pool_registers=True"], results["edit, pool_registers=False"]
    assert original[1] > 3 and with_registers[1] < 1.1  # the planted outliers exist, and the edit moves them
    assert benchmark.compare(with_registers[0], original[0])[0] > 0.99 > benchmark.compare(without[0], original[0])[0]
    assert benchmark.compare(without[0], clean[0])[0] > benchmark.compare(with_registers[0], clean[0])[0] + 0.3
    assert SiglipVisionTTRegConfig().pool_registers


def test_siglip2_with_registers_asked_for_and_no_index_is_the_parent_on_a_padded_batch(siglip2_checkpoint):
    """Registers asked for, edit off: the parent's computation bit for bit on a padded NaFlex batch, attention maps
    included (a mask lengthened for registers that are not there would show in them)."""
    parent = Siglip2VisionModel.from_pretrained(siglip2_checkpoint, attn_implementation="eager").eval()
    model = Siglip2VisionTTRegModel.from_pretrained(
        siglip2_checkpoint, register_neurons={}, num_test_time_registers=1, attn_implementation="eager"
    ).eval()
    _, batch = naflex_batch()
    with torch.no_grad():
        actual = model(*batch, output_hidden_states=True, output_attentions=True)
        expected = parent(*batch, output_hidden_states=True, output_attentions=True)
    assert_bit_identical(actual, expected)
    assert all(torch.equal(a, e) for a, e in zip(actual.attentions, expected.attentions, strict=True))


def test_siglip2_refuses_spatial_shapes_that_disagree_with_the_batch_or_the_mask(siglip2_checkpoint):
    """The parent takes each image's rows x columns patches first and pads the rest; shapes that say otherwise
    are silently mangled there (a wrong position grid, padding attended), and refused here."""
    model = Siglip2VisionTTRegModel.from_pretrained(siglip2_checkpoint, register_neurons=NEURONS).eval()
    parent = Siglip2VisionModel.from_pretrained(siglip2_checkpoint).eval()
    _, (pixel_values, mask, shapes) = naflex_batch()  # 3x4 and 2x3 patches, padded to 12
    shuffled = mask.clone()
    shuffled[1] = shuffled[1].flip(0)  # the second image's real patches last
    cases = [
        (mask, shapes[:1], r"shape \(batch, 2\) = \(2, 2\)"),
        (mask, shapes.float(), "integer tensor"),
        (mask, torch.tensor([[3, 4], [0, 6]]), "image 1 is 0x6 patches, which does not fit"),
        (mask, torch.tensor([[3, 4], [4, 4]]), "image 1 is 4x4 patches, which does not fit the 12 patches"),
        (mask, torch.tensor([[3, 4], [2, 2]]), r"image 1 is 2x2 = 4 patches, but its pixel_attention_mask marks 6"),
        (shuffled, shapes, r"image 1 is 2x3 = 6 patches, but .*the first 6 must be real"),
        (mask * 2, shapes, r"image 0 is 3x4 = 12 patches, but .*marks 0 real patches"),
        (None, shapes, r"image 1 is 2x3 = 6 patches, but no pixel_attention_mask marks the rest as padding"),
    ]
    with torch.no_grad():
        parent(pixel_values, mask, torch.tensor([[3, 4], [2, 2]]))  # no error there: a 2x2 grid on 6 patches
        for case_mask, case_shapes, match in cases:
            with pytest.raises(ValueError, match=match):
                model(pixel_values, case_mask, case_shapes)
