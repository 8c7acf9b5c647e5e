"""Register-neuron index files: schema, validation and the shipped DINOv2 ViT-L/14 index."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ttreg_hf import RegisterNeuronIndex, RegisterNeuronIndexError, find_shipped_index, load_index, shipped_indices
from ttreg_hf.index import INDEX_FILENAME, METADATA_KEY

from support import run_python

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
        neurons={"3": [5, 1]},
        num_layers=4,
        mlp_width=8,
        semantics="paper",
        checkpoints={"hf": "me/model"},
        image_size=224,
        source="test",
        details={"threshold": 12.5},
    )
    assert RegisterNeuronIndex.load(index.save(tmp_path / "i.safetensors")) == index
    assert index.neurons == {3: (5, 1)}


def write_metadata(path, metadata):
    save_file({}, str(path), metadata={"format": "pt", **metadata})
    return path


VALID = {"schema_version": 1, "neurons": {"1": [3]}, "num_layers": 2, "mlp_width": 8}


def with_fields(**changes):
    """The JSON of `VALID` with fields changed (a value of `...` removes the field)."""
    return json.dumps({k: v for k, v in {**VALID, **changes}.items() if v is not ...})


def nested(depth):
    return "[" * depth + "]" * depth


HOSTILE_INDICES = {  # name: (the JSON text in the file's metadata, what the one-line error must say)
    "not json": ("{not json", "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "a list": ("[1, 2]", "must be a JSON object.*list"),
    "a string": ('"index"', "must be a JSON object.*str"),
    "null": ("null", "must be a JSON object.*NoneType"),
    "nested past the recursion limit": (nested(100_000), "not valid JSON"),
    "int literal over 4300 digits": (
        with_fields(num_layers=0).replace('"num_layers": 0', '"num_layers": ' + "9" * 5000),
        "not valid JSON",
    ),
    "over the size limit": (with_fields(source="x" * 1_100_000), "over the 1000000"),
    "repeated JSON key": (
        '{"schema_version": 1, "neurons": {"1": [3], "1": [5]}, "num_layers": 2, "mlp_width": 8}',
        r"keys \['1'\] are given twice",
    ),
    "no schema version": (with_fields(schema_version=...), "'schema_version' is None"),
    "schema version 2": (with_fields(schema_version=2), "'schema_version' is 2 .*reads schema version 1"),
    "schema version as a string": (with_fields(schema_version="1"), "'schema_version' is '1' \\(str\\)"),
    "schema version as a float": (with_fields(schema_version=1.0), "'schema_version' is 1.0 \\(float\\)"),
    "schema version as a bool": (with_fields(schema_version=True), "'schema_version' is True \\(bool\\)"),
    "schema version as a list": (with_fields(schema_version=[1]), "'schema_version' is \\[1\\]"),
    "no neurons": (with_fields(neurons=...), r"fields \['neurons'\] are missing"),
    "no num_layers": (with_fields(num_layers=...), r"fields \['num_layers'\] are missing"),
    "no mlp_width": (with_fields(mlp_width=...), r"fields \['mlp_width'\] are missing"),
    "unknown field": (with_fields(colour=1), r"fields \['colour'\] are unknown"),
    "neurons as a list": (with_fields(neurons=[[1, 3]]), "must be a mapping.*list"),
    "neurons as a string": (with_fields(neurons="1:3"), "must be a mapping.*str"),
    "neurons as null": (with_fields(neurons=None), "must be a mapping.*NoneType"),
    "neuron ids as an int": (with_fields(neurons={"1": 3}), "lists of int neurons.*3 \\(int\\)"),
    "neuron ids as a string": (with_fields(neurons={"1": "3"}), "lists of int neurons"),
    "neuron ids as a mapping": (with_fields(neurons={"1": {"3": 1}}), "lists of int neurons"),
    "float neuron id": (with_fields(neurons={"1": [3.0]}), "lists of int neurons.*3.0"),
    "bool neuron id": (with_fields(neurons={"1": [True]}), "lists of int neurons.*True"),
    "negative neuron id": (with_fields(neurons={"1": [-1]}), "lists of int neurons.*-1"),
    "nested neuron id": (with_fields(neurons={"1": [[3]]}), "lists of int neurons"),
    "null neuron id": (with_fields(neurons={"1": [None]}), "lists of int neurons"),
    "neuron past the MLP": (with_fields(neurons={"1": [8]}), r"\[8\] in layer 1 are out of range: the MLP has 8"),
    "neuron twice": (with_fields(neurons={"1": [2, 2]}), "lists a neuron twice"),
    "Arabic-Indic digit as a layer": (with_fields(neurons={"\u0661": [3]}), "int layers.*'\u0661'"),
    "superscript digit as a layer": (with_fields(neurons={"\u00b2": [3]}), "int layers.*'\u00b2'"),
    "fullwidth digit as a layer": (with_fields(neurons={"\uff11": [3]}), "int layers"),
    "negative layer": (with_fields(neurons={"-1": [3]}), "int layers.*'-1'"),
    "float layer": (with_fields(neurons={"1.0": [3]}), "int layers.*'1.0'"),
    "padded layer": (with_fields(neurons={" 1": [3]}), "int layers"),
    "empty layer": (with_fields(neurons={"": [3]}), "int layers"),
    "hex layer": (with_fields(neurons={"0x1": [3]}), "int layers"),
    "5000-digit layer": (with_fields(neurons={"9" * 5000: [3]}), "int layers.*5002 characters"),
    "layer past the model": (with_fields(neurons={"2": [3]}), "layer 2 is out of range: the model has 2 layers"),
    "layer as 1 and 01": (with_fields(neurons={"1": [3], "01": [5]}), "layer 1 is given twice \\(as '1' and '01'\\)"),
    "num_layers as a string": (with_fields(num_layers="2"), "'num_layers' must be an int >= 1.*'2' \\(str\\)"),
    "num_layers as a float": (with_fields(num_layers=2.0), "'num_layers' must be an int >= 1.*float"),
    "num_layers as a bool": (with_fields(num_layers=True), "'num_layers' must be an int >= 1.*bool"),
    "num_layers as NaN": (with_fields(num_layers=float("nan")), "'num_layers' must be an int >= 1.*nan"),
    "num_layers zero": (with_fields(num_layers=0, neurons={}), "'num_layers' must be an int >= 1.*0 \\(int\\)"),
    "num_layers negative": (with_fields(num_layers=-2), "'num_layers' must be an int >= 1"),
    "num_layers null": (with_fields(num_layers=None), "'num_layers' must be an int >= 1"),
    "mlp_width as a float": (with_fields(mlp_width=8.5), "'mlp_width' must be an int >= 1"),
    "mlp_width as a bool": (with_fields(mlp_width=False), "'mlp_width' must be an int >= 1"),
    "semantics as an int": (with_fields(semantics=1), "'semantics' must be one of"),
    "semantics unknown": (with_fields(semantics="authors"), "'semantics' must be one of.*'authors'"),
    "semantics as a list": (with_fields(semantics=["paper"]), "'semantics' must be one of"),
    "checkpoints as a list": (with_fields(checkpoints=["me/model"]), "'checkpoints' must be a mapping of strings"),
    "checkpoints as a string": (with_fields(checkpoints="me/model"), "'checkpoints' must be a mapping of strings"),
    "checkpoint id as an int": (with_fields(checkpoints={"hf": 1}), "'checkpoints' must be a mapping of strings"),
    "image_size as a string": (with_fields(image_size="224"), "'image_size' must be null or an int >= 1"),
    "image_size as a float": (with_fields(image_size=224.0), "'image_size' must be null or an int >= 1"),
    "image_size zero": (with_fields(image_size=0), "'image_size' must be null or an int >= 1"),
    "image_size as a bool": (with_fields(image_size=True), "'image_size' must be null or an int >= 1"),
    "source as an int": (with_fields(source=1), "'source' must be a string"),
    "source as null": (with_fields(source=None), "'source' must be a string"),
    "details as a list": (with_fields(details=[1]), "'details' must be a mapping"),
    "details as a string": (with_fields(details="x"), "'details' must be a mapping"),
    "details nested 40 deep": (
        with_fields(details={"a": json.loads(nested(40))}),
        "'details' must be a mapping nested at most 32",
    ),
}


@pytest.mark.parametrize(("payload", "message"), HOSTILE_INDICES.values(), ids=HOSTILE_INDICES.keys())
def test_hostile_index_files_are_one_clear_error(tmp_path, payload, message):
    path = write_metadata(tmp_path / "bad.safetensors", {METADATA_KEY: payload})
    with pytest.raises(RegisterNeuronIndexError, match=f"index in {path} is corrupt\\. .*{message}") as error:
        RegisterNeuronIndex.load(path)  # any other exception type fails the test
    assert "\n" not in str(error.value) and len(str(error.value)) < 600
    assert "find-neurons" in str(error.value)  # and the fix


def test_the_valid_base_of_the_hostile_files_loads(tmp_path):
    index = RegisterNeuronIndex.load(write_metadata(tmp_path / "ok.safetensors", {METADATA_KEY: json.dumps(VALID)}))
    assert (index.neurons, index.num_layers, index.mlp_width) == ({1: (3,)}, 2, 8)


def test_damaged_files_are_one_clear_error(tmp_path):
    good = RegisterNeuronIndex({1: [3]}, num_layers=2, mlp_width=8).save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "header only": data[:8],
        "header length past the end": (10**6).to_bytes(8, "little") + data[8:],
        "empty": b"",
        "png": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "pickle": b"\x80\x04\x95" + bytes(32),
        "bit flip in the header": data[:20] + bytes([data[20] ^ 0xFF]) + data[21:],
    }
    for name, content in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(RegisterNeuronIndexError) as error:
            RegisterNeuronIndex.load(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value), name
    with pytest.raises(RegisterNeuronIndexError, match="No register-neuron index at"):
        RegisterNeuronIndex.load(tmp_path)  # a folder


@pytest.mark.parametrize("spec", ["a\0b.safetensors", "x" * 5000, "missing.safetensors"])
def test_unusable_paths_are_one_clear_error(spec):
    with pytest.raises(RegisterNeuronIndexError, match="no such file or folder|not an existing file or folder, not a"):
        load_index(spec)


def test_an_index_spec_of_another_type_is_a_type_error():
    with pytest.raises(TypeError, match="register_neurons must be a dict.*got 17 \\(int\\)"):
        load_index(17)


@pytest.mark.parametrize(
    ("neurons", "message"),
    [
        ({1: [3], "1": [5]}, r"layer 1 is given twice \(as 1 and '1'\)"),
        ({"1": [3], "01": [5]}, r"layer 1 is given twice \(as '1' and '01'\)"),
        ({1: [], "1": [5]}, "layer 1 is given twice"),  # an empty list drops no neuron, but is still a conflict
        ({-1: [3]}, "int layers"),
        ({"\u0661": [3]}, "int layers"),
        ([(1, [3])], "must be a mapping"),
        ({1: 3}, "lists of int neurons"),
        ({1: [-3]}, "lists of int neurons"),
    ],
)
def test_neurons_that_would_merge_or_mislead_are_refused(neurons, message):
    with pytest.raises(RegisterNeuronIndexError, match=message):
        load_index(neurons) if isinstance(neurons, dict) else RegisterNeuronIndex(neurons, num_layers=2, mlp_width=8)


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    assert load_index({np.int64(1): [np.int64(3), 4]}) == {1: (3, 4)}
    assert all(type(n) is int for n in load_index({np.int64(1): [np.int64(3)]})[1])


def test_files_that_are_not_indices(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(RegisterNeuronIndexError, match="not a readable safetensors file"):
        RegisterNeuronIndex.load(garbage)
    with pytest.raises(RegisterNeuronIndexError, match="holds no register-neuron index"):
        RegisterNeuronIndex.load(write_metadata(tmp_path / "weights.safetensors", {}))
    with pytest.raises(RegisterNeuronIndexError, match="No register-neuron index at"):
        RegisterNeuronIndex.load(tmp_path / "missing.safetensors")
    with pytest.raises(RegisterNeuronIndexError, match="not an existing file or folder, not a shipped index"):
        load_index("dinov2_vitx99")


def test_check_fits_names_the_checkpoint():
    index = load_index("dinov2_vitl14")
    index.check_fits(24, 4096)
    with pytest.raises(RegisterNeuronIndexError, match="made for facebook/dinov2-large.*12 layers and MLP width 1536"):
        index.check_fits(12, 1536)


HOSTILE_SPECS = {  # a string that is no local file, no shipped name and no usable Hub location: what the error says
    "dot-dot in the path": (
        "a/b/c/../d.safetensors",
        r"'c/\.\./d\.safetensors' is not a file name inside a repository",
    ),
    "dot in the path": ("a/b/./c.safetensors", "is not a file name inside a repository"),
    "empty path segment": ("a/b/c//d.safetensors", "not a Hub repo id .*empty segments"),
    "owner only": ("owner/", "not a Hub repo id .*'namespace/name'"),
    "an at sign": ("@", "not a Hub repo id"),
    "empty revision": ("owner/repo@", "Empty revision after .@."),
    "empty revision before a path": ("owner/repo@/x.safetensors", "Empty revision after .@."),
    "revision after the path": ("owner/repo/x.safetensors@v1", "the revision goes right after the repo id"),
    "a dataset": ("datasets/owner/repo", "names a dataset; an index lives in a model repository"),
    "double dash": ("owner--x/repo", "Cannot have -- or \\.\\."),
    "a space": ("owner/my repo", "not a Hub repo id"),
    "relative path": (
        "../missing/index.safetensors",
        "No register-neuron index at ../missing/index.safetensors: no such",
    ),
    "missing file in a folder": ("runs/index.safetensors", "there is no file runs/index.safetensors"),
    "a NUL byte": ("owner/re\0po", "no such file or folder"),
}


@pytest.mark.parametrize(("spec", "message"), HOSTILE_SPECS.values(), ids=HOSTILE_SPECS.keys())
def test_hostile_index_specs_are_one_clear_error_before_any_download(spec, message):
    with pytest.raises(RegisterNeuronIndexError, match=message) as error:
        load_index(spec)
    text = str(error.value)
    assert "\n" not in text and "Hugging Face cache" not in text  # refused before asking the Hub (or its cache)
    assert error.value.__cause__ is None


def test_a_local_path_wins_over_a_repo_id_and_hf_uris_mean_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = RegisterNeuronIndex({1: [3]}, num_layers=2, mlp_width=8)
    index.save(tmp_path / "owner" / "repo" / INDEX_FILENAME)
    other = RegisterNeuronIndex({1: [4]}, num_layers=2, mlp_width=8)
    other.save(tmp_path / "owner" / "repo" / "run.safetensors")
    assert load_index("owner/repo") == index == RegisterNeuronIndex.from_pretrained("owner/repo")  # a folder
    assert load_index("owner/repo/run.safetensors") == other  # a file
    assert RegisterNeuronIndex.from_pretrained(Path("owner/repo"), filename="run.safetensors") == other
    with pytest.raises(RegisterNeuronIndexError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_index("hf://owner/repo")  # the Hub, whatever is on disk (tests run offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        RegisterNeuronIndexError, match=f"No register-neuron index in empty: it holds no {INDEX_FILENAME}"
    ):
        load_index("empty")  # a folder
    with pytest.raises(RegisterNeuronIndexError, match="no such file or folder"):
        load_index(Path("owner/nothing"))  # a Path is never a repo id


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"pretrained_index_name_or_path": "not a repo"}, "neither a folder nor a Hub repo id"),
        ({"pretrained_index_name_or_path": "solo"}, "neither a folder nor a Hub repo id 'owner/name'"),
        ({"pretrained_index_name_or_path": "owner/repo", "revision": ""}, "revision must be a branch, tag or commit"),
        ({"pretrained_index_name_or_path": "owner/repo", "filename": "../x.safetensors"}, "not a file name inside"),
        ({"pretrained_index_name_or_path": "owner/repo", "filename": "/etc/x"}, "not a file name inside"),
    ],
)
def test_from_pretrained_refuses_bad_arguments_clearly(arguments, message):
    with pytest.raises(RegisterNeuronIndexError, match=message):
        RegisterNeuronIndex.from_pretrained(**arguments)


def test_offline_and_not_cached_is_one_line_that_says_how_to_fix_it():
    with pytest.raises(RegisterNeuronIndexError) as error:
        load_index("someone/some-index@v1")
    assert str(error.value) == (
        f"The {INDEX_FILENAME} of Hub repository 'someone/some-index' at revision 'v1' is not in the Hugging Face "
        f"cache and HF_HUB_OFFLINE is set: download it once online (`hf download someone/some-index {INDEX_FILENAME} "
        "--revision v1`), or pass a local index file."
    )


def test_a_safetensors_file_written_twice_is_the_same_bytes(tmp_path):
    """safetensors lists the metadata in an order that changes from process to process; ours sorts it, so an unchanged
    export uploads nothing new. Written in two fresh processes, the files are equal and still read back."""
    code = (
        "import sys, torch; from ttreg_hf.index import write_safetensors; "
        "write_safetensors({'w': torch.arange(6.0)}, sys.argv[1], {f'key{i}': f'value {i} é' for i in range(8)})"
    )
    paths = [tmp_path / f"{attempt}.safetensors" for attempt in range(2)]
    for path in paths:
        assert run_python(code, str(path)).returncode == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with safe_open(paths[0], "pt") as file:
        assert file.metadata() == {f"key{i}": f"value {i} é" for i in range(8)}
        assert torch.equal(file.get_tensor("w"), torch.arange(6.0))
