"""Register-neuron index files: schema, validation and the shipped DINOv2 ViT-L/14 index."""

import json

import pytest
from safetensors.torch import save_file

from ttreg_hf import RegisterNeuronIndex, RegisterNeuronIndexError, find_shipped_index, load_index, shipped_indices
from ttreg_hf.index import METADATA_KEY

PUBLISHED_VITL14 = {  # nickjiang2378/test-time-registers @ 860df43, LARGE_REGISTER_NEURONS
    17: (884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031, 844, 944, 464),
    16: (2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465),
    15: (1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625),
    14: (2110, 1510, 1082, 2711, 2464, 147, 543, 581),
    13: (2400,),
    12: (3168,),
}


def test_the_shipped_vitl14_index_is_the_published_one():
    index = find_shipped_index("facebook/dinov2-large")
    assert index == find_shipped_index("dinov2_vitl14") == load_index("dinov2_vitl14")
    assert index.neurons == dict(sorted(PUBLISHED_VITL14.items()))
    assert index.num_neurons == 45 and (index.num_layers, index.mlp_width) == (24, 4096)
    assert index.semantics == "reference"
    assert "860df43" in index.source
    assert list(shipped_indices()) == ["dinov2_vitl14"]
    assert find_shipped_index("facebook/dinov2-small") is None


def test_round_trip_keeps_everything(tmp_path):
    index = RegisterNeuronIndex(
        neurons={"3": [5, 1]}, num_layers=4, mlp_width=8, semantics="paper", checkpoints={"hf": "me/model"},
        image_size=224, source="test", details={"threshold": 12.5},
    )
    assert RegisterNeuronIndex.load(index.save(tmp_path / "i.safetensors")) == index
    assert index.neurons == {3: (5, 1)}


def write_metadata(path, metadata):
    save_file({}, str(path), metadata={"format": "pt", **metadata})
    return path


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "corrupt"),
        (json.dumps({"neurons": {}}), "corrupt"),
        (json.dumps({"schema_version": 9, "neurons": {}}), "schema version 9"),
        (json.dumps({"schema_version": 1, "neurons": {"1": [3]}, "num_layers": 1, "mlp_width": 8}), "layer 1 is out of range"),
        (json.dumps({"schema_version": 1, "neurons": {"0": [8]}, "num_layers": 1, "mlp_width": 8}), "out of range"),
        (json.dumps({"schema_version": 1, "neurons": {"0": [2, 2]}, "num_layers": 1, "mlp_width": 8}), "twice"),
        (json.dumps({"schema_version": 1, "neurons": {}, "num_layers": 1, "mlp_width": 8, "colour": 1}), "corrupt"),
    ],
)
def test_corrupt_index_files_are_clear_errors(tmp_path, payload, message):
    path = write_metadata(tmp_path / "bad.safetensors", {METADATA_KEY: payload})
    with pytest.raises(RegisterNeuronIndexError, match=message):
        RegisterNeuronIndex.load(path)


def test_files_that_are_not_indices(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(RegisterNeuronIndexError, match="not a readable safetensors file"):
        RegisterNeuronIndex.load(garbage)
    with pytest.raises(RegisterNeuronIndexError, match="holds no register-neuron index"):
        RegisterNeuronIndex.load(write_metadata(tmp_path / "weights.safetensors", {}))
    with pytest.raises(RegisterNeuronIndexError, match="No register-neuron index at"):
        RegisterNeuronIndex.load(tmp_path / "missing.safetensors")
    with pytest.raises(RegisterNeuronIndexError, match="neither a file nor a shipped index"):
        load_index("dinov2_vitx99")


def test_check_fits_names_the_checkpoint():
    index = load_index("dinov2_vitl14")
    index.check_fits(24, 4096)
    with pytest.raises(RegisterNeuronIndexError, match="made for facebook/dinov2-large.*12 layers and MLP width 1536"):
        index.check_fits(12, 1536)
