"""Deployment: every `transformers` family, edit on, through `torch.export` and ONNX (dynamo exporter, onnxruntime).

Each family is exported once (module scope), as a deployer does: the model itself, with a dynamic batch dimension
(under `torch.no_grad()`, which traces the edit's in-place branch, or without, which traces its out-of-place one). The exported program and the ONNX model
then run at other batch sizes than the traced one and must equal eager within 1e-4, every returned field
(`last_hidden_state`, `pooler_output` or `image_embeds`, `test_time_registers`).
"""

import importlib.util

import pytest
import torch
from torch.export import Dim

from ttreg_hf import (
    CLIPVisionTTRegConfig,
    CLIPVisionTTRegModel,
    CLIPVisionTTRegModelWithProjection,
    DeiTTTRegConfig,
    DeiTTTRegModel,
    Dinov2TTRegConfig,
    Dinov2TTRegModel,
    DINOv3ViTTTRegConfig,
    DINOv3ViTTTRegModel,
    Siglip2VisionTTRegConfig,
    Siglip2VisionTTRegModel,
    SiglipVisionTTRegConfig,
    SiglipVisionTTRegModel,
    ViTTTRegConfig,
    ViTTTRegModel,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
SQUARE = dict(TINY, image_size=16)  # 16 patches
FAMILIES = {  # name -> (model class, config); a few neurons in 1-2 layers, 1-2 registers
    "dinov2": (Dinov2TTRegModel, Dinov2TTRegConfig(**SQUARE, mlp_ratio=2, register_neurons={0: [3, 40], 1: [7]})),
    "dinov2_swiglu": (
        Dinov2TTRegModel,
        Dinov2TTRegConfig(**SQUARE, use_swiglu_ffn=True, register_neurons={1: [5, 60]}, num_test_time_registers=2),
    ),
    "clip": (
        CLIPVisionTTRegModel,
        CLIPVisionTTRegConfig(**SQUARE, intermediate_size=37, register_neurons={1: [2, 30]}),
    ),
    "clip_projection": (
        CLIPVisionTTRegModelWithProjection,
        CLIPVisionTTRegConfig(**SQUARE, intermediate_size=37, projection_dim=16, register_neurons={0: [9], 1: [2]}),
    ),
    "siglip": (
        SiglipVisionTTRegModel,
        SiglipVisionTTRegConfig(**SQUARE, intermediate_size=37, register_neurons={0: [4, 11], 1: [30]}),
    ),
    "siglip2_naflex": (
        Siglip2VisionTTRegModel,
        Siglip2VisionTTRegConfig(
            **TINY,
            num_patches=16,
            intermediate_size=37,
            register_neurons={0: [4, 11], 1: [30]},
            num_test_time_registers=2,
        ),
    ),
    "vit": (ViTTTRegModel, ViTTTRegConfig(**SQUARE, intermediate_size=37, register_neurons={0: [5], 1: [2, 30]})),
    "deit": (
        DeiTTTRegModel,
        DeiTTTRegConfig(**SQUARE, intermediate_size=37, register_neurons={1: [2, 30]}, num_test_time_registers=2),
    ),
    "dinov3": (
        DINOv3ViTTTRegModel,
        DINOv3ViTTTRegConfig(
            **SQUARE, intermediate_size=37, num_register_tokens=2, register_neurons={0: [3], 1: [7, 20]}
        ),
    ),
}
TRACED_BATCH, BATCHES = 2, (1, 5)  # traced at one batch size, run at two others
# a deployer who exports without `torch.no_grad()` traces the edit's out-of-place branch (the in-place one otherwise)
TRACED_WITH_AUTOGRAD = {"dinov2_swiglu", "clip_projection", "siglip2_naflex", "deit"}

pytestmark = pytest.mark.usefixtures("fresh_compile_caches")  # every test runs what dynamo traced


def _inputs(name: str, batch: int) -> tuple[torch.Tensor, ...]:
    """The positional inputs of one family: images, or SigLIP2's patchified NaFlex batch (one image padded)."""
    if name != "siglip2_naflex":
        return (torch.randn(batch, 3, 16, 16),)
    spatial_shapes = torch.tensor([[4, 4]] * batch)
    spatial_shapes[0] = torch.tensor([3, 4])
    mask = (torch.arange(16) < spatial_shapes.prod(-1, keepdim=True)).long()
    return torch.randn(batch, 16, 3 * 4 * 4), mask, spatial_shapes


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request):
    """(family name, eager model, exported program) for each family, exported once."""
    name = request.param
    model_class, config = FAMILIES[name]
    torch.manual_seed(0)
    model = model_class(config).eval()
    inputs = _inputs(name, TRACED_BATCH)
    batch = Dim("batch", min=1, max=64)
    with torch.set_grad_enabled(name in TRACED_WITH_AUTOGRAD), pytest.MonkeyPatch.context() as patch:
        if name == "siglip2_naflex":
            # the parent checks `spatial_shapes` with `torch_compilable_check`, traced to `aten._is_all_true`, which the
            # ONNX exporter cannot translate (plain `Siglip2VisionModel` fails the same way): transformers' switch
            # leaves the checks out of the trace, as a deployer of the parent has to
            patch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
        program = torch.export.export(model, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
    edits = {str(node.target) for node in program.graph.nodes if "index_copy" in str(node.target)}
    assert edits == {"aten.index_copy.default" if name in TRACED_WITH_AUTOGRAD else "aten.index_copy_.default"}
    return name, model, program


def _eager(model, inputs):
    with torch.no_grad():
        outputs = model(*inputs)
    assert outputs.test_time_registers.shape[1] == model.config.num_test_time_registers  # the edit is on
    return outputs


def test_torch_export_with_a_dynamic_batch_equals_eager(exported):
    name, model, program = exported
    deployed = program.module()
    for batch in BATCHES:
        inputs = _inputs(name, batch)
        expected = _eager(model, inputs)
        with torch.no_grad():
            outputs = deployed(*inputs)
        assert type(outputs) is type(expected)  # the model's own output class, every field
        torch.testing.assert_close(dict(outputs.items()), dict(expected.items()), atol=1e-4, rtol=0)


def test_onnx_export_runs_in_onnxruntime_and_equals_eager(exported, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (a test extra: pip install -e '.[test]')")
    import onnxruntime

    name, model, program = exported
    output_names = list(_eager(model, _inputs(name, 1)))  # the output's fields, in order
    onnx_program = torch.onnx.export(program, dynamo=True, output_names=output_names, verbose=False)
    onnx_program.save(tmp_path / f"{name}.onnx")
    session = onnxruntime.InferenceSession(tmp_path / f"{name}.onnx", providers=["CPUExecutionProvider"])
    input_names = [node.name for node in session.get_inputs()]
    assert all(isinstance(node.shape[0], str) for node in session.get_inputs())  # the batch stays symbolic
    for batch in BATCHES:
        inputs = _inputs(name, batch)
        expected = dict(_eager(model, inputs).items())
        outputs = session.run(output_names, {key: value.numpy() for key, value in zip(input_names, inputs)})
        assert {key: value.shape for key, value in zip(output_names, outputs)} == {
            key: tuple(value.shape) for key, value in expected.items()
        }
        torch.testing.assert_close(dict(zip(output_names, map(torch.from_numpy, outputs))), expected, atol=1e-4, rtol=0)


def test_every_declared_transformers_family_is_exported():
    from ttreg_hf.registry import family_of, transformers_families

    exported = {family_of(model_class).name for model_class, _ in FAMILIES.values()}
    assert exported == {family.name for family in transformers_families()}, "add the family's tiny model to FAMILIES"
