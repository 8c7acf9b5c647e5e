"""Where a model's weights and index come from: a named checkpoint loaded from a local folder gets that folder's
weights, and an index made for one Hub repository warns when attached to another of the same name."""

import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from ttreg_hf import Dinov2TTRegModel, RegisterIndexMismatchWarning, RegisterNeuronIndex
from ttreg_hf.hub import load_tt_model
from ttreg_hf.modeling.dinov2_original import convert_original_state_dict, dinov2_config
from ttreg_hf.registry import transformers_families

from family_models import TINY
from support import save_as_parent_checkpoint
from upstream_dinov2 import random_original_state_dict

# the named checkpoints of the `transformers` families that load a Hub id (`weights=` a folder instead) -> family
TRANSFORMERS_CHECKPOINTS = {
    checkpoint.name: family.name
    for family in transformers_families()
    for checkpoint in family.checkpoints
    if isinstance(checkpoint.image_processor, str)  # a Hub id: the checkpoint is that repository's
}
# the upstream DINOv2 names (backbones and linear classifiers), whose `weights=` is a file in upstream's layout
UPSTREAM_DINOV2_CHECKPOINTS = [
    checkpoint.name
    for family in transformers_families()
    for checkpoint in family.checkpoints
    if checkpoint.name not in TRANSFORMERS_CHECKPOINTS
]
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)  # the architecture's other fields kept


def test_every_named_transformers_checkpoint_is_loaded_from_a_folder_or_a_file_below():
    named = {checkpoint.name for family in transformers_families() for checkpoint in family.checkpoints}
    assert named == {*TRANSFORMERS_CHECKPOINTS, *UPSTREAM_DINOV2_CHECKPOINTS}
    assert set(TRANSFORMERS_CHECKPOINTS.values()) == {family.name for family in transformers_families()} - {"dinov2"}
    assert all(name.startswith("dinov2_") for name in UPSTREAM_DINOV2_CHECKPOINTS)


@pytest.mark.parametrize("name", TRANSFORMERS_CHECKPOINTS)
def test_a_named_checkpoint_with_weights_from_a_folder_loads_that_folders_weights(name, tmp_path):
    """``load_tt_model(name, pretrained=False, weights=FOLDER)``: ``pretrained=False`` means "not from the Hub", not
    "random": every parameter is the folder's."""
    torch.manual_seed(0)
    saved = save_as_parent_checkpoint(TINY[TRANSFORMERS_CHECKPOINTS[name]](), tmp_path).state_dict()
    model = load_tt_model(name, pretrained=False, weights=tmp_path, num_test_time_registers=0)
    parameters = dict(model.named_parameters())
    assert parameters and parameters.keys() <= saved.keys()
    for key, parameter in parameters.items():
        assert torch.equal(parameter, saved[key]), key


@pytest.mark.parametrize("name", UPSTREAM_DINOV2_CHECKPOINTS)
def test_an_upstream_dinov2_name_with_pretrained_false_loads_its_weights_file(name, tmp_path):
    """The same rule for a name whose ``weights=`` is a file in upstream's layout: the file's weights, as with
    ``pretrained=True``; each name's architecture (ViT-g's SwiGLU MLPs too), made small by the config fields given."""
    arch = name.removeprefix("dinov2_").removesuffix("_lc")
    config = dinov2_config(arch, register_neurons={}, **TINY_DINOV2)
    swiglu_width = config.mlp_width if config.use_swiglu_ffn else None
    original = random_original_state_dict(config.hidden_size, 2, config.patch_size, 37, swiglu_width=swiglu_width)
    save_file(original, tmp_path / "weights.safetensors")
    model = load_tt_model(
        name, pretrained=False, weights=tmp_path / "weights.safetensors", register_neurons={}, **TINY_DINOV2
    )
    assert torch.equal(model.embeddings.cls_token, original["cls_token"])
    converted = convert_original_state_dict(original, config)
    parameters = dict(model.named_parameters())
    assert parameters.keys() == converted.keys()
    for key, parameter in parameters.items():
        assert torch.equal(parameter, converted[key]), key


def _cached(cache_dir, repo_id: str, model: torch.nn.Module) -> None:
    """``model`` as the Hub cache holds ``repo_id`` (offline, `from_pretrained(repo_id, cache_dir=...)` reads it)."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    model.save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


def test_an_index_made_for_one_repository_warns_on_another_of_the_same_name(tmp_path):
    """An index found on ``me/tiny``: loading ``me/tiny`` or a local folder ``tiny`` is quiet; ``other/tiny`` is
    another checkpoint, although its name is the same, and warns with both ids."""
    parent = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28))
    for repo_id in ("me/tiny", "other/tiny"):
        _cached(tmp_path, repo_id, parent)
    parent.save_pretrained(tmp_path / "folder" / "tiny")
    index = RegisterNeuronIndex(neurons={1: [3]}, num_layers=3, mlp_width=128, checkpoints={"hf": "me/tiny"})
    index_file = index.save(tmp_path / "index.safetensors")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for source in ("me/tiny", tmp_path / "folder" / "tiny", "other/tiny"):
            Dinov2TTRegModel.from_pretrained(source, cache_dir=tmp_path, register_neurons=index_file)
    messages = [str(w.message) for w in record if issubclass(w.category, RegisterIndexMismatchWarning)]
    assert len(messages) == 1 and "found for me/tiny, not for 'other/tiny'" in messages[0]
