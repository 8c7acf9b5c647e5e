"""The family contract: every declared family (`ttreg_hf.family.families()`) through every entry point — its loaders,
each CLI command, export, discovery and the analysis tools — so that a family added to the declarations is tested
here without a line of this file changing (its tiny model goes in `tests/family_models.py`)."""

import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor

from ttreg_cli import load_model, main
from ttreg_hf import vision_tower_with_registers
from ttreg_hf.hub import entry_points
from ttreg_hf.index import RegisterNeuronIndex
from ttreg_hf.planted import textured_images
from ttreg_hf.registry import FAMILY_MODULES, families, transformers_families

from family_models import LAYER, NEURONS, SIZE, TINY, analysis_inputs, planted, tiny_model
from support import save_as_parent_checkpoint

FAMILIES = {family.name: family for family in families()}
TRANSFORMERS = {family.name: family for family in transformers_families()}
TYPO = "num_test_time_register"  # for num_test_time_registers: kept silently, it would leave the registers on


def test_every_declared_family_has_a_tiny_model():
    assert sorted(set(FAMILIES) - set(TINY)) == [], "add a tiny model of the family to tests/family_models.py"


def test_every_package_family_module_declares_its_families():
    modules = {family.model_class.__module__ for family in families()}  # a user family (the example's) may be there
    declared = {module.rpartition(".")[2] for module in modules if module.startswith("ttreg_hf.modeling.")}
    assert declared == set(FAMILY_MODULES)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(textured_images(12, seed=0, size=SIZE)):
        save_image(image, folder / f"{i:02d}.png")
    inspected = textured_images(1, seed=1, size=SIZE)[0]
    inspected[:, 24:64, 32:72] = 0.4  # a uniform region large enough for outliers at any family's resolution
    save_image(inspected, folder.parent / "inspected.png")
    return folder


def save_image(image: torch.Tensor, path: Path) -> None:
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


def parent_checkpoint(name: str, folder: Path) -> Path:
    """The planted tiny model of ``name`` saved as a checkpoint of its parent class (plain `transformers`: config,
    weights) with the family's image processor, as the parent's checkpoints ship one."""
    model = planted(name)
    save_as_parent_checkpoint(model, folder)
    TRANSFORMERS[name].default_image_processor(model.config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(image_dir, tmp_path_factory):
    """``pipeline(name)``: the CLI run on the family's parent checkpoint — find-neurons, the model saved with the
    index it found, inspect, export — once per family; a dict of what each step gave."""
    runs = {}

    def run(name: str) -> dict:
        if name in runs:
            return runs[name]
        root = tmp_path_factory.mktemp(name)
        parent = parent_checkpoint(name, root / "parent")
        index_file = root / "index.safetensors"
        assert main(["find-neurons", str(parent), str(image_dir), "--out", str(index_file)]) == 0
        ours = root / "ours"
        model = TRANSFORMERS[name].model_class.from_pretrained(parent, register_neurons=index_file).eval()
        model.save_pretrained(ours)
        AutoImageProcessor.from_pretrained(parent).save_pretrained(ours)
        report = root / "report.png"
        image = image_dir.parent / "inspected.png"
        inspect_status = main(["inspect", str(ours), str(image), "--out", str(report)])
        export = root / "export"
        export_status = main(["export", str(ours), "--index", str(index_file), "--out", str(export)])
        runs[name] = dict(parent=parent, index=index_file, ours=ours, model=model, image=image, report=report,
                          inspect_status=inspect_status, export=export, export_status=export_status)  # fmt: skip
        return runs[name]

    return run


def model_inputs(folder: Path, image: Path) -> dict[str, torch.Tensor]:
    return dict(AutoImageProcessor.from_pretrained(folder)([Image.open(image).convert("RGB")], return_tensors="pt"))


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_find_neurons_on_a_parent_checkpoint_finds_the_planted_neurons(name, pipeline):
    index = RegisterNeuronIndex.load(pipeline(name)["index"])
    assert {layer: set(ids) for layer, ids in index.neurons.items()} == {LAYER: set(NEURONS)}


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_the_cli_preprocesses_with_the_checkpoints_own_image_processor(name, pipeline, tmp_path):
    """The saved processor has statistics of its own, so the family's default (the fallback) would not pass."""
    run = pipeline(name)
    folder = shutil.copytree(run["ours"], tmp_path / "ours")
    processor = AutoImageProcessor.from_pretrained(folder)
    processor.image_mean, processor.image_std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    processor.save_pretrained(folder)
    _, preprocessor = load_model(str(folder), "cpu")
    image = [Image.open(run["image"]).convert("RGB")]
    computed = preprocessor(image)
    expected = model_inputs(folder, run["image"])
    assert computed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(computed[key], expected[key]), key
    default = TRANSFORMERS[name].default_image_processor(run["model"].config)
    assert not torch.equal(default(image, return_tensors="pt")["pixel_values"], expected["pixel_values"])


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_inspect_uses_the_index_saved_in_the_folder(name, pipeline, capsys):
    run = pipeline(name)
    assert run["inspect_status"] == 0 and run["report"].stat().st_size > 10_000
    capsys.readouterr()  # what the pipeline printed, maybe in an earlier test: inspect again, and read this run
    assert main(["inspect", str(run["ours"]), str(run["image"]), "--out", str(run["report"]), "--overwrite"]) == 0
    original, edited = capsys.readouterr().out.splitlines()[:2]
    outliers = [int(re.search(r"(\d+) outlier tokens", line).group(1)) for line in (original, edited)]
    assert outliers[0] >= 1 and outliers[1] == 0, (original, edited)
    original_max = float(re.search(r"\(max ([\d.]+)", original).group(1))
    register_norm = float(re.search(r"register norm ([\d.]+)", edited).group(1))
    assert register_norm > original_max / 2, (original, edited)  # the outliers' norm moved onto the register


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_an_export_reloads_bit_equal(name, pipeline):
    run = pipeline(name)
    assert run["export_status"] == 0
    reloaded = TRANSFORMERS[name].model_class.from_pretrained(run["export"]).eval()
    inputs = model_inputs(run["ours"], run["image"])
    with torch.no_grad():
        expected, actual = run["model"](**inputs), reloaded(**inputs)
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(actual.test_time_registers, expected.test_time_registers)


def test_every_export_loads_with_transformers_alone(pipeline, tmp_path):
    """In one fresh process where ``import ttreg_hf`` fails: ``AutoModel.from_pretrained(export,
    trust_remote_code=True)`` gives the package model's outputs, for every family."""
    cases = {}
    for name in TRANSFORMERS:
        run = pipeline(name)
        inputs = model_inputs(run["ours"], run["image"])
        with torch.no_grad():
            expected = run["model"](**inputs).last_hidden_state
        save_file({**inputs, "expected": expected.contiguous()}, tmp_path / f"{name}.safetensors")
        cases[name] = str(run["export"])
    script = f"""
import sys, json, torch
sys.modules["ttreg_hf"] = None  # the export must not need the package
from safetensors.torch import load_file
from transformers import AutoModel
failures = []
for name, folder in json.loads({json.dumps(json.dumps(cases))}).items():
    tensors = load_file(f"{tmp_path}/{{name}}.safetensors")
    expected = tensors.pop("expected")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        actual = model(**tensors).last_hidden_state
    if not torch.allclose(actual, expected, atol=1e-5, rtol=0):
        failures.append(name)
print(json.dumps(failures))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", FAMILIES)
def test_a_misspelled_setting_is_a_type_error_in_every_loader(name, tmp_path):
    family = FAMILIES[name]
    entries = [entry_points()[checkpoint.entry_name] for checkpoint in family.checkpoints]
    loaders = [lambda entry=entry: entry(pretrained=False, **{TYPO: 0}) for entry in entries]
    if name in TRANSFORMERS:
        folder = parent_checkpoint(name, tmp_path / name)
        loaders.append(lambda: family.model_class.from_pretrained(folder, **{TYPO: 0}))
        loaders.append(lambda: family.model_class.from_pretrained(folder, register_neurons={1: [2]}, **{TYPO: 0}))
    if name == "open_clip":
        from ttreg_hf.modeling.open_clip import create_model_and_transforms

        loaders.append(lambda: create_model_and_transforms("ViT-S-32", **{TYPO: 0}))
    if name == "timm":
        from ttreg_hf.modeling.timm import create_model

        loaders.append(lambda: create_model("vit_tiny_patch16_224", **{TYPO: 0}))
    assert loaders, f"{name} has no loader to try"
    for load in loaders:
        with pytest.raises(
            TypeError, match=f"unexpected keyword argument '{TYPO}'; did you mean 'num_test_time_registers'"
        ):
            load()


def eager_attentions(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Every block's attention probabilities as the model itself computes them, by each library's own means."""
    if getattr(model, "config", None) is not None and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
        return model(**inputs, output_attentions=True).attentions
    captured = []
    if hasattr(model, "transformer"):  # open_clip: nn.MultiheadAttention asked for its weights, per head

        def keep(block, args):
            x = block.ln_1(args[0])
            captured.append(block.attn(x, x, x, need_weights=True, average_attn_weights=False)[1])

        hooks = [block.register_forward_pre_hook(keep) for block in model.transformer.resblocks]
    else:  # timm: the unfused attention, whose probabilities go through `attn_drop`
        for block in model.blocks:
            block.attn.fused_attn = False
        hooks = [
            block.attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(out)) for block in model.blocks
        ]
    try:
        model(inputs["pixel_values"])
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(captured)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_analysis_tools_read_the_attention_the_model_computes(name):
    from ttreg_hf.analysis import run_with_cache

    model = planted(name)
    with torch.no_grad():  # the norms apart: a reader that takes the wrong one shows
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    inputs = analysis_inputs(name)
    keywords = {key: value for key, value in inputs.items() if key != "pixel_values"}
    _, cache = run_with_cache(model, inputs["pixel_values"], attentions="all", **keywords)
    with torch.no_grad():
        eager = eager_attentions(model, inputs)
    assert len(eager) == len(cache.attentions) > 0
    for layer, attention in enumerate(eager):
        torch.testing.assert_close(cache.attentions[layer], attention.float(), atol=1e-5, rtol=1e-4)


def test_open_clip_and_timm_preprocess_as_their_libraries_do():
    import open_clip
    import timm

    from ttreg_hf.modeling.open_clip import to_test_time_registers as open_clip_tt
    from ttreg_hf.modeling.timm import to_test_time_registers as timm_tt

    picture = Image.fromarray((textured_images(1, seed=5, size=300)[0].permute(1, 2, 0) * 255).byte().numpy())
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32")
    open_clip_tt(clip, num_test_time_registers=0)
    ours = FAMILIES["open_clip"].preprocessing(clip.visual, None)([picture])["pixel_values"]
    assert torch.equal(ours, preprocess(picture).unsqueeze(0))
    vit = timm_tt(timm.create_model("vit_tiny_patch16_224", pretrained=False), num_test_time_registers=0)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=vit))
    ours = FAMILIES["timm"].preprocessing(vit, None)([picture])["pixel_values"]
    assert torch.equal(ours, transform(picture).unsqueeze(0))


def test_the_readme_names_every_torch_hub_entry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()

    def named(entry: str) -> bool:  # the README writes the four DINOv2 sizes as dinov2_vit{s,b,l,g}14_...
        return entry in readme or re.sub(r"_vit[sblg]14_", "_vit{s,b,l,g}14_", entry) in readme

    assert [entry for entry in entry_points() if not named(entry)] == [], "the README's model table lacks these"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_class_takes_its_parents_constructor_arguments(name):
    """`transformers` inspects constructors (its tests look for `use_mask_token`): a drop-in keeps their names.
    (The OpenCLIP and timm classes take their parents' arguments through ``**kwargs``, as those libraries build them.)"""
    family = TRANSFORMERS[name]
    for cls, parent in zip(family.model_classes, family.parents):
        ours, theirs = (set(inspect.signature(c.__init__).parameters) for c in (cls, parent))
        assert theirs <= ours, (cls.__name__, sorted(theirs - ours))


def test_a_corrupt_image_processor_is_an_error_not_a_fallback(tmp_path):
    folder = parent_checkpoint("vit", tmp_path / "vit")
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(
        ValueError, match="Cannot read the image processor .*preprocessor_config.json.*fix or remove it"
    ):
        load_model(str(folder), "cpu", num_test_time_registers=0)
    (folder / "preprocessor_config.json").unlink()  # absent: the family default, with a warning that names it
    with pytest.warns(UserWarning, match="has no image processor .* the vit default ViTImageProcessor"):
        load_model(str(folder), "cpu", num_test_time_registers=0)


def test_register_family_takes_new_names_and_replaces_its_own(monkeypatch):
    from ttreg_hf.family import Family
    from ttreg_hf.registry import register_family

    monkeypatch.setattr("ttreg_hf.registry._REGISTERED", [])  # the families registered here go with the test

    with pytest.raises(ValueError, match="'dinov2' is the name of one of the package's families"):
        register_family(Family("dinov2", FAMILIES["dinov2"].model_classes))
    first = register_family(Family("mine", FAMILIES["vit"].model_classes))
    again = register_family(Family("mine", FAMILIES["vit"].model_classes))  # a re-run cell: replaces, no duplicate
    assert [family for family in families() if family.name == "mine"] == [again] and again is not first


def _tensors(outputs, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a model's (nested) outputs, by its path."""
    if isinstance(outputs, torch.Tensor):
        return {prefix: outputs}
    items = outputs.items() if hasattr(outputs, "items") else enumerate(outputs) if isinstance(outputs, tuple) else ()
    return {path: t for key, value in items for path, t in _tensors(value, f"{prefix}.{key}").items()}


@pytest.mark.parametrize(
    "name, model_class",
    [(name, cls) for name, family in TRANSFORMERS.items() for cls in family.model_classes],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_every_class_is_its_parent_with_the_edit_off_and_keeps_its_shapes_with_it_on(name, model_class):
    """Every output tensor (logits and loss, feature maps, zero-shot logits, hidden states, attentions) of every class
    equals its parent's bit for bit with the edit off; with the edit on each keeps the parent's shape, the registers only in
    their own fields."""
    torch.manual_seed(0)
    ours = tiny_model(name, model_class)
    ours.set_attn_implementation("eager")
    parent = TRANSFORMERS[name].parents[TRANSFORMERS[name].model_classes.index(model_class)](ours.config).eval()
    parent.load_state_dict(ours.state_dict())
    inputs, arguments = analysis_inputs(name), inspect.signature(parent.forward).parameters
    if "input_ids" in arguments:  # zero-shot: two prompts
        inputs["input_ids"] = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    if "labels" in arguments:  # classifiers: the loss too
        inputs["labels"] = torch.tensor([0, 1])
    with torch.no_grad():
        expected = _tensors(parent(**inputs, output_hidden_states=True, output_attentions=True))
        off = _tensors(ours(**inputs, output_hidden_states=True, output_attentions=True))
        vision_tower_with_registers(ours).set_register_neurons({LAYER: list(NEURONS)})
        on = _tensors(ours(**inputs, output_hidden_states=True, output_attentions=True))
    assert any(".attentions" in key for key in expected) and any("hidden_states" in key for key in expected)
    assert off.keys() == expected.keys() and [key for key in off if not torch.equal(off[key], expected[key])] == []
    parents_fields = {key: tensor for key, tensor in on.items() if "test_time_register" not in key}
    assert {k: t.shape for k, t in parents_fields.items()} == {k: t.shape for k, t in expected.items()}
    assert any(not torch.equal(on[key], expected[key]) for key in expected)  # the edit ran
