"""The loaders and configs take each argument in the same forms, with the same meaning, on every path (#25 items 2
and 13, #29 item 4): ``register_neurons`` in every form through every constructor and loader of every family, and a
register setting given to a config that holds none is refused, naming the one that holds it."""

import numpy as np
import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassFieldValidationError
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

import ttreg_hf.index
from ttreg_hf import RegisterNeuronIndex, to_test_time_registers, vision_tower_with_registers
from ttreg_hf.configs.hosts import LlavaTTRegConfig
from ttreg_hf.configs.registers import (
    REGISTER_SETTINGS,
    TestTimeRegisterCompositeConfigMixin,
    TestTimeRegisterHostConfigMixin,
    subclasses,
)
from ttreg_hf.errors import TTRegError, TTRegTypeError, TTRegValueError
from ttreg_hf.family import AUTO_CLASS_NAMES, parent_class
from ttreg_hf.hub import entry_points, load_tt_model
from ttreg_hf.registry import checkpoints, families, transformers_families

import host_models
from family_models import TEXT, TINY, tiny_model
from host_models import BACKBONE_HOSTS, tiny_backbone_config
from upstream_dinov2 import random_original_state_dict

pytest_plugins = ["fake_hub"]  # its `hub` fixture
pytestmark = pytest.mark.filterwarnings("ignore::ttreg_hf.modeling.registers.RegisterEditOffWarning")

FAMILIES = {family.name: family for family in transformers_families()}
NEURONS = {1: [3, 5]}
FORMS = ("dict", "str", "path", "shipped name", "hub repo id", "RegisterNeuronIndex")


def is_composite(model_class: type) -> bool:
    return issubclass(model_class.config_class, TestTimeRegisterCompositeConfigMixin)


def tower_fields(config) -> dict:
    """A tower config's fields as a dict sub-config gives them, without the register settings."""
    return {k: v for k, v in config.to_dict().items() if k not in (*REGISTER_SETTINGS, "transformers_version")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family, model_class)``: a folder holding a tiny ``model_class`` of ``family`` (edit off), saved once."""
    folders = {}

    def save(family: str, model_class: type):
        key = (family, model_class.config_class)
        if key not in folders:
            folders[key] = tmp_path_factory.mktemp(f"{family}-{model_class.config_class.model_type}")
            tiny_model(family, model_class).save_pretrained(folders[key])
        return folders[key]

    return save


def index_in_form(form: str, index: RegisterNeuronIndex, name: str, tmp_path, request):
    """``index`` given as ``form``: a dict, a file (str or `Path`), a shipped name, a Hub repo id or the object."""
    if form == "dict":
        return NEURONS
    if form == "RegisterNeuronIndex":
        return index
    path = index.save(tmp_path / "shipped" / f"tiny_{name}.safetensors")
    if form == "shipped name":
        request.getfixturevalue("monkeypatch").setattr(ttreg_hf.index, "PRECOMPUTED_DIR", path.parent)
        return path.stem
    if form == "hub repo id":
        request.getfixturevalue("hub")
        index.push_to_hub(f"me/tiny-{name}-index")
        return f"me/tiny-{name}-index"
    return str(path) if form == "str" else path


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", FAMILIES)
def test_register_neurons_takes_every_form_on_every_path(name, form, saved, tmp_path, request):
    """Item 2: the config constructor, each class's `from_pretrained`, `AutoModel` / `AutoConfig`, and a host's or a
    dual encoder's sub-config given as a dict read the same index, with an index file's semantics and provenance."""
    family, tower = FAMILIES[name], TINY[name]().config
    index = RegisterNeuronIndex(NEURONS, tower.num_hidden_layers, tower.mlp_width, semantics="reference", image_size=96)
    given = index_in_form(form, index, name, tmp_path, request)
    fields = tower_fields(tower)
    configs = {
        "constructor": family.config_class(
            **{k: v for k, v in fields.items() if k != "model_type"}, register_neurons=given
        ),
        "AutoConfig": AutoConfig.from_pretrained(saved(name, family.model_class), register_neurons=given),
        "AutoModel": AutoModel.from_pretrained(saved(name, family.model_class), register_neurons=given).config,
        "our host's vision_config": LlavaTTRegConfig(
            vision_config={**fields, "register_neurons": given}, text_config={"model_type": "llama"}
        ).vision_config,
        "a transformers host's backbone_config": transformers.DepthAnythingConfig(
            backbone_config={**fields, "register_neurons": given}
        ).backbone_config,
    }
    for model_class in family.model_classes:
        loaded = model_class.from_pretrained(saved(name, model_class), register_neurons=given)
        configs[f"{model_class.__name__}.from_pretrained"] = loaded.config.register_config
        if is_composite(model_class):
            composite = model_class.config_class(vision_config={**fields, "register_neurons": given}, text_config=TEXT)
            configs[f"{model_class.config_class.__name__}'s vision_config"] = composite.vision_config
    from_file = form != "dict"
    for path, config in configs.items():
        assert type(config) is family.config_class, path
        assert config.register_neurons == {"1": [3, 5]}, path  # stored as the constructor stores it
        assert config.register_semantics == ("reference" if from_file else "paper"), path
        assert config.register_index_provenance == (index.provenance if from_file else None), path


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", [family.name for family in families()])
def test_set_register_neurons_takes_every_form_in_every_family(name, form, tmp_path, request):
    """The same forms for the families without a `transformers` config (OpenCLIP, timm), whose settings are a
    `TestTimeRegisterConfig`, as for the others."""
    model = TINY[name]()
    index = RegisterNeuronIndex(NEURONS, model.config.num_hidden_layers, model.config.mlp_width, semantics="reference")
    config = model.set_register_neurons(index_in_form(form, index, name, tmp_path, request)).config
    from_file = form != "dict"
    assert config.register_neurons == {"1": [3, 5]}
    assert config.register_semantics == ("reference" if from_file else "paper")
    assert config.register_index_provenance == (index.provenance if from_file else None)
    assert model.register_edit_sites[1].register_edit.neuron_ids == (3, 5)


def test_a_dict_written_to_a_loaded_config_drops_the_saved_index_provenance(saved, tmp_path):
    """Item 2's neighbour: `AutoModel.from_pretrained(folder, register_neurons={...})` writes the dict to the loaded
    config, as `Dinov2TTRegModel.from_pretrained` attaches it: the provenance of the index saved there goes with it."""
    tower = TINY["dinov2"]().config
    index = RegisterNeuronIndex({2: [7]}, tower.num_hidden_layers, tower.mlp_width, image_size=96)
    model_class = FAMILIES["dinov2"].model_class
    model_class.from_pretrained(saved("dinov2", model_class), register_neurons=index).save_pretrained(tmp_path)
    ours = model_class.from_pretrained(tmp_path, register_neurons=NEURONS).config
    auto = AutoModel.from_pretrained(tmp_path, register_neurons=NEURONS).config
    for config in (ours, auto, AutoConfig.from_pretrained(tmp_path, register_neurons=NEURONS)):
        assert (config.register_neurons, config.register_index_provenance) == ({"1": [3, 5]}, None)


# item 13: a register setting on a config that holds none (a dual encoder's, a host's) is refused

VALID = dict(
    register_neurons=NEURONS,
    num_test_time_registers=0,
    register_scale=2.0,
    register_semantics="reference",
    register_patch_mode="mean",
    register_index_provenance={"image_size": 96},
)
# the configs of dual encoders and of hosts (VLMs, depth and segmentation models)
OUTER = (TestTimeRegisterCompositeConfigMixin, TestTimeRegisterHostConfigMixin)
OUTER_CONFIGS = [cls for base in OUTER for cls in subclasses(base) if getattr(cls, "model_type", "")]


def test_every_register_setting_has_a_value_here():
    assert VALID.keys() == set(REGISTER_SETTINGS)


def outer_config(config_class: type):
    """``config_class`` (a dual encoder's or a host's config) around the tiny tower it takes."""
    if "backbone_config" in config_class.sub_configs:
        return config_class(backbone_config=tower_fields(TINY["dinov2"]().config))
    towers = {family.config_class: name for name, family in FAMILIES.items()}
    family = towers.get(config_class.sub_configs["vision_config"], "clip")  # a host's `AutoConfig`: any tower
    return config_class(vision_config=tower_fields(TINY[family]().config), text_config={"model_type": "llama", **TEXT})


@pytest.mark.parametrize("config_class", OUTER_CONFIGS, ids=lambda cls: cls.__name__)
def test_a_register_setting_on_a_config_that_holds_none_is_refused(config_class):
    """The model reads its tower's sub-config only, as a `transformers` model reads a tower's fields: a setting
    written to the outer config (or given to its constructor) would be ignored, so it is refused, naming the key."""
    config = outer_config(config_class)
    key = config.register_config_key
    before = config.register_config.to_dict()
    for name, value in VALID.items():
        with pytest.raises(TTRegValueError, match=f"holds no {name}: the {key} does.*config.{key}.{name}"):
            setattr(config, name, value)
        with pytest.raises(TTRegValueError, match=f"holds no {name}"):
            config.update({name: value})
        assert name not in vars(config)
    assert config.register_config.to_dict() == before
    with pytest.raises(TTRegValueError, match=f"holds no num_test_time_registers: the {key} does"):
        config_class(**{key: config.register_config}, num_test_time_registers=0)


# #29 item 4: the register settings given to a dual encoder's `from_pretrained` reach its vision tower


@pytest.mark.parametrize(
    "name, model_class",
    [(n, cls) for n, family in FAMILIES.items() for cls in family.model_classes if is_composite(cls)],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_register_settings_given_to_a_dual_encoder_reach_its_vision_tower(name, model_class, saved):
    settings = dict(VALID, num_test_time_registers=2, register_scale=[2.0, 3.0], register_index_provenance=None)
    model = model_class.from_pretrained(saved(name, model_class), **settings)
    tower = vision_tower_with_registers(model)
    assert tower.config is model.config.vision_config
    for setting, value in settings.items():
        expected = {"1": [3, 5]} if setting == "register_neurons" else value
        assert getattr(tower.config, setting) == expected, setting
        assert setting not in vars(model.config), setting
    assert tower.token_layout.num_registers == 2
    edit = tower.register_edit_sites[1].register_edit
    assert (edit.neuron_ids, edit.scale_values, edit.semantics, edit.patch_mode) == (
        (3, 5),
        (2.0, 3.0),
        "reference",
        "mean",
    )


# item 5: every named checkpoint built in the dtype asked for; item 11: types checked, fields as in `from_pretrained`

NAMES = list(checkpoints())
# the checkpoints whose models are not `transformers` models (OpenCLIP's): their loaders take no dtype
OTHER_LIBRARIES = {c.name for f in families() if f not in transformers_families() for c in f.checkpoints}


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("name", NAMES)
def test_every_named_checkpoint_is_built_in_the_dtype_asked_for(name, keyword):
    """With random weights, as `from_config` builds: the parameters and ``config.dtype`` in the dtype given (by
    either of the parent's names, as a dtype or by name); built on the meta device, so ViT-g costs nothing."""
    entry = entry_points()[checkpoints()[name].entry_name]
    if name in OTHER_LIBRARIES:
        with pytest.raises(TTRegTypeError, match=f"unexpected keyword argument '{keyword}'"):
            entry(pretrained=False, num_test_time_registers=0, **{keyword: torch.bfloat16})
        return
    for dtype in (torch.bfloat16, "bfloat16"):
        with torch.device("meta"):
            hub_model = entry(pretrained=False, num_test_time_registers=0, **{keyword: dtype})
            model = load_tt_model(name, pretrained=False, num_test_time_registers=0, **{keyword: dtype})
        assert {p.dtype for p in hub_model.parameters()} == {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.config.dtype == torch.bfloat16
    with pytest.raises(TTRegValueError, match="'auto' means the dtype of a checkpoint's weights"):
        load_tt_model(name, pretrained=False, num_test_time_registers=0, **{keyword: "auto"})
    with pytest.raises(TTRegValueError, match="dtype='int8'"):
        load_tt_model(name, pretrained=False, num_test_time_registers=0, **{keyword: "int8"})


def test_the_planted_model_in_bfloat16_is_the_planted_model_converted():
    planted, converted = (load_tt_model("planted", pretrained=False, dtype=dtype) for dtype in (torch.bfloat16, None))
    converted = converted.to(torch.bfloat16)
    pixels = torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(planted(pixels).last_hidden_state, converted(pixels).last_hidden_state)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in OTHER_LIBRARIES and n != "planted"])
def test_a_config_field_given_with_random_weights_overrides_the_architectures(name):
    """`from_pretrained(..., num_hidden_layers=2)` builds two layers; so does an entry with ``pretrained=False`` (it
    raised Python's "got multiple values for keyword argument")."""
    with torch.device("meta"):
        model = load_tt_model(name, pretrained=False, register_neurons={}, num_hidden_layers=2)
    assert model.config.num_hidden_layers == len(model.transformer_blocks) == 2


@pytest.mark.parametrize(
    "keyword, value",
    [("num_hidden_layers", 2), ("seed", 1.0), ("seed", True), ("weights", True), ("weights", 3)],
)
def test_the_planted_entry_refuses_what_it_cannot_honour(keyword, value):
    with pytest.raises(TTRegError, match=keyword):
        load_tt_model("planted", pretrained=False, **{keyword: value})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "setting, value",
    [
        ("num_test_time_registers", True),  # `True` is an int to Python, not a count
        ("num_test_time_registers", 1.0),
        ("num_test_time_registers", "1"),
        ("num_test_time_registers", np.int64(1)),
        ("register_scale", "2.0"),
        ("register_scale", True),
        ("register_scale", [True]),
        ("register_semantics", 1),
    ],
)
def test_a_register_setting_of_another_type_is_refused_by_every_entry(name, setting, value):
    """Types, not values: refused before anything is built, naming the setting (`huggingface_hub`'s strict config
    validation, as for any `transformers` config field)."""
    entry = entry_points()[checkpoints()[name].entry_name]
    with pytest.raises((TTRegError, StrictDataclassFieldValidationError), match=setting), torch.device("meta"):
        entry(pretrained=False, register_neurons={1: [3]}, **{setting: value})


# item 4: a dual encoder's sub-configs given at load mean what they mean to its parent


@pytest.mark.parametrize(
    "name, model_class",
    [(n, cls) for n, family in FAMILIES.items() for cls in family.model_classes if is_composite(cls)],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_sub_configs_given_at_load_are_taken_as_the_parent_takes_them_by_every_loader(name, model_class, saved):
    """``vision_config=`` / ``text_config=`` as a dict (updates the saved one) or a config (replaces it; one of the
    parent's vision config class is converted): our class and `AutoModel` build what the parent builds."""
    folder = saved(name, model_class)
    parent = parent_class(model_class)
    vision = model_class.config_class.from_pretrained(folder).vision_config.as_parent_config()
    vision.layer_norm_eps = 1e-3
    for given in (
        dict(vision_config={"layer_norm_eps": 1e-3}),
        dict(vision_config=vision),
        dict(text_config={"layer_norm_eps": 1e-3}, vision_config={"hidden_act": "gelu"}),
    ):
        expected = parent.from_pretrained(folder, **given).config
        for loader in (model_class, AutoModel):
            config = loader.from_pretrained(folder, num_test_time_registers=0, **given).config
            for key in ("vision_config", "text_config"):
                ours, theirs = getattr(config, key), getattr(expected, key)
                assert (ours.layer_norm_eps, ours.hidden_act) == (theirs.layer_norm_eps, theirs.hidden_act), key
            assert type(config.vision_config) is model_class.config_class.register_config_class()
            assert config.vision_config.num_test_time_registers == 0


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_lc"])
def test_an_upstream_dinov2_weights_file_loads_in_its_own_dtype_with_auto(name, keyword, tmp_path):
    """``dtype="auto"`` means the weights' dtype, as in `from_pretrained`: the file's, not a refusal that says there
    are no weights."""
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    original = {key: value.bfloat16() for key, value in random_original_state_dict(32, 2, 14, 37).items()}
    save_file(original, tmp_path / "weights.safetensors")
    weights = tmp_path / "weights.safetensors"
    model = load_tt_model(name, pretrained=False, weights=weights, register_neurons={}, **{keyword: "auto"}, **tiny)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.config.dtype == torch.bfloat16
    assert torch.equal(model.embeddings.cls_token, original["cls_token"])
    hub_model = entry_points()[checkpoints()[name].entry_name](
        pretrained=False, weights=weights, register_neurons={}, **{keyword: "auto"}, **tiny
    )
    assert {p.dtype for p in hub_model.parameters()} == {torch.bfloat16}


# item 13's neighbour: a host loaded by its class or its Auto class takes the register settings as our towers do


def saved_host(name: str, folder):
    """A tiny host ``name`` of `host_models`, upgraded (its tower ours, edit off) and saved to ``folder``."""
    if name in BACKBONE_HOSTS:
        host_class, config, fields, _ = BACKBONE_HOSTS[name]
        parent = host_class(config(tiny_backbone_config(False, **fields)))
    else:
        parent, _ = getattr(host_models, name)()
    host = to_test_time_registers(parent, register_neurons={}, num_test_time_registers=1)
    host.save_pretrained(folder)
    return type(host)


@pytest.mark.parametrize("name", [*BACKBONE_HOSTS, "llava", "llava_next", "llava_onevision"])
def test_a_host_loaded_by_its_class_or_its_auto_class_takes_the_register_settings(name, tmp_path):
    host_class = saved_host(name, tmp_path)
    auto_class = getattr(transformers, next(iter(AUTO_CLASS_NAMES[host_class])))
    settings = dict(register_neurons={1: [3, 5]}, num_test_time_registers=2, register_scale=[2.0, 3.0])
    for loader in (host_class, auto_class):
        model = loader.from_pretrained(tmp_path, **settings)
        tower = vision_tower_with_registers(model)
        assert type(model) is host_class and tower.config is model.config.register_config
        assert (tower.config.register_neurons, tower.config.register_scale) == ({"1": [3, 5]}, [2.0, 3.0])
        assert tower.token_layout.num_registers == 2
        assert not set(REGISTER_SETTINGS) & set(vars(model.config))
        baseline = loader.from_pretrained(tmp_path, num_test_time_registers=0)
        assert vision_tower_with_registers(baseline).token_layout.num_registers == 0
    given = host_class.config_class.from_pretrained(tmp_path)  # a config given is copied, as the parent copies it
    before = given.to_dict()
    model = host_class.from_pretrained(tmp_path, config=given, **settings)
    assert vision_tower_with_registers(model).token_layout.num_registers == 2 and given.to_dict() == before
    other = "pool_registers" if name in BACKBONE_HOSTS else "position_interpolation"  # another family's setting
    with pytest.raises(TTRegTypeError, match=f"unexpected keyword argument '{other}'"):
        host_class.from_pretrained(tmp_path, **{other: "upstream" if other == "position_interpolation" else True})
