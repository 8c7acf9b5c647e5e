"""Never silent, round three (issue #25) and errors by kind (#24.4): each test failed before its fix."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel, DepthAnythingConfig, DepthAnythingForDepthEstimation

from ttreg_cli import main
from ttreg_hf import Dinov2TTRegConfig, Dinov2TTRegModel, RegisterNeuronIndex, RegisterNeuronIndexError
from ttreg_hf.errors import TTRegError, TTRegTypeError, TTRegValueError
from ttreg_hf.hub import entry_points, load_tt_model

from support import tiny_dinov2_config, ttreg_in_a_fresh_process

pytestmark = pytest.mark.filterwarnings("ignore::ttreg_hf.modeling.registers.RegisterEditOffWarning")


def tiny_index(**changes) -> RegisterNeuronIndex:
    """An index for `tiny_dinov2_config` (3 layers, MLP width 128), found with the reference semantics."""
    fields = dict(neurons={1: [3, 70]}, num_layers=3, mlp_width=128, semantics="reference", image_size=56)
    return RegisterNeuronIndex(**{**fields, **changes})


@pytest.fixture
def index_file(tmp_path):
    return tiny_index().save(tmp_path / "index.safetensors")


# item 2: `register_neurons` takes the same forms everywhere, configs included


def test_a_config_takes_an_index_file_with_its_semantics_and_provenance(index_file):
    config = tiny_dinov2_config(register_neurons=index_file)  # a `Path`; a str below
    assert config.register_neurons == {"1": [3, 70]} and config.register_semantics == "reference"
    assert config.register_index_provenance == tiny_index().provenance
    given = tiny_dinov2_config(register_neurons=str(index_file), register_semantics="paper", num_hidden_layers=3)
    assert given.register_neurons == {"1": [3, 70]}
    explicit = tiny_dinov2_config(register_neurons=tiny_index(), register_index_provenance={"image_size": 99})
    assert explicit.register_index_provenance == {"image_size": 99}  # given beside it: kept
    written = tiny_dinov2_config(register_neurons={})
    written.register_neurons = str(index_file)  # a write to a built config: the file's settings come with it
    assert (written.register_neurons, written.register_semantics) == ({"1": [3, 70]}, "reference")
    assert Dinov2TTRegConfig.from_dict(written.to_dict()).register_neurons == {"1": [3, 70]}  # saved as the dict


def test_a_config_refuses_an_index_of_another_model(index_file):
    with pytest.raises(RegisterNeuronIndexError, match="3 layers, MLP width 128"):
        Dinov2TTRegConfig(register_neurons=index_file)  # the default config: 12 layers, MLP width 3072
    config = tiny_dinov2_config(register_neurons={})
    with pytest.raises(RegisterNeuronIndexError, match="3 layers, MLP width 4096"):
        config.register_neurons = RegisterNeuronIndex({1: [3]}, num_layers=3, mlp_width=4096)
    assert config.register_neurons == {}  # nothing written


def test_auto_model_takes_an_index_file_like_our_class(index_file, tmp_path):
    Dinov2TTRegModel(tiny_dinov2_config(register_neurons={})).save_pretrained(tmp_path / "saved")
    ours = Dinov2TTRegModel.from_pretrained(tmp_path / "saved", register_neurons=str(index_file))
    auto = AutoModel.from_pretrained(tmp_path / "saved", register_neurons=str(index_file))
    assert type(auto) is Dinov2TTRegModel
    assert auto.config.register_neurons == ours.config.register_neurons == {"1": [3, 70]}
    assert auto.config.register_semantics == ours.config.register_semantics == "reference"


def test_a_backbone_config_takes_an_index_file(index_file):
    backbone = tiny_dinov2_config(register_neurons=str(index_file), out_indices=[1, 3], reshape_hidden_states=False)
    model = DepthAnythingForDepthEstimation(DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=16))
    assert model.backbone.config.register_neurons == {"1": [3, 70]}
    from_dict = DepthAnythingConfig(backbone_config={**backbone.to_dict(), "register_neurons": str(index_file)})
    assert from_dict.backbone_config.register_neurons == {"1": [3, 70]}


# item 5: dtype honoured without pretrained weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_random_weights_are_built_in_the_dtype_asked_for(dtype):
    model = load_tt_model("dinov2_vits14", pretrained=False, dtype=dtype, num_test_time_registers=0)
    expected = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in model.parameters()} == {expected} and model.config.dtype == expected
    vit = load_tt_model("vit_base_patch16_224_in21k", pretrained=False, dtype=dtype, num_test_time_registers=0)
    assert {p.dtype for p in vit.parameters()} == {expected} and vit.config.dtype == expected


def test_the_dinov2_classifier_runs_in_the_dtype_asked_for():
    classifier = entry_points()["dinov2_vits14_tt_reg_lc"](
        pretrained=False, dtype=torch.bfloat16, num_test_time_registers=0
    )
    assert {p.dtype for p in classifier.parameters()} == {torch.bfloat16}
    assert classifier(torch.randn(1, 3, 28, 28, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dinov2_weights_are_loaded_in_the_dtype_asked_for(tmp_path):
    from safetensors.torch import save_file

    from upstream_dinov2 import random_original_state_dict

    original = random_original_state_dict(dim=384, depth=12, patch_size=14, table_side=37)  # ViT-S/14's shapes
    save_file(original, tmp_path / "weights.safetensors")
    model = load_tt_model(
        "dinov2_vits14", weights=tmp_path / "weights.safetensors", dtype=torch.bfloat16, num_test_time_registers=0
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.config.dtype == torch.bfloat16
    assert torch.equal(model.embeddings.cls_token, original["cls_token"].bfloat16())


@pytest.mark.parametrize("dtype", ["auto", "float33", 3, torch.int8])
def test_a_dtype_no_model_is_built_in_is_refused(dtype):
    with pytest.raises(TTRegValueError, match="dtype="):
        load_tt_model("dinov2_vits14", pretrained=False, dtype=dtype, num_test_time_registers=0)


# #24.4: errors by kind


def test_the_package_refusals_share_one_base_and_keep_their_old_types():
    from ttreg_hf.export import ExportError

    assert issubclass(RegisterNeuronIndexError, TTRegError) and issubclass(RegisterNeuronIndexError, ValueError)
    assert issubclass(ExportError, TTRegValueError)
    with pytest.raises(TTRegTypeError, match="did you mean 'num_test_time_registers'"):
        load_tt_model("dinov2_vits14", pretrained=False, num_test_time_register=0)
    with pytest.raises(TTRegValueError, match="num_test_time_registers must be >= 0"):
        tiny_dinov2_config().update_test_time_registers(num_test_time_registers=-1)


def test_a_bug_is_exit_1_with_its_traceback(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise ValueError("an internal invariant broke")  # not a refusal of the package: a bug

    monkeypatch.setattr("ttreg_cli.load_model", bug)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    with pytest.raises(ValueError, match="an internal invariant broke"):  # `python -m ttreg_cli`: exit 1
        main(["inspect", "planted", str(image), "--out", str(tmp_path / "r.png")])


def test_mismatch_warnings_follow_the_warnings_filters(index_file):
    """No process-wide memory of our own: Python's filters decide, so "always" shows every one."""
    config = tiny_dinov2_config(register_neurons={})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            config.attach_register_neurons(str(index_file), checkpoint="me/other")
    assert len(record) == 0  # the index records no checkpoint: it applies anywhere
    index = tiny_index(checkpoints={"hf": "me/tiny"})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            config.attach_register_neurons(index, checkpoint="me/other")
    assert len(record) == 2


# item 6 and item 1: the CLI's --device and --weights


def cli(argv, capsys) -> tuple[int, str]:
    status = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.err.strip()


def available(device: str) -> bool:
    """Whether this machine has ``device`` (a type it may have, with or without an index)."""
    kind, _, index = device.partition(":")
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator is not None and accelerator.type == kind and int(index or 0) < torch.accelerator.device_count()


@pytest.mark.parametrize("device", ["bogus", "", "cuda:7", "meta", "xpu", "mps", "hpu", "cuda"])
def test_a_device_that_is_not_there_is_refused_before_loading(device, monkeypatch, tmp_path, capsys):
    if available(device):
        pytest.skip(f"this machine has a {device}")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --device was checked")

    monkeypatch.setattr("ttreg_cli.load_model", no_loading)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    status, err = cli(["inspect", "planted", str(image), "--out", str(tmp_path / "r.png"), "--device", device], capsys)
    assert status == 2 and err.startswith(f"ttreg: error: --device {device}") and len(err.splitlines()) == 1
    assert len(err) < 400  # one line to read, not torch's list of every backend it was built with


def test_every_command_checks_its_device_before_loading_in_a_fresh_process(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    device = next(device for device in ("cuda", "mps", "hpu", "cuda:7") if not available(device))
    commands = [
        ["find-neurons", "planted", images, "--out", tmp_path / "i.safetensors"],
        ["inspect", "planted", images / "a.png", "--out", tmp_path / "r.png"],
        ["demo", "--out-dir", tmp_path / "demo"],
        ["evaluate", "planted", images, "--out-dir", tmp_path / "evaluation", "--no-figure"],
    ]
    for status, err in ttreg_in_a_fresh_process(*([*argv, "--device", device] for argv in commands)):
        assert status == 2 and err.startswith(f"ttreg: error: --device {device} is not on this machine"), err
        assert len(err.splitlines()) == 1 and "use cpu" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images"]  # nothing written


def test_every_command_refuses_weights_it_cannot_load_in_a_fresh_process(tmp_path):
    """Each kind of --weights no model loads, through each command that takes it: exit 2, one line, nothing written;
    export takes no --weights at all."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    arch = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16)
    DINOv3ViTModel(DINOv3ViTConfig(**arch, image_size=64)).save_pretrained(tmp_path / "dinov3")
    Dinov2TTRegModel(tiny_dinov2_config(register_neurons={})).save_pretrained(tmp_path / "dinov2")
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / "model.safetensors").write_bytes(b"")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors header")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    out = tmp_path / "out"
    commands = {
        "find-neurons": lambda model: ["find-neurons", model, images, "--out", out / "i.safetensors"],
        "inspect": lambda model: ["inspect", model, images / "a.png", "--out", out / "r.png"],
        "evaluate": lambda model: ["evaluate", model, images, "--out-dir", out, "--no-figure"],
        "demo": lambda model: ["demo", "--model", model, "--out-dir", out],
    }
    vit = "vit_base_patch16_224_in21k"
    cases = [  # (MODEL, --weights, the refusal)
        ("planted", damaged, "The planted model is built here, not loaded: it takes no weights"),
        (tmp_path / "dinov2", tmp_path / "nope", "is a checkpoint, which holds its weights: drop --weights"),
        ("open_clip:ViT-B-16", damaged, "is a checkpoint, which holds its weights: drop --weights"),
        (vit, tmp_path / "nope", "No checkpoint at --weights"),
        (vit, tmp_path / "dinov3", "hold a 'dinov3_vit' checkpoint, and vit_base_patch16_224_in21k loads vit"),
        (vit, tmp_path / "no-config", "is a folder without a config.json"),
        (vit, damaged, "is a file, and vit_base_patch16_224_in21k loads a Hugging Face checkpoint folder"),
        ("dinov2_vitl14", damaged, "Cannot read the checkpoint"),  # it has a shipped index: the weights are read
    ]
    argvs = [[*command(model), "--weights", weights] for command in commands.values() for model, weights, _ in cases]
    argvs.append(["export", tmp_path / "dinov2", "--index", "planted", "--out", out, "--weights", damaged])
    results = ttreg_in_a_fresh_process(*argvs)
    expected = [refusal for _ in commands for *_, refusal in cases] + ["unrecognized arguments: --weights"]
    for argv, (status, err), refusal in zip(argvs, results, expected):
        assert status == 2 and refusal in err and len(err.splitlines()) == 1, (argv, err)
    assert not out.exists()


def test_weights_that_would_be_ignored_are_refused(tmp_path, capsys):
    Dinov2TTRegModel(tiny_dinov2_config(register_neurons={})).save_pretrained(tmp_path / "folder")
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"")
    images = tmp_path / "images"
    images.mkdir()
    out = ["--out", str(tmp_path / "i.safetensors")]
    for model, reason in [
        ("planted", "The planted model is built here, not loaded: it takes no weights"),
        (str(tmp_path / "folder"), "is a checkpoint, which holds its weights: drop --weights"),
    ]:
        status, err = cli(["find-neurons", model, str(images), *out, "--weights", str(weights)], capsys)
        assert status == 2 and reason in err and err.count("ttreg: error:") == 1
    status, err = cli(["find-neurons", "vit_base_patch16_224_in21k", str(images), *out, "--weights", "nope"], capsys)
    assert status == 2 and "No checkpoint at --weights nope" in err


def test_weights_of_another_family_are_refused(tmp_path, capsys):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    arch = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16)
    DINOv3ViTModel(DINOv3ViTConfig(**arch, image_size=64)).save_pretrained(tmp_path / "dinov3")
    with pytest.raises(TTRegValueError, match="hold a 'dinov3_vit' checkpoint, and vit_base_patch16_224_in21k loads"):
        load_tt_model("vit_base_patch16_224_in21k", weights=tmp_path / "dinov3", num_test_time_registers=0)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    argv = ["inspect", "vit_base_patch16_224_in21k", str(image), "--weights", str(tmp_path / "dinov3")]
    status, err = cli([*argv, "--out", str(tmp_path / "r.png")], capsys)
    assert status == 2 and "hold a 'dinov3_vit' checkpoint" in err and not (tmp_path / "r.png").exists()


def dinov2_weights_file(problem: str, folder: Path) -> Path:
    """A ``weights`` file for ``dinov2_vitb14`` that does not load, for the reason ``problem``."""
    from safetensors.torch import save_file

    from upstream_dinov2 import random_original_state_dict

    path = folder / f"{problem.replace(' ', '-')}.{'pth' if problem in ('empty', 'a list') else 'safetensors'}"
    if problem == "empty":
        path.write_bytes(b"")
    elif problem == "damaged":
        path.write_bytes(b"not a safetensors header")
    elif problem == "a list":
        torch.save([torch.zeros(1)], path)
    else:
        dim = 768 if problem == "missing blocks" else 384  # ViT-B/14's width, or ViT-S/14's: another size
        weights = random_original_state_dict(dim=dim, depth=12, patch_size=14, table_side=37)
        missing = "blocks.11." if problem == "missing blocks" else "-"
        save_file({key: value for key, value in weights.items() if not key.startswith(missing)}, path)
    return path


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("empty", "Cannot read the checkpoint"),
        ("damaged", "Cannot read the checkpoint"),
        ("a list", "holds a list, not a state dict"),
        ("missing blocks", "does not fit DINOv2 with width 768 and 12 layers: Missing key(s)"),
        ("another size", "does not fit DINOv2 with width 768 and 12 layers: size mismatch"),
    ],
)
def test_dinov2_weights_that_do_not_load_are_refused_naming_the_file(problem, message, tmp_path):
    path = dinov2_weights_file(problem, tmp_path)
    with pytest.raises(TTRegValueError, match=re.escape(message)) as error:
        load_tt_model("dinov2_vitb14", weights=path, num_test_time_registers=0)
    assert str(path) in str(error.value) and len(str(error.value)) < 600


# item 11: types, not values


@pytest.mark.parametrize("layers", [4.0, True, "4"])
def test_a_head_layer_count_of_another_type_is_refused(layers):
    with pytest.raises(TTRegValueError, match=f"layers={layers!r}"):
        entry_points()["dinov2_vits14_tt_reg_lc"](pretrained=False, layers=layers, num_test_time_registers=0)


@pytest.mark.parametrize("pretrained", ["False", 0, None])
def test_pretrained_is_a_bool(pretrained):
    with pytest.raises(TTRegTypeError, match="pretrained must be True or False"):
        load_tt_model("dinov2_vits14", pretrained=pretrained, num_test_time_registers=0)


@pytest.mark.parametrize("n", [4.0, True, "ab", [1.0]])
def test_get_intermediate_layers_refuses_other_types(n):
    model = entry_points()["dinov2_vits14_tt_reg"](pretrained=False, num_test_time_registers=0)
    with pytest.raises(TTRegTypeError, match="n must be an int"):
        model.get_intermediate_layers(torch.randn(1, 3, 28, 28), n=n)


# item 3 and item 10: the VLM loader's keywords mean what the parent's mean; typos name the closest valid one


@pytest.fixture
def llava_folder(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tower, image_size=28), text_config=LlamaConfig(**text), image_token_index=63
    )
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    return tmp_path / "llava"


def test_load_vlm_gives_config_keywords_to_the_config_as_the_parent_does(llava_folder):
    from transformers import LlavaForConditionalGeneration

    from ttreg_hf import load_vlm

    settings = dict(
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=5,
        text_config={"rms_norm_eps": 1e-3},
        dtype=torch.bfloat16,
    )
    parent = LlavaForConditionalGeneration.from_pretrained(llava_folder, **settings)
    ours = load_vlm(llava_folder, num_test_time_registers=0, **settings)
    assert ours.config.text_config.rms_norm_eps == parent.config.text_config.rms_norm_eps == 1e-3
    assert type(ours.config.text_config) is type(parent.config.text_config)
    assert ours.config.vision_feature_layer == parent.config.vision_feature_layer == -1
    assert ours.config.vision_feature_select_strategy == parent.config.vision_feature_select_strategy == "full"
    assert ours.config.image_seq_length == parent.config.image_seq_length == 5
    assert ours.dtype == parent.dtype == torch.bfloat16
    with pytest.raises(TTRegTypeError, match="'vision_feature_layr'; did you mean 'vision_feature_layer'"):
        load_vlm(llava_folder, num_test_time_registers=0, vision_feature_layr=-1)
    with pytest.raises(TTRegTypeError, match="'ignore_mismatched_size'; did you mean 'ignore_mismatched_sizes'"):
        load_vlm(llava_folder, num_test_time_registers=0, ignore_mismatched_size=True)  # from_pretrained's own
    with pytest.raises(TTRegTypeError, match="'device_mapp'; did you mean 'device_map'"):
        load_vlm(llava_folder, num_test_time_registers=0, device_mapp="cpu")  # documented, not in its signature


def test_load_vlm_returns_the_loading_info_as_the_parent_does(llava_folder):
    from transformers import LlavaForConditionalGeneration

    from ttreg_hf import LlavaTTRegForConditionalGeneration, load_vlm

    _, expected = LlavaForConditionalGeneration.from_pretrained(llava_folder, output_loading_info=True)
    ours, info = load_vlm(llava_folder, num_test_time_registers=0, output_loading_info=True)
    assert type(ours) is LlavaTTRegForConditionalGeneration and info == expected


def test_from_pretrained_names_the_closest_of_its_own_keywords(index_file, tmp_path):
    Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file)).save_pretrained(tmp_path)
    for typo, meant in [("device_mapp", "device_map"), ("ignore_mismatched_size", "ignore_mismatched_sizes")]:
        with pytest.raises(TTRegTypeError, match=f"'{typo}'; did you mean '{meant}'"):
            Dinov2TTRegModel.from_pretrained(tmp_path, **{typo: "cpu"})
    with pytest.raises(TTRegTypeError, match=r"'zzz'; none of the \d+ it takes is close to it") as refused:
        Dinov2TTRegModel.from_pretrained(tmp_path, zzz=1)
    assert len(str(refused.value)) < 200  # not every config field and loading keyword


def test_open_clip_and_timm_loaders_name_the_closest_keyword():
    from ttreg_hf.modeling.open_clip import create_model_and_transforms
    from ttreg_hf.modeling.timm import create_model

    with pytest.raises(TTRegTypeError, match="'precison'; did you mean 'precision'"):
        create_model_and_transforms("ViT-B-32", num_test_time_registers=0, precison="fp32")
    with pytest.raises(TTRegTypeError, match="'drop_rat'; did you mean 'drop_rate'"):
        create_model("vit_tiny_patch16_224", num_test_time_registers=0, drop_rat=0.1)


# item 4: a composite model's sub-configs at load, as the parent takes them


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_sub_configs_given_at_load_are_taken_as_the_parent_takes_them(family, tmp_path):
    import transformers

    from ttreg_hf import CLIPTTRegModel, SiglipTTRegModel

    prefix = "CLIP" if family == "clip" else "Siglip"
    parent_class = getattr(transformers, f"{prefix}Model")
    ours_class = CLIPTTRegModel if family == "clip" else SiglipTTRegModel
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    config = getattr(transformers, f"{prefix}Config")(vision_config={**tower, "image_size": 28}, text_config=text)
    parent_class(config).save_pretrained(tmp_path / family)
    vision_class = getattr(transformers, f"{prefix}VisionConfig")
    for given in [
        dict(vision_config={"layer_norm_eps": 1e-3}),
        dict(vision_config=vision_class(**tower, image_size=28, layer_norm_eps=1e-3)),
        dict(text_config={"layer_norm_eps": 1e-3}),
    ]:
        parent = parent_class.from_pretrained(tmp_path / family, **given)
        ours = ours_class.from_pretrained(tmp_path / family, num_test_time_registers=0, **given)
        for key in ("vision_config", "text_config"):
            assert getattr(ours.config, key).layer_norm_eps == getattr(parent.config, key).layer_norm_eps
        assert type(ours.config.vision_config) is ours_class.config_class.register_config_class()
        assert ours.config.vision_config.num_test_time_registers == 0
    with pytest.raises(TTRegTypeError, match=f"vision_config must be a {prefix}VisionConfig"):
        ours_class.from_pretrained(tmp_path / family, vision_config=Dinov2TTRegConfig(), num_test_time_registers=0)


# item 13: a setting the model will not honour is an error; an index the model will not use is not read


def test_an_open_clip_export_with_the_edit_off_reads_no_index(tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file

    from ttreg_hf.modeling.open_clip import create_model_and_transforms

    vision = dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8)
    config = dict(embed_dim=16, vision_cfg=vision, text_cfg=dict(context_length=8, vocab_size=100, width=32, layers=1))
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    base = open_clip.CLIP(**config).eval()
    save_file(base.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "register_neurons.safetensors").write_bytes(b"not an index")
    model, _, _ = create_model_and_transforms(f"local-dir:{folder}", num_test_time_registers=0)
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval().encode_image(pixels), base.encode_image(pixels))
    with pytest.raises(RegisterNeuronIndexError, match="not a readable safetensors file"):
        create_model_and_transforms(f"local-dir:{folder}")  # the edit on: the index is read, and refused


def test_a_transformers_export_reads_its_index_from_the_config_and_names_it_when_corrupt(index_file, tmp_path):
    """The index file beside the weights is for index look-ups, never read to load: corrupt, it blocks nothing. The
    index in ``config.json`` is the model's, kept whatever the load's settings (``save_pretrained`` writes it back):
    one the model cannot use is refused, with 0 registers too, naming the file and the fix, which works."""
    import json

    from ttreg_hf.export import export_model

    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no preprocessor config: the family default, with a warning
        out = export_model(model, index_file, tmp_path / "out")
    (out / "register_neurons.safetensors").write_bytes(b"not an index")
    pixels = torch.randn(1, 3, 56, 56)
    for settings in ({}, {"num_test_time_registers": 0}):
        loaded = Dinov2TTRegModel.from_pretrained(out, **settings).eval()
        assert loaded.config.register_neurons == {"1": [3, 70]}
        expected = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file, **settings)).eval()
        expected.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(loaded(pixels).last_hidden_state, expected(pixels).last_hidden_state)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "register_neurons": {"1": [3, 999]}}))
    for settings in ({}, {"num_test_time_registers": 0}):
        with pytest.raises(RegisterNeuronIndexError, match=f"{out}/config.json holds .*999.* out of range.*remove"):
            Dinov2TTRegModel.from_pretrained(out, **settings)
    del config["register_neurons"], config["register_index_provenance"]  # the fix the message gives
    (out / "config.json").write_text(json.dumps(config))
    assert Dinov2TTRegModel.from_pretrained(out, num_test_time_registers=0).config.register_neurons is None


def test_a_register_setting_on_a_dual_encoders_config_is_refused(tmp_path):
    from transformers import CLIPConfig

    from ttreg_hf import CLIPTTRegConfig, CLIPTTRegModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    config = CLIPConfig(vision_config={**tower, "image_size": 28}, text_config=text)
    model = CLIPTTRegModel(CLIPTTRegConfig.from_parent_config(config))
    with pytest.raises(TTRegValueError, match="CLIPTTRegConfig holds no num_test_time_registers: the vision_config"):
        model.config.num_test_time_registers = 0
    with pytest.raises(TTRegValueError, match="holds no register_neurons"):
        CLIPTTRegConfig(register_neurons={1: [3]})
    assert model.config.vision_config.num_test_time_registers == 1


# item 12: no ratio where none was measured


def test_discovery_without_evaluation_images_reports_no_ratio():
    from ttreg_hf.discovery import find_register_neurons
    from ttreg_hf.model_card import render_index_card
    from ttreg_hf.planted import build_planted_model, planted_pixels, textured_images

    model, images = build_planted_model(), planted_pixels(textured_images(16, seed=0, size=224))
    result = find_register_neurons(model, images, calibration_images=8, batch_size=8, top_k=4, eval_images=0)
    assert result.found and result.eval_outlier_ratio is None and result.index.details["num_eval_images"] == 0
    assert "eval_outlier_ratio_before" not in result.index.details
    assert "% before" not in result.summary() and "not measured" in result.summary()
    assert "% before" not in render_index_card(result.index, "me/index")
    measured = find_register_neurons(model, images, calibration_images=8, batch_size=8, top_k=4, eval_images=2)
    assert "% before" in measured.summary() and "% before" in render_index_card(measured.index, "me/index")


def test_no_evaluation_images_for_the_automatic_k_is_refused_before_loading(monkeypatch, tmp_path, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --eval-images was checked")

    monkeypatch.setattr("ttreg_cli.load_model", no_loading)
    argv = ["find-neurons", "planted", str(tmp_path), "--out", str(tmp_path / "i.safetensors"), "--eval-images", "0"]
    status, err = cli(argv, capsys)
    assert status == 2 and "eval_images must be an integer of at least 1 (the automatic top_k" in err


def test_the_index_card_shows_no_ratio_where_none_was_measured():
    """An index that records ratios beside no evaluation images (as discovery wrote them before): not measured."""
    from ttreg_hf.model_card import render_index_card

    unmeasured = {"num_eval_images": 0, "eval_outlier_ratio_before": 0.0, "eval_outlier_ratio_after": 0.0}
    card = render_index_card(tiny_index(details=unmeasured), "me/index")
    assert "% before" not in card and "- outlier ratio: not measured (no evaluation images)\n" in card
    measured = {"num_eval_images": 8, "eval_outlier_ratio_before": 0.02, "eval_outlier_ratio_after": 0.001}
    card = render_index_card(tiny_index(details=measured), "me/index")
    assert "- outlier tokens on the 8 evaluation images: 2.00 % before, 0.10 % with the edit\n" in card
    measured.pop("num_eval_images")  # an index that records no count: its ratios as they are
    older = render_index_card(tiny_index(details=measured), "me/index")
    assert "- outlier tokens on the evaluation images: 2.00 % before, 0.10 % with the edit\n" in older


# item 9: the fingerprint names the weights, not the library's parameter names or its pruning


def dinov2_s_index(fingerprint: str) -> RegisterNeuronIndex:
    details = {"weights_fingerprint": fingerprint}
    return RegisterNeuronIndex({3: [10, 200]}, num_layers=12, mlp_width=1536, checkpoints={}, details=details)


def other_weights_warnings(record) -> list:
    return [w for w in record if "found on other weights" in str(w.message)]


def test_timm_dinov2_with_an_index_found_on_our_dinov2_of_the_same_weights_does_not_warn(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    from ttreg_hf.index import weights_fingerprint
    from ttreg_hf.modeling.timm import to_test_time_registers

    from upstream_dinov2 import random_original_state_dict

    original = random_original_state_dict(dim=384, depth=12, patch_size=14, table_side=37)  # ViT-S/14's shapes
    save_file(original, tmp_path / "vits14.safetensors")
    ours = load_tt_model("dinov2_vits14", weights=tmp_path / "vits14.safetensors", num_test_time_registers=0)
    vits = timm.create_model("vit_small_patch14_dinov2", pretrained=False)
    vits.load_state_dict(checkpoint_filter_fn(original, vits))
    other = timm.create_model("vit_small_patch14_dinov2", pretrained=False)  # other (random) weights
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        to_test_time_registers(vits, register_neurons=dinov2_s_index(weights_fingerprint(ours)))
        assert other_weights_warnings(record) == []
        to_test_time_registers(other, register_neurons=dinov2_s_index(weights_fingerprint(ours)))
        assert len(other_weights_warnings(record)) == 1


def test_a_timm_model_built_with_features_only_matches_its_full_models_fingerprint():
    from ttreg_hf.index import weights_fingerprint
    from ttreg_hf.modeling.timm import create_model

    torch.manual_seed(0)
    full = create_model("vit_small_patch14_dinov2", num_test_time_registers=0)
    index = dinov2_s_index(weights_fingerprint(full))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        create_model("vit_small_patch14_dinov2", register_neurons=index, features_only=True, out_indices=(3,))
        assert other_weights_warnings(record) == []
        torch.manual_seed(1)  # other weights
        create_model("vit_small_patch14_dinov2", register_neurons=index, features_only=True, out_indices=(3,))
        assert len(other_weights_warnings(record)) == 1


# item 7: export folders on another file system, and what a killed export leaves


def test_an_export_into_a_folder_on_another_file_system_is_copied_in(index_file, tmp_path, monkeypatch):
    import errno
    import os

    from ttreg_hf.export import export_model

    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file))
    out = tmp_path / "mounted"
    out.mkdir()

    def no_renames_into_out(rename):
        def refuse(source, target, *args, **kwargs):
            if Path(target).parent == out and out not in Path(source).parents:  # OUT is a mount point
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(source), None, str(target))
            return rename(source, target, *args, **kwargs)

        return refuse

    monkeypatch.setattr(os, "rename", no_renames_into_out(os.rename))
    monkeypatch.setattr(os, "replace", no_renames_into_out(os.replace))
    stale = tmp_path / ".mounted.ttreg-staging-killed"  # what a killed export leaves beside OUT
    stale.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no preprocessor config: the family default, with a warning
        export_model(model, index_file, out)
    assert {"config.json", "model.safetensors", "register_neurons.safetensors"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.safetensors", "mounted"]  # no staging folder left


@pytest.fixture
def other_file_system(tmp_path):
    """A new folder on a file system other than ``tmp_path``'s (``/dev/shm``, a tmpfs), removed afterwards."""
    import os
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no writable /dev/shm on another file system than the temporary folder")
    folder = Path(tempfile.mkdtemp(dir=shm, prefix="ttreg-test-"))
    yield folder
    shutil.rmtree(folder)


def test_an_export_through_a_link_to_another_file_system_lands_there(index_file, tmp_path, other_file_system):
    """A real cross-device OUT (a link into a tmpfs): written, rewritten with overwrite, a killed export's staging
    folder removed, nothing left behind on either side."""
    from ttreg_hf.export import export_model

    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file))
    target = other_file_system / "export"
    target.mkdir()
    out = tmp_path / "out"
    out.symlink_to(target)
    (tmp_path / ".out.ttreg-staging-killed").mkdir()  # what a killed export leaves beside OUT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no preprocessor config: the family default, with a warning
        export_model(model, index_file, out)
        written, card = sorted(path.name for path in target.iterdir()), (target / "README.md").read_text()
        (target / "README.md").write_text("edited")
        export_model(model, index_file, out, overwrite=True)
    assert sorted(path.name for path in target.iterdir()) == written and (target / "README.md").read_text() == card
    assert RegisterNeuronIndex.load(target / "register_neurons.safetensors") == tiny_index()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index.safetensors", "out"]
    assert sorted(path.name for path in other_file_system.iterdir()) == ["export"]


def test_a_copy_to_another_file_system_that_fails_leaves_out_as_it_was(index_file, tmp_path, other_file_system):
    """A full disk while the staged files are copied across devices: OUT (an earlier export) keeps its files, the
    half-copied one included, and nothing is left behind; the next export removes what a killed one left in OUT."""
    import errno
    import shutil

    from ttreg_hf.export import ExportError, export_model

    out = tmp_path / "out"
    out.symlink_to(other_file_system)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no preprocessor config: the family default, with a warning
        export_model(Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file)), index_file, out)
        before = {path.name: path.read_bytes() for path in other_file_system.iterdir()}
        copyfile = shutil.copyfile

        def full_disk(source, target, *args, **kwargs):
            if Path(source).name == "model.safetensors":
                Path(target).write_bytes(Path(source).read_bytes()[:100])
                raise OSError(errno.ENOSPC, "No space left on device", str(target))
            return copyfile(source, target, *args, **kwargs)

        other = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file, num_test_time_registers=2))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(shutil, "copyfile", full_disk)
            with pytest.raises(ExportError, match=f"Could not write {out}: .*No space left"):
                export_model(other, index_file, out, overwrite=True)
        assert {path.name: path.read_bytes() for path in other_file_system.iterdir()} == before
        assert sorted(path.name for path in tmp_path.iterdir()) == ["index.safetensors", "out"]
        (other_file_system / ".ttreg-staging-killed").mkdir()  # what an export killed while copying leaves in OUT
        export_model(other, index_file, out, overwrite=True)
    assert ".ttreg-staging-killed" not in {path.name for path in other_file_system.iterdir()}
    assert json.loads((other_file_system / "config.json").read_text())["num_test_time_registers"] == 2


def test_an_export_through_a_link_to_nothing_is_refused_before_writing(index_file, tmp_path, other_file_system):
    """A link whose target is missing (a disk not mounted?) is refused up front, and nothing is created there."""
    from ttreg_hf.export import ExportError, export_model

    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file))
    out = tmp_path / "out"
    out.symlink_to(other_file_system / "missing")
    with pytest.raises(ExportError, match=f"{out} is a link to {other_file_system / 'missing'}, which does not exist"):
        export_model(model, index_file, out)
    assert not (other_file_system / "missing").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index.safetensors", "out"]


def test_an_export_that_fails_while_writing_leaves_out_as_it_was(index_file, tmp_path, monkeypatch):
    from ttreg_hf import export

    model = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no preprocessor config: the family default, with a warning
        out = export.export_model(model, index_file, tmp_path / "out")
        (out / "README.md").write_text("an earlier export, edited")
        before = {path.name: path.read_bytes() for path in out.iterdir()}

        def killed(*args, **kwargs):  # the card is written last: the rest is written by then
            raise KeyboardInterrupt

        monkeypatch.setattr(export, "render_model_card", killed)
        other = Dinov2TTRegModel(tiny_dinov2_config(register_neurons=index_file, num_test_time_registers=2))
        with pytest.raises(KeyboardInterrupt):
            export.export_model(other, index_file, out, overwrite=True)  # other weights, another config
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index.safetensors", "out"]


# item 8: an upgrade that could not be reloaded, or that fails on a bad setting, changes nothing


@pytest.mark.parametrize("family", ["ViT", "DeiT"])
def test_a_model_on_a_tower_without_a_class_of_ours_is_refused_up_front(family):
    """A user's subclass of a classifier: what it saved would not reload as it (masked-image models are ours now:
    `test_task_model_seams`)."""
    import transformers

    from ttreg_hf import to_test_time_registers

    arch = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)
    config = getattr(transformers, f"{family}Config")(**arch, image_size=32)
    mine = type(f"My{family}Classifier", (getattr(transformers, f"{family}ForImageClassification"),), {})
    model = mine(config)
    tower = getattr(model, family.lower())
    with pytest.raises(TTRegTypeError, match=f"My{family}Classifier with test-time registers would save"):
        to_test_time_registers(model, register_neurons={1: [3]})
    assert getattr(model, family.lower()) is tower and type(model.config) is type(config)


def tiny_towers():
    import open_clip
    from timm.models.vision_transformer import VisionTransformer

    from ttreg_hf.modeling.open_clip import to_test_time_registers as open_clip_upgrade
    from ttreg_hf.modeling.timm import to_test_time_registers as timm_upgrade

    timm_vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    open_clip_vit = open_clip.transformer.VisionTransformer(32, 8, 32, 2, 2, 2.0, output_dim=16)
    return [(timm_upgrade, timm_vit), (open_clip_upgrade, open_clip_vit)]


@pytest.mark.parametrize(
    "bad",
    [dict(num_test_time_registers=-1), dict(register_neurons={5: [1]}), dict(register_scale=[1.0, 2.0])],
    ids=["count", "index", "scales"],
)
def test_an_open_clip_or_timm_upgrade_refused_on_a_setting_leaves_the_model_as_it_was(bad):
    for upgrade, tower in tiny_towers():
        modules = [(name, type(module)) for name, module in tower.named_modules()]
        with pytest.raises(TTRegError):
            upgrade(tower, **bad)
        assert [(name, type(module)) for name, module in tower.named_modules()] == modules
        assert not hasattr(tower, "config")


@pytest.mark.parametrize(
    "bad",
    [dict(num_test_time_registers=-1), dict(register_neurons={5: [1]}), dict(register_scale=[1.0, 2.0])],
    ids=["count", "index", "scales"],
)
def test_a_transformers_upgrade_refused_on_a_setting_is_the_packages_error_and_changes_nothing(bad):
    from ttreg_hf import to_test_time_registers

    from host_models import LOADED, llava

    for model in (LOADED["dinov2-classifier"][0](), llava()[0]):
        modules, config = [(name, type(module)) for name, module in model.named_modules()], model.config.to_dict()
        with pytest.raises(TTRegError):
            to_test_time_registers(model, **{"register_neurons": {1: [3]}, **bad})
        assert [(name, type(module)) for name, module in model.named_modules()] == modules
        assert model.config.to_dict() == config


def test_a_typo_in_an_upgrades_setting_names_the_closest_setting_and_changes_nothing():
    from ttreg_hf import to_test_time_registers

    from host_models import LOADED

    for upgrade, tower in tiny_towers():
        with pytest.raises(TTRegTypeError, match="'registr_scale'; did you mean 'register_scale'"):
            upgrade(tower, register_neurons={1: [3]}, registr_scale=2.0)
        assert not hasattr(tower, "config")
    model = LOADED["dinov2-classifier"][0]()
    tower = model.dinov2
    with pytest.raises(TTRegTypeError, match="registr_scale not a setting of Dinov2TTRegConfig; did you mean 'regis"):
        to_test_time_registers(model, register_neurons={1: [3]}, registr_scale=2.0)
    assert model.dinov2 is tower


def test_an_unreadable_image_and_a_figure_format_matplotlib_lacks_are_user_errors(tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    image = tmp_path / "x.png"
    image.write_bytes(b"not a png")
    with monkeypatch.context() as patch:
        patch.setattr("ttreg_cli.load_model", no_loading)
        status, err = cli(["inspect", "planted", str(image), "--out", str(tmp_path / "report.txt")], capsys)
    assert status == 2 and "--out" in err and ".png" in err and len(err.splitlines()) == 1
    status, err = cli(["inspect", "planted", str(image), "--out", str(tmp_path / "report.png")], capsys)
    assert status == 2 and "Cannot read the image" in err and len(err.splitlines()) == 1
