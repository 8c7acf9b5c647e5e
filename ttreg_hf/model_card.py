"""Model cards: an exported model's (what it is, its index and provenance, usage, licence, citation), for the
`transformers` families and for OpenCLIP, and an index repository's (`RegisterNeuronIndex.push_to_hub`). All describe
the index with `index_section`."""

import dataclasses
from string import Template

from huggingface_hub import ModelCard, ModelCardData

from .family import parent_class
from .index import INDEX_FILENAME, METADATA_KEY, RegisterNeuronIndex
from .registry import licence_of
from .remote_code import remote_auto_map

PAPER_URL = "https://arxiv.org/abs/2506.08010"
BIBTEX = """@misc{jiang2025visiontransformersdontneed,
  title={Vision Transformers Don't Need Trained Registers},
  author={Nick Jiang and Amil Dravid and Alexei Efros and Yossi Gandelsman},
  year={2025},
  eprint={2506.08010},
  archivePrefix={arXiv},
  primaryClass={cs.CV},
  url={https://arxiv.org/abs/2506.08010},
}"""
UNKNOWN_LICENCE = "see the base checkpoint"

BODY = Template("""
# $title

[$base_link]($base_url) with **test-time registers**, from
["Vision Transformers Don't Need Trained Registers"]($paper) (Jiang, Dravid, Efros, Gandelsman, 2025). The weights are
the base checkpoint's, unchanged. At inference $num_registers zero-initialised token(s) are appended after the patch
tokens, and the activations of the register neurons listed below are moved onto them: the high-norm outlier tokens
go away without retraining. Outputs keep the base model's shapes; the registers are returned on their own in
`test_time_registers`.

## Register-neuron index

$index_section
The index is stored in `config.json` (`register_neurons`), in the `$metadata_key` metadata of `model.safetensors`, and
alone in `$index_file`: this repository is also an index repo id (`register_neurons="$repo_id"` of any `ttreg_hf` loader).

## Usage

With `transformers` alone:

```python
from transformers import $auto_class, AutoImageProcessor

processor = AutoImageProcessor.from_pretrained("$repo_id")
model = $auto_class.from_pretrained("$repo_id", trust_remote_code=True)
outputs = model(**processor(images=image, return_tensors="pt"))
$outputs_line
```

With the `ttreg_hf` package installed, no remote code is needed:

```python
from ttreg_hf import $model_class

model = $model_class.from_pretrained("$repo_id")
```

Switch the register off (the base model's outputs, exactly) with `num_test_time_registers=0`:

```python
model = $auto_class.from_pretrained("$repo_id", trust_remote_code=True, num_test_time_registers=0)
```

## Licence

$licence_text

## Citation

```bibtex
$bibtex
```
""")


INDEX_SECTION = Template("""| layer (0-based) | MLP neurons |
|---|---|
$neuron_rows

- register neurons: $num_neurons; edit semantics: `$semantics`$registers
- made for: $made_for (${num_layers} layers, MLP width ${mlp_width}); image size: $image_size
- source: $source
$details""")
# how discovery found it (`find_register_neurons`' details), in words; other details are listed as they are
FOUND_WITH = {
    "threshold": lambda d: (
        f"threshold: {d['threshold']:g}" + (f" ({d['threshold_rule']})" if "threshold_rule" in d else "")
    ),
    "num_eval_images": lambda d: (
        _outlier_ratios(d, f"the {d['num_eval_images']} evaluation images")
        if d["num_eval_images"]
        else "outlier ratio: not measured (no evaluation images)"  # whatever ratios an older version recorded
    ),
    "eval_outlier_ratio_before": lambda d: _outlier_ratios(d, "the evaluation images"),
    "package_version": lambda d: f"found with ttreg_hf {d['package_version']}",
}
SHOWN_WITH = {
    "threshold_rule": "threshold",
    "eval_outlier_ratio_before": "num_eval_images",
    "eval_outlier_ratio_after": "eval_outlier_ratio_before",
}


def _outlier_ratios(details: dict, images: str) -> str:
    return (
        f"outlier tokens on {images}: {100 * details['eval_outlier_ratio_before']:.2f} % before, "
        f"{100 * details['eval_outlier_ratio_after']:.2f} % with the edit"
    )


def index_section(index: RegisterNeuronIndex, *, semantics: str, num_registers: int | None = None) -> str:
    """The index in a card: its neurons as a table, then where it applies and how it was found (its provenance)."""
    details = []
    for key, value in index.details.items():
        if SHOWN_WITH.get(key) in index.details:
            continue
        if key in FOUND_WITH:
            try:
                details.append(FOUND_WITH[key](index.details))
                continue
            except (KeyError, TypeError, ValueError):  # a value missing or of an unexpected type: shown as it is
                pass
        details.append(f"{key}: {value}")
    return INDEX_SECTION.substitute(
        neuron_rows="\n".join(f"| {layer} | {', '.join(map(str, ids))} |" for layer, ids in index.neurons.items()),
        num_neurons=index.num_neurons,
        semantics=semantics,
        registers="" if num_registers is None else f"; test-time registers: {num_registers}",
        made_for=", ".join(f"{key}: `{value}`" for key, value in index.checkpoints.items()) or "not recorded",
        num_layers=index.num_layers,
        mlp_width=index.mlp_width,
        image_size=f"{index.image_size} px" if index.image_size else "not recorded",
        source=index.source or "not recorded",
        details="".join(f"- {line}\n" for line in details),
    )


def render_model_card(
    model, index: RegisterNeuronIndex, *, base_model: str | None, license: str | None, repo_id: str
) -> str:
    """The card's text: YAML metadata for the Hub, then the body above."""
    license, licence_text = _licence(base_model, license)
    config = model.config.register_config  # a dual encoder's is its vision config
    auto_class = next(name for name in remote_auto_map(type(model)) if name != "AutoConfig")
    parent = parent_class(type(model)).__name__
    outputs_line = (
        "outputs.last_hidden_state, outputs.test_time_registers  # the registers, stripped from the tokens"
        if hasattr(model, "register_seams")
        else f"# what {parent} returns, from a vision tower with test-time registers"
    )
    base_name = base_model or "the base checkpoint"
    data = ModelCardData(
        license=license,
        library_name="transformers",
        base_model=base_model,
        pipeline_tag="image-feature-extraction",
        tags=["vision", "test-time-registers", "ttreg_hf"],
    )
    body = BODY.substitute(
        title=f"{base_name} with test-time registers",
        base_link=f"`{base_model}`" if base_model else "A pretrained vision transformer",
        base_url=f"https://huggingface.co/{base_model}" if base_model else PAPER_URL,
        paper=PAPER_URL,
        num_registers=config.num_test_time_registers,
        index_section=index_section(
            index, semantics=config.register_semantics, num_registers=config.num_test_time_registers
        ),
        metadata_key=METADATA_KEY,
        index_file=INDEX_FILENAME,
        repo_id=repo_id,
        model_class=type(model).__name__,
        auto_class=auto_class,
        outputs_line=outputs_line,
        licence_text=licence_text,
        bibtex=BIBTEX,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _licence(base_model: str | None, license: str | None) -> tuple[str | None, str]:
    """The licence tag (``license``, else the known one of ``base_model``) and the card's sentence about it."""
    license = license or licence_of(base_model or "")
    base_name = base_model or "the base checkpoint"
    if license:
        return license, f"The weights are {base_name}'s, under its licence: `{license}`."
    return None, f"The weights are {base_name}'s: for their licence, {UNKNOWN_LICENCE}."


OPEN_CLIP_BODY = Template("""
# $title

[$base_link]($base_url) with **test-time registers**, from
["Vision Transformers Don't Need Trained Registers"]($paper) (Jiang, Dravid, Efros, Gandelsman, 2025), in open_clip's
own layout: `$config_file` (the model config open_clip builds it from, and the preprocessing) and `$weights_file`
(the whole CLIP model's weights, the base checkpoint's, unchanged). At inference $num_registers zero-initialised
token(s) are appended after the patch tokens of the image tower, and the activations of the register neurons listed
below are moved onto them: the high-norm outlier tokens go away without retraining. Outputs keep open_clip's shapes.

## Register-neuron index

$index_section
The index is `$index_file` (JSON in the header of a safetensors file, no tensors): this repository is also an index
repo id (`register_neurons="$repo_id"` of any `ttreg_hf` loader).

## Usage

With the `ttreg_hf` package installed, the index in this repository is found by default:

```python
from ttreg_hf.modeling.open_clip import create_model_and_transforms

model, _, preprocess = create_model_and_transforms("hf-hub:$repo_id"$settings)
image_features = model.encode_image(preprocess(image).unsqueeze(0))
```

With open_clip alone, the same weights load as the base model, without test-time registers (what
`num_test_time_registers=0` gives with `ttreg_hf`):

```python
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:$repo_id")
tokenizer = open_clip.get_tokenizer("hf-hub:$repo_id")
```

## Licence

$licence_text

## Citation

```bibtex
$bibtex
```
""")


def render_open_clip_card(
    config,
    index: RegisterNeuronIndex,
    *,
    base_model: str | None,
    license: str | None,
    repo_id: str,
    config_file: str,
    weights_file: str,
) -> str:
    """The card of an OpenCLIP export in open_clip's layout (``config_file``, ``weights_file``). ``config`` is the
    vision tower's `TestTimeRegisterConfig`: its settings that the index does not carry and that differ from the
    defaults go into the usage example."""
    license, licence_text = _licence(base_model, license)
    base_name = base_model or "the base checkpoint"
    data = ModelCardData(
        license=license,
        library_name="open_clip",
        base_model=base_model,
        pipeline_tag="zero-shot-image-classification",
        tags=["clip", "vision", "test-time-registers", "ttreg_hf"],
    )
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    defaults["register_semantics"] = index.semantics  # the index file carries it
    settings = {
        name: getattr(config, name)
        for name in ("num_test_time_registers", "register_scale", "register_semantics", "register_patch_mode")
        if getattr(config, name) != defaults[name]
    }
    body = OPEN_CLIP_BODY.substitute(
        title=f"{base_name} with test-time registers",
        base_link=f"`{base_model}`" if base_model else "An OpenCLIP model",
        base_url=f"https://huggingface.co/{base_model}" if base_model else PAPER_URL,
        paper=PAPER_URL,
        config_file=config_file,
        weights_file=weights_file,
        num_registers=config.num_test_time_registers,
        index_section=index_section(
            index, semantics=config.register_semantics, num_registers=config.num_test_time_registers
        ),
        index_file=INDEX_FILENAME,
        repo_id=repo_id,
        settings="".join(f", {name}={value!r}" for name, value in settings.items()),
        licence_text=licence_text,
        bibtex=BIBTEX,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


INDEX_TAGS = ["ttreg-index", "test-time-registers", "register-neurons", "ttreg_hf", "vision"]
INDEX_BODY = Template("""
# Register-neuron index for $base_name

Which MLP neurons of $base_link write its high-norm outlier tokens. With this index,
[test-time registers]($paper) ("Vision Transformers Don't Need Trained Registers", Jiang, Dravid, Efros, Gandelsman,
2025) move those activations onto an extra token at inference and the outliers go away, without retraining. The index
is `$filename`, a few kB: JSON in the header of a safetensors file (no tensors, no code). The weights stay in their own
repository; this one holds only the index and this card.

## Usage

```python
$usage
```

Every `ttreg_hf` loader takes `register_neurons="$repo_id"` (`"$repo_id@REVISION"` for a branch, tag or commit), and
so does `model.set_register_neurons(...)`; on the command line, `ttreg inspect MODEL IMAGE --index $repo_id`. It is
downloaded once through the Hugging Face cache, so it also loads offline (`HF_HUB_OFFLINE=1`) afterwards. A model of
another depth or MLP width refuses it; another checkpoint, other weights, or an image size far from $image_size warn.

## Register-neuron index

$index_section
## Citation

```bibtex
$bibtex
```
""")


def render_index_card(index: RegisterNeuronIndex, repo_id: str) -> str:
    """The card of an index repository, generated from the index's provenance: metadata tags that find it
    (``ttreg-index``, the ``base_model`` when it records a Hub checkpoint id), usage, the index, the citation."""
    from .hub import MODEL_NAMES  # the names `ttreg find-neurons` records as "hub"

    base_model = index.checkpoints.get("hf")
    hub_name = index.checkpoints.get("hub")
    data = ModelCardData(library_name="ttreg_hf", base_model=base_model, tags=INDEX_TAGS)
    if hub_name in MODEL_NAMES:
        usage = f'from ttreg_hf.hub import load_tt_model\n\nmodel = load_tt_model("{hub_name}", register_neurons="{repo_id}")'
    base_name = base_model or hub_name or "a vision transformer"
    if hub_name not in MODEL_NAMES:
        usage = f'model.set_register_neurons("{repo_id}")  # any ttreg_hf model of {base_name}'
    body = INDEX_BODY.substitute(
        base_name=base_name,
        base_link=f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else f"`{base_name}`",
        paper=PAPER_URL,
        filename=INDEX_FILENAME,
        usage=usage,
        repo_id=repo_id,
        image_size=f"{index.image_size} px" if index.image_size else "the one it was found at",
        index_section=index_section(index, semantics=index.semantics),
        bibtex=BIBTEX,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
