"""`transformers`' own common model tests (`ModelTesterMixin`) on every HF subclass, registers on and off.

The common tests are not committed: `fetch_transformers_tests.py` unpacks them for the installed `transformers` on
this module's first run (or by hand, e.g. before going offline). Tests that cannot apply by design are skipped with
their reason in `SKIPS` and in a family's ``skips``. Each family runs once with the edit off and once with test-time registers; its tester mirrors
transformers' own (e.g. `Siglip2VisionModelTester` for SigLIP2's NaFlex inputs). The classifiers run the tests of
what they add to the base model, a parent head (`TASK_TESTS`: training with labels, outputs, save and load), and the
backbones `BackboneTesterMixin`, all with registers.
"""

import importlib
import importlib.util
import re
import subprocess
import sys
import unittest

import pytest
import torch

from ttreg_hf import (
    CLIPTTRegConfig,
    CLIPTTRegForImageClassification,
    CLIPVisionTTRegConfig,
    CLIPVisionTTRegModel,
    CLIPVisionTTRegModelWithProjection,
    DeiTTTRegConfig,
    DeiTTTRegForImageClassification,
    DeiTTTRegForImageClassificationWithTeacher,
    DeiTTTRegModel,
    Dinov2TTRegBackbone,
    Dinov2TTRegConfig,
    Dinov2TTRegForImageClassification,
    Dinov2TTRegModel,
    DINOv3ViTTTRegBackbone,
    DINOv3ViTTTRegConfig,
    DINOv3ViTTTRegModel,
    Siglip2TTRegConfig,
    Siglip2TTRegForImageClassification,
    Siglip2VisionTTRegConfig,
    Siglip2VisionTTRegModel,
    SiglipTTRegConfig,
    SiglipTTRegForImageClassification,
    SiglipVisionTTRegConfig,
    SiglipVisionTTRegModel,
    ViTTTRegConfig,
    ViTTTRegForImageClassification,
    ViTTTRegModel,
)
from ttreg_hf.configs.registers import TestTimeRegisterCompositeConfigMixin

from fetch_transformers_tests import FETCH_COMMAND, PACKAGE, fetch

pytest.importorskip("parameterized", reason="the common tests need `parameterized`: pip install -e '.[test]'")
pytestmark = pytest.mark.usefixtures("fresh_compile_caches")  # transformers' compile tests among them


def _import_common_tests():
    """transformers' `test_modeling_common`, fetched from PyPI on first use (a package registry: allowed in tests)."""
    try:
        directory = fetch()
    except (OSError, subprocess.CalledProcessError) as error:
        reason = f"transformers' common tests could not be fetched ({error}): run `{FETCH_COMMAND}` online"
        pytest.skip(reason, allow_module_level=True)
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, directory / "__init__.py", submodule_search_locations=[str(directory)]
        )
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[PACKAGE])
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")


common = _import_common_tests()
backbone_common = importlib.import_module(f"{PACKAGE}.test_backbone_common")

SKIPS = {
    "test_inputs_embeds": "vision models take pixel_values, not inputs_embeds",
    "test_training": "needs a model with a loss: these are base models (transformers skips its own by class name)",
    "test_training_gradient_checkpointing": "as test_training",
    "test_training_gradient_checkpointing_use_reentrant_false": "as test_training",
    "test_training_gradient_checkpointing_use_reentrant_true": "as test_training",
    "test_reverse_loading_mapping": "our save_pretrained writes the current key layout (save_original_format=False), "
    "which the remote code it writes beside the weights loads (remote code gets no key conversions); "
    "tests/test_remote_code.py and tests/test_entry_paths.py check saving and loading",
}
# what a classifier adds to its base model, which runs the whole suite: a parent head, trained with labels
TASK_TESTS = (
    "test_training",
    "test_training_gradient_checkpointing",
    "test_training_gradient_checkpointing_use_reentrant_false",
    "test_training_gradient_checkpointing_use_reentrant_true",
    "test_save_load",
    "test_attention_outputs",
    "test_hidden_states_output",
    "test_model_outputs_equivalence",
    "test_batching_equivalence",
)
WITH_REGISTERS_SKIPS = {
    "test_retain_grad_hidden_states_attentions": "with registers the parent-shaped hidden states and attentions are "
    "slices of what the blocks compute on, so no gradient reaches them (without registers they are the parent's "
    "tensors and this test runs)",
}


class TTRegModelTester:
    """Tiny configs and random images for the common tests; ``seq_length`` is the parent's (registers stripped):
    ``num_prefix_tokens`` (CLS, distillation, trained registers) before the patches."""

    def __init__(
        self,
        parent,
        config_class,
        num_test_time_registers,
        register_neurons,
        num_prefix_tokens=1,
        batch_size=2,
        **config,
    ):
        self.parent, self.config_class = parent, config_class
        self.batch_size, self.is_training = batch_size, True
        self.image_size, self.patch_size, self.num_channels = 16, 4, 3
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        self.mask_length = (self.image_size // self.patch_size) ** 2  # `bool_masked_pos` covers the patches
        self.num_masks, self.seq_length = self.mask_length // 2, self.mask_length + num_prefix_tokens
        self.registers = dict(num_test_time_registers=num_test_time_registers, register_neurons=register_neurons)
        self.config = config

    def get_config(self):
        vision = dict(
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            initializer_range=0.02,
            **self.geometry(),
            **self.config,
            **self.registers,
        )
        if issubclass(self.config_class, TestTimeRegisterCompositeConfigMixin):  # a one-layer text tower beside it
            text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
            return self.config_class(vision_config=vision, text_config=text)
        return self.config_class(**vision)

    def geometry(self) -> dict:
        """The config fields that size the image."""
        return {"image_size": self.image_size}

    def prepare_config_and_inputs_for_common(self):
        pixel_values = common.floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class NaFlexTTRegModelTester(TTRegModelTester):
    """SigLIP2's variable-resolution inputs, as transformers' `Siglip2VisionModelTester` makes them: patchified images
    of several ``spatial_shapes``, padded to ``seq_length`` patches, with their ``pixel_attention_mask``.

    A batch of 7: the eager-vs-SDPA test runs 7 images and fills a smaller batch with random shapes, empty ones too.
    """

    def __init__(self, *args, batch_size=7, **config):
        super().__init__(*args, batch_size=batch_size, **config)
        self.seq_length = self.mask_length + 2  # the padded length: no image fills it

    def geometry(self) -> dict:
        return {"num_patches": self.mask_length}  # the position-embedding grid, resized to each image's shape

    def prepare_config_and_inputs_for_common(self):
        length, patch_dim = self.seq_length, self.num_channels * self.patch_size**2
        shapes = [(h, w) for h in range(1, length) for w in range(1, length) if h * w < length]
        spatial_shapes = torch.tensor(shapes[:: len(shapes) // self.batch_size][: self.batch_size])
        pixel_attention_mask = torch.zeros(self.batch_size, length, dtype=torch.long)
        for mask, (height, width) in zip(pixel_attention_mask, spatial_shapes):
            mask[: height * width] = 1
        inputs = dict(
            pixel_values=common.floats_tensor([self.batch_size, length, patch_dim]),
            pixel_attention_mask=pixel_attention_mask,
            spatial_shapes=spatial_shapes,
        )
        return self.get_config(), inputs


class _TTRegModelTest(common.ModelTesterMixin):
    """The common tests for one family; subclasses say which classes, which config and how many registers."""

    config_class = None
    config = {}
    num_test_time_registers = 0
    register_neurons = None
    num_prefix_tokens = 1
    model_tester_class = TTRegModelTester
    test_resize_embeddings = False
    skips = {}
    common_skips = SKIPS

    def setUp(self):
        skips = {**self.common_skips, **(WITH_REGISTERS_SKIPS if self.num_test_time_registers else {}), **self.skips}
        for name, reason in skips.items():
            if re.fullmatch(rf"{name}(_\d+(_.*)?)?", self._testMethodName):
                self.skipTest(reason)
        self.model_tester = self.model_tester_class(
            self,
            self.config_class,
            self.num_test_time_registers,
            self.register_neurons,
            self.num_prefix_tokens,
            **self.config,
        )

    def test_model_get_set_embeddings(self):
        """The common test wants token embeddings (`nn.Embedding`); a vision model's input embeddings are its patch
        embeddings, as transformers' own Dinov2 and CLIP vision tests check instead."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), common.nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, common.nn.Linear))


class _Dinov2(_TTRegModelTest):
    all_model_classes = (Dinov2TTRegModel,)
    config_class = Dinov2TTRegConfig
    config = dict(mlp_ratio=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    register_neurons = {0: [3, 40], 1: [7]}


class _CLIP(_TTRegModelTest):
    all_model_classes = (CLIPVisionTTRegModel, CLIPVisionTTRegModelWithProjection)
    config_class = CLIPVisionTTRegConfig
    config = dict(intermediate_size=37, projection_dim=16, dropout=0.1, attention_dropout=0.1)
    register_neurons = {1: [2, 30]}


class Dinov2TTRegModelTest(_Dinov2, unittest.TestCase):
    skips = {
        "test_reverse_loading_mapping": "Dinov2Model's converter for `mlp.weights_in` matches SwiGLU models only; "
        "the SwiGLU variant (Dinov2TTRegModelTwoRegistersSwiGLUTest) runs it"
    }


class Dinov2TTRegModelTwoRegistersSwiGLUTest(_Dinov2, unittest.TestCase):
    num_test_time_registers = 2
    config = {**_Dinov2.config, "use_swiglu_ffn": True}


class CLIPVisionTTRegModelTest(_CLIP, unittest.TestCase):
    pass


class CLIPVisionTTRegModelOneRegisterTest(_CLIP, unittest.TestCase):
    num_test_time_registers = 1


class _ViT(_TTRegModelTest):
    all_model_classes = (ViTTTRegModel,)
    config_class = ViTTTRegConfig
    config = dict(intermediate_size=37, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    register_neurons = {0: [5], 1: [2, 30]}


class _DeiT(_ViT):
    all_model_classes = (DeiTTTRegModel,)
    config_class = DeiTTTRegConfig
    num_prefix_tokens = 2  # CLS and distillation token


class _DINOv3(_TTRegModelTest):
    all_model_classes = (DINOv3ViTTTRegModel,)
    config_class = DINOv3ViTTTRegConfig
    config = dict(intermediate_size=37, num_register_tokens=2)
    num_prefix_tokens = 3  # CLS and the trained registers
    register_neurons = {0: [3], 1: [7, 20]}


class _Siglip(_TTRegModelTest):
    all_model_classes = (SiglipVisionTTRegModel,)
    config_class = SiglipVisionTTRegConfig
    config = dict(intermediate_size=37, attention_dropout=0.1)
    num_prefix_tokens = 0
    register_neurons = {0: [4, 11], 1: [30]}
    skips = dict.fromkeys(
        ("test_cpu_offload", "test_disk_offload_bin", "test_disk_offload_safetensors"),
        "the parent's: accelerate cannot offload the attention-pooling head's `nn.MultiheadAttention` (transformers' "
        "SigLIP and SigLIP2 vision tests turn these off)",
    )


class _Siglip2(_Siglip):
    all_model_classes = (Siglip2VisionTTRegModel,)
    config_class = Siglip2VisionTTRegConfig
    model_tester_class = NaFlexTTRegModelTester
    additional_model_inputs = ["pixel_attention_mask", "spatial_shapes"]  # passed along `pixel_values`


class ViTTTRegModelTest(_ViT, unittest.TestCase):
    pass


class ViTTTRegModelOneRegisterTest(_ViT, unittest.TestCase):
    num_test_time_registers = 1


class DeiTTTRegModelTest(_DeiT, unittest.TestCase):
    pass


class DeiTTTRegModelTwoRegistersTest(_DeiT, unittest.TestCase):
    num_test_time_registers = 2


class DINOv3ViTTTRegModelTest(_DINOv3, unittest.TestCase):
    pass


class DINOv3ViTTTRegModelTwoRegistersGatedTest(_DINOv3, unittest.TestCase):
    num_test_time_registers = 2
    config = {**_DINOv3.config, "use_gated_mlp": True}


class SiglipVisionTTRegModelTest(_Siglip, unittest.TestCase):
    pass


class SiglipVisionTTRegModelOneRegisterTest(_Siglip, unittest.TestCase):
    num_test_time_registers = 1


class Siglip2VisionTTRegModelTest(_Siglip2, unittest.TestCase):
    pass


class Siglip2VisionTTRegModelOneRegisterTest(_Siglip2, unittest.TestCase):
    num_test_time_registers = 1


class _Classifier:
    """The classifiers' tests, with registers: the base model of the family runs every common test, a classifier (the
    parent's head on that model) those of what the head adds, `TASK_TESTS`; the others are not collected. Labels as
    transformers gives its own classifiers (it recognises them by class name)."""

    num_test_time_registers = 1
    # the parents' classifiers leave parts unused (DINOv2's mask token, CLIP's post-layernorm, SigLIP's pooling head)
    test_all_params_have_gradient = False
    common_skips = {name: reason for name, reason in SKIPS.items() if not name.startswith("test_training")}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in dir(cls):
            if name.startswith("test") and not any(re.fullmatch(rf"{task}(_\d+(_.*)?)?", name) for task in TASK_TESTS):
                setattr(cls, name, None)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and "labels" in common.inspect.signature(model_class.forward).parameters:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict


class Dinov2TTRegForImageClassificationTest(_Classifier, _Dinov2, unittest.TestCase):
    all_model_classes = (Dinov2TTRegForImageClassification,)


class ViTTTRegForImageClassificationTest(_Classifier, _ViT, unittest.TestCase):
    all_model_classes = (ViTTTRegForImageClassification,)


class DeiTTTRegForImageClassificationTest(_Classifier, _DeiT, unittest.TestCase):
    all_model_classes = (DeiTTTRegForImageClassification,)


class DeiTTTRegForImageClassificationWithTeacherTest(_Classifier, _DeiT, unittest.TestCase):
    all_model_classes = (DeiTTTRegForImageClassificationWithTeacher,)
    skips = dict.fromkeys(
        [name for name in TASK_TESTS if name.startswith("test_training")],
        "DeiTForImageClassificationWithTeacher has no loss (inference only); transformers' DeiT tests leave it out",
    )


class CLIPTTRegForImageClassificationTest(_Classifier, _CLIP, unittest.TestCase):
    all_model_classes = (CLIPTTRegForImageClassification,)
    config_class = CLIPTTRegConfig


class SiglipTTRegForImageClassificationTest(_Classifier, _Siglip, unittest.TestCase):
    all_model_classes = (SiglipTTRegForImageClassification,)
    config_class = SiglipTTRegConfig


class Siglip2TTRegForImageClassificationTest(_Classifier, _Siglip2, unittest.TestCase):
    all_model_classes = (Siglip2TTRegForImageClassification,)
    config_class = Siglip2TTRegConfig


class _Backbone(backbone_common.BackboneTesterMixin):
    """transformers' backbone tests, with registers (its Dinov2 and DINOv3 backbone tests mirrored)."""

    has_attentions = False  # as transformers' own: their attentions come from the common model tests
    num_test_time_registers = 2

    def setUp(self):
        self.model_tester = TTRegModelTester(
            self, self.config_class, self.num_test_time_registers, self.register_neurons, **self.config
        )


class Dinov2TTRegBackboneTest(_Backbone, unittest.TestCase):
    all_model_classes = (Dinov2TTRegBackbone,)
    config_class = Dinov2TTRegConfig
    config = _Dinov2.config
    register_neurons = _Dinov2.register_neurons


class DINOv3ViTTTRegBackboneTest(_Backbone, unittest.TestCase):
    all_model_classes = (DINOv3ViTTTRegBackbone,)
    config_class = DINOv3ViTTTRegConfig
    config = _DINOv3.config
    register_neurons = _DINOv3.register_neurons
