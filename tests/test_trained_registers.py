"""A checkpoint with trained registers is refused by the classes that would drop them (issue #26.5)."""

import pytest
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from ttreg_hf import Dinov2TTRegBackbone, Dinov2TTRegForImageClassification, Dinov2TTRegModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)


@pytest.mark.parametrize("model_class", [Dinov2TTRegModel, Dinov2TTRegBackbone, Dinov2TTRegForImageClassification])
def test_a_dinov2_with_registers_checkpoint_is_refused_naming_the_class_that_keeps_them(model_class, tmp_path):
    torch.manual_seed(0)
    parent = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=4))
    torch.nn.init.normal_(parent.embeddings.register_tokens)  # "trained" registers, which Dinov2Model has no place for
    parent.save_pretrained(tmp_path)
    for arguments in ({"register_neurons": {1: [3]}}, {"num_test_time_registers": 0}):
        with pytest.raises(ValueError, match=r"drop its `embeddings.register_tokens`.*Dinov2WithRegistersModel"):
            model_class.from_pretrained(tmp_path, **arguments)
