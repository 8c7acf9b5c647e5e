"""An index knows where it applies: another checkpoint id, an image size far from its own, or other weights warn once
with both values (`RegisterIndexMismatchWarning`); the provenance is a config field, saved and restored with it."""

import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import StrictDataclassError

from ttreg_hf import (
    Dinov2TTRegConfig,
    Dinov2TTRegModel,
    RegisterIndexMismatchWarning,
    RegisterNeuronIndex,
)
from ttreg_hf.analysis.interventions import with_register_neurons
from ttreg_hf.errors import TTRegValueError
from ttreg_hf.index import find_shipped_index, weights_fingerprint

from support import save_as_parent_checkpoint, tiny_dinov2_config

pytest_plugins = ["fake_hub"]  # its `hub` fixture
pytestmark = pytest.mark.filterwarnings("ignore::ttreg_hf.modeling.registers.RegisterEditOffWarning")


def index_for_tiny(**changes) -> RegisterNeuronIndex:
    """An index for `tiny_dinov2_config` (3 layers, MLP width 128, patch 14, 56 px)."""
    fields = dict(neurons={1: [3, 70]}, num_layers=3, mlp_width=128, checkpoints={"hf": "me/tiny"}, image_size=56)
    return RegisterNeuronIndex(**{**fields, **changes})


def mismatch_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RegisterIndexMismatchWarning)]


def test_another_checkpoint_id_warns_once_with_both():
    config = tiny_dinov2_config(register_neurons=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        config.attach_register_neurons(index_for_tiny(), checkpoint="me/tiny")  # its own: quiet
        config.attach_register_neurons(index_for_tiny(checkpoints={}), checkpoint="me/other")  # records none: quiet
        assert mismatch_warnings(record) == []
        for _ in range(2):
            config.attach_register_neurons(index_for_tiny(), checkpoint="me/other")
    [message] = mismatch_warnings(record)
    assert "found for me/tiny, not for 'me/other'" in message


def test_a_local_folder_of_the_checkpoint_is_the_checkpoint(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegisterIndexMismatchWarning)
        tiny_dinov2_config(register_neurons=None).attach_register_neurons(index_for_tiny(), checkpoint=str(folder))


def test_a_snapshot_folder_of_the_hub_cache_is_its_repo_id(hub, tmp_path):
    """A model loaded from the Hub cache's folder of ``me/tiny`` (``models--me--tiny/snapshots/<commit>``, where
    `snapshot_download` puts it): the index found for ``me/tiny`` is its own there, and not ``other/tiny``'s."""
    parent = save_as_parent_checkpoint(Dinov2TTRegModel(tiny_dinov2_config(register_neurons=None)), tmp_path / "p")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for repo in ("me/tiny", "other/tiny"):
            parent.push_to_hub(repo)
            snapshot = Path(hf_hub_download(repo, "config.json")).parent
            hf_hub_download(repo, "model.safetensors")
            assert snapshot.parent.parent.name == f"models--{repo.replace('/', '--')}"
            Dinov2TTRegModel.from_pretrained(snapshot, register_neurons=index_for_tiny())
            if repo == "me/tiny":
                assert mismatch_warnings(record) == []
    [message] = mismatch_warnings(record)
    assert "found for me/tiny, not for" in message and "models--other--tiny" in message


def test_an_index_for_one_repo_id_warns_on_another_repo_id_and_not_on_its_own(hub, tmp_path):
    """By repo id, through the Hub (`fake_hub`): the same tiny DINOv2 under ``me/tiny`` and ``other/tiny``, loaded with
    an index found for ``me/tiny`` by `from_pretrained` and upgraded in place by `to_test_time_registers` (which reads
    the model's ``name_or_path``). Same name, other owner: other weights as far as the index knows."""
    from transformers import Dinov2ForImageClassification

    from ttreg_hf import to_test_time_registers

    parent = save_as_parent_checkpoint(Dinov2TTRegModel(tiny_dinov2_config(register_neurons=None)), tmp_path / "p")
    classifier = Dinov2ForImageClassification(parent.config)
    for repo in ("me/tiny", "other/tiny"):
        parent.push_to_hub(repo)
        classifier.push_to_hub(f"{repo}-classifier")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for owner in ("me", "other"):
            Dinov2TTRegModel.from_pretrained(f"{owner}/tiny", register_neurons=index_for_tiny())
            loaded = Dinov2ForImageClassification.from_pretrained(f"{owner}/tiny-classifier")
            to_test_time_registers(loaded, index_for_tiny(checkpoints={"hf": "me/tiny-classifier"}))
            if owner == "me":
                assert mismatch_warnings(record) == []  # its own id: quiet
    messages = mismatch_warnings(record)
    assert len(messages) == 2
    assert "found for me/tiny, not for 'other/tiny'" in messages[0]
    assert "found for me/tiny-classifier, not for 'other/tiny-classifier'" in messages[1]


def test_the_readme_default_is_quiet_the_shipped_index_records_no_image_size():
    shipped = find_shipped_index("dinov2_vitl14")
    assert shipped.provenance == {
        "image_size": None,  # the authors did not state it: no size check, whatever the size
        "checkpoints": {"hf": "facebook/dinov2-large", "hub": "dinov2_vitl14"},
        "weights_fingerprint": None,
    }
    config = Dinov2TTRegConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, register_neurons=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegisterIndexMismatchWarning)
        for checkpoint in ("facebook/dinov2-large", "dinov2_vitl14", "vit_large_patch14_dinov2"):  # HF, hub, timm
            config.attach_register_neurons(None, checkpoint=checkpoint)
    assert config.register_index_provenance == shipped.provenance and config.register_index_found_at is None


@pytest.mark.parametrize(
    ("found_at", "runs_at", "warns"), [(56, 56, False), (168, 56, True), (56, 168, True), (84, 56, False)]
)
def test_an_image_far_from_the_index_size_warns_once_with_both(found_at, runs_at, warns):
    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=None, image_size=56)).eval()
    model.set_register_neurons(index_for_tiny(image_size=found_at))
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("default")
        for _ in range(3):
            model(torch.randn(2, 3, runs_at, runs_at))
    messages = mismatch_warnings(record)
    assert len(messages) == (1 if warns else 0)  # once, though two layers are edited and three forwards run
    if warns:
        side = runs_at // 14
        assert (
            f"found at {found_at} px; this model runs at about {runs_at} px ({side * side} patches of 14 px)"
            in messages[0]
        )


@pytest.mark.parametrize("family", ["open_clip", "timm"])
@pytest.mark.parametrize(("found_at", "warns"), [(32, False), (224, True)])
def test_open_clip_and_timm_towers_check_the_image_size_too(family, found_at, warns):
    """Their `TestTimeRegisterConfig` gets the tower's patch size, so the index's image size is checked (32 px runs)."""
    if family == "open_clip":
        from ttreg_hf.modeling.open_clip import OpenCLIPTTRegVisionTransformer

        tower = OpenCLIPTTRegVisionTransformer(
            image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_ratio=4.0, output_dim=16
        )
    else:
        from ttreg_hf.modeling.timm import TimmTTRegVisionTransformer

        tower = TimmTTRegVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    tower.set_register_neurons(index_for_tiny(image_size=found_at))
    assert tower.config.patch_size == 8
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("default")
        tower.eval()(torch.randn(1, 3, 32, 32))
    messages = mismatch_warnings(record)
    assert len(messages) == warns
    if warns:
        assert "found at 224 px; this model runs at about 32 px (16 patches of 8 px)" in messages[0]


@pytest.mark.usefixtures("fresh_compile_caches")
def test_the_size_check_is_not_traced_under_compile():
    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=None)).eval()
    model.set_register_neurons(index_for_tiny(image_size=560))  # 10x the input: eager would warn
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a warning inside would break the graph
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("default")
        compiled(torch.randn(1, 3, 56, 56))
    assert mismatch_warnings(record) == []


def test_the_provenance_is_saved_cleared_by_a_dict_and_restored_after_an_intervention(tmp_path):
    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=None)).eval()
    model.set_register_neurons(index_for_tiny(image_size=168))
    assert model.config.register_index_provenance == index_for_tiny(image_size=168).provenance
    model.save_pretrained(tmp_path / "saved")
    reloaded = Dinov2TTRegModel.from_pretrained(tmp_path / "saved")
    assert reloaded.config.register_index_provenance == model.config.register_index_provenance
    with pytest.warns(RegisterIndexMismatchWarning, match="found at 168 px"), torch.no_grad():
        reloaded(torch.randn(1, 3, 56, 56))  # the reloaded model still knows
    with with_register_neurons(model, {1: [4]}):
        assert model.config.register_index_provenance is None  # a plain dict records none
    assert model.config.register_index_provenance["image_size"] == 168
    model.set_register_neurons({1: [4]})
    assert model.config.register_index_provenance is None and model.config.register_index_found_at is None


@pytest.mark.parametrize(
    "provenance",
    [{"image_size": "56"}, {"image_size": 0}, {"checkpoints": ["x"]}, {"weights_fingerprint": 1}, {"other": 1}],
)
def test_a_hostile_provenance_in_a_config_is_refused(provenance):
    model = Dinov2TTRegModel(tiny_dinov2_config())
    with pytest.raises(TTRegValueError, match="register_index_provenance must be null or a mapping"):
        model.config.register_index_provenance = provenance  # refused at write time, nothing changed
    assert model.config.register_index_provenance is None
    with pytest.raises(StrictDataclassError, match="register_index_provenance"):
        model.config.register_index_provenance = [56]  # the field's type, checked on assignment


def test_other_weights_warn_once_where_they_are_loaded(tmp_path):
    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=None)).eval()
    own = index_for_tiny(details={"weights_fingerprint": weights_fingerprint(model)})
    other = index_for_tiny(details={"weights_fingerprint": "0123456789abcdef"})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's own: once per message and place, no state of ours
        model.set_register_neurons(own)
        assert mismatch_warnings(record) == []
        for _ in range(2):
            model.set_register_neurons(other)  # the same message from the same place: once
        model.save_pretrained(tmp_path / "saved")
        Dinov2TTRegModel.from_pretrained(tmp_path / "saved")  # from_pretrained checks once the weights are in
        model.to(torch.bfloat16).set_register_neurons(other)  # another dtype cannot be compared: not checked
    messages = mismatch_warnings(record)
    assert len(messages) == 2 and messages[0] == messages[1]
    fingerprint = own.details["weights_fingerprint"]
    assert f"this model's fingerprint is {fingerprint}, the index's 0123456789abcdef" in messages[0]
