"""Registration with `transformers`: each family's declared Auto classes are where its parents stand, and a family
registered later (`register_family`) reaches the Auto classes too."""

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel
from transformers.models.auto import modeling_auto

from ttreg_hf import ViTTTRegConfig, ViTTTRegModel
from ttreg_hf.family import Family
from ttreg_hf.registry import register_family, transformers_families

AUTO_CLASSES = ["AutoBackbone", *(name for name in modeling_auto.__all__ if name.startswith("AutoModel"))]


def where_parents_stand(family: Family) -> set[tuple[str, tuple[type, ...]]]:
    """``(auto class, our classes)`` wherever `transformers` maps a parent config to the family's parent classes:
    read from the Auto classes' mapping (a private attribute, read by this test only)."""
    ours = dict(zip(family.parents, family.model_classes))
    found = set()
    for auto_name in AUTO_CLASSES:
        for parent_config in {parent.config_class for parent in family.parents}:
            parents = getattr(transformers, auto_name)._model_mapping.get(parent_config, None)
            parents = parents if isinstance(parents, tuple) else (parents,)
            if parents != (None,) and all(parent in ours for parent in parents):
                found.add((auto_name, tuple(ours[parent] for parent in parents)))
    return found


@pytest.mark.parametrize("family", transformers_families(), ids=lambda family: family.name)
def test_declared_auto_classes_are_where_the_parents_stand(family):
    declared = {(name, classes if isinstance(classes, tuple) else (classes,)) for name, classes in family.auto_classes}
    assert declared == where_parents_stand(family)


@pytest.mark.parametrize("family", transformers_families(), ids=lambda family: family.name)
def test_the_auto_classes_build_ours_for_our_configs(family):
    for auto_name, classes in family.auto_classes:
        classes = classes if isinstance(classes, tuple) else (classes,)
        mapped = getattr(transformers, auto_name)._model_mapping[classes[0].config_class]
        assert (mapped if isinstance(mapped, tuple) else (mapped,)) == classes
        assert AutoConfig.for_model(classes[0].config_class.model_type).__class__ is classes[0].config_class


class MyViTConfig(ViTTTRegConfig):
    model_type = "my_vit_tt_reg"


class MyViTModel(ViTTTRegModel):
    config_class = MyViTConfig


def test_a_family_registered_later_reaches_the_auto_classes(monkeypatch, tmp_path):
    from ttreg_hf.configs import registers

    monkeypatch.setattr("ttreg_hf.registry._REGISTERED", [])
    monkeypatch.setattr(registers, "ARCHITECTURES", dict(registers.ARCHITECTURES))
    register_family(Family("my_vit", (MyViTModel,), auto_classes=(("AutoModel", MyViTModel),)))
    config = MyViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, num_test_time_registers=0)  # fmt: skip
    model = MyViTModel(config)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is MyViTModel
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(pixels).last_hidden_state, model(pixels).last_hidden_state)
