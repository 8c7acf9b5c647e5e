"""ViTTTRegModel and DeiTTTRegModel beyond the shared suites (`test_family_suite.py`): clear errors, the Hub names
and DeiT's classifier checkpoints."""

import pytest
import torch
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

from ttreg_hf import DeiTTTRegModel, RegisterNeuronIndexError, ViTTTRegModel
from ttreg_hf.hub import load_tt_model

from support import SPECS, VIT_ARCH

families = pytest.mark.parametrize("family", ["vit", "deit"])


@pytest.fixture
def images():
    return SPECS["vit"].images()


@families
def test_user_mistakes_are_clear_errors(family):
    model = SPECS[family].model()
    with pytest.raises(TypeError, match="floating-point.*image processor"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        model(torch.randn(1, 3, 36, 32), interpolate_pos_encoding=True)
    with pytest.raises(Exception, match=r"\[128\] in layer 1 are out of range"):
        SPECS[family].config(register_neurons={1: [128]})


@pytest.mark.parametrize(
    ("name", "model_class", "has_pooler"),
    [("vit_base_patch16_224_in21k", ViTTTRegModel, True), ("deit_base_distilled_patch16_224", DeiTTTRegModel, False)],
)
def test_hub_names_build_random_weights_offline(name, model_class, has_pooler):
    with torch.device("meta"):  # the architecture, without spending time on 86M random weights
        model = load_tt_model(name, pretrained=False, register_neurons={11: [3071]})
        with pytest.raises(RegisterNeuronIndexError, match=f"No register-neuron index is known for '{name}'"):
            load_tt_model(name, pretrained=False)
    assert type(model) is model_class
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.mlp_width) == (12, 768, 3072)
    assert model.layers[11].mlp.register_edit.neuron_ids == (3071,)
    assert (model.pooler is not None) == has_pooler


def test_hub_loader_reads_a_local_classifier_checkpoint_without_a_pooler(tmp_path, images):
    """DeiT's hub checkpoints are classifiers: the model is built without the pooler they do not hold."""
    classifier = DeiTForImageClassificationWithTeacher(DeiTConfig(**VIT_ARCH)).eval()
    classifier.save_pretrained(tmp_path)
    model = load_tt_model("deit_base_distilled_patch16_224", weights=tmp_path, num_test_time_registers=0)
    assert model.pooler is None
    with torch.no_grad():
        assert torch.equal(model(images).last_hidden_state, classifier.deit(images).last_hidden_state)
