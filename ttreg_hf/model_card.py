"""The README model card of an exported model: what it is, its index and provenance, usage, licence, citation."""

from string import Template

from huggingface_hub import ModelCard, ModelCardData

from .index import METADATA_KEY, RegisterNeuronIndex

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
BASE_LICENCES = {
    **dict.fromkeys(
        ("facebook/dinov2-small", "facebook/dinov2-base", "facebook/dinov2-large", "facebook/dinov2-giant"),
        "apache-2.0",
    ),
    **dict.fromkeys(
        (
            "openai/clip-vit-base-patch32",
            "openai/clip-vit-base-patch16",
            "openai/clip-vit-large-patch14",
            "openai/clip-vit-large-patch14-336",
            "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
            "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
            "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            "laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
            "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
        ),
        "mit",
    ),
}
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

| layer (0-based) | MLP neurons |
|---|---|
$neuron_rows

- register neurons: $num_neurons; edit semantics: `$semantics`; test-time registers: $num_registers
- made for: $made_for (${num_layers} layers, MLP width ${mlp_width}); image size: $image_size
- source: $source
$details
The index is stored in `config.json` (`register_neurons`) and in the `$metadata_key` metadata of `model.safetensors`.

## Usage

With `transformers` alone:

```python
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("$repo_id")
model = AutoModel.from_pretrained("$repo_id", trust_remote_code=True)
outputs = model(**processor(images=image, return_tensors="pt"))
outputs.last_hidden_state, outputs.test_time_registers  # the registers, stripped from the tokens
```

With the `ttreg_hf` package installed, no remote code is needed:

```python
from ttreg_hf import $model_class

model = $model_class.from_pretrained("$repo_id")
```

Switch the register off (the base model's outputs, exactly) with `num_test_time_registers=0`:

```python
model = AutoModel.from_pretrained("$repo_id", trust_remote_code=True, num_test_time_registers=0)
```

## Licence

$licence_text

## Citation

```bibtex
$bibtex
```
""")


def render_model_card(
    model, index: RegisterNeuronIndex, *, base_model: str | None, license: str | None, repo_id: str
) -> str:
    """The card's text: YAML metadata for the Hub, then the body above."""
    license = license or BASE_LICENCES.get(base_model or "")
    base_name = base_model or "the base checkpoint"
    data = ModelCardData(
        license=license,
        library_name="transformers",
        base_model=base_model,
        pipeline_tag="image-feature-extraction",
        tags=["vision", "test-time-registers", "ttreg_hf"],
    )
    made_for = ", ".join(f"{key}: `{value}`" for key, value in index.checkpoints.items()) or "not recorded"
    details = "".join(f"- {key}: {value}\n" for key, value in index.details.items())
    body = BODY.substitute(
        title=f"{base_name} with test-time registers",
        base_link=f"`{base_model}`" if base_model else "A pretrained vision transformer",
        base_url=f"https://huggingface.co/{base_model}" if base_model else PAPER_URL,
        paper=PAPER_URL,
        num_registers=model.config.num_test_time_registers,
        neuron_rows="\n".join(f"| {layer} | {', '.join(map(str, ids))} |" for layer, ids in index.neurons.items()),
        num_neurons=index.num_neurons,
        semantics=model.config.register_semantics,
        made_for=made_for,
        num_layers=index.num_layers,
        mlp_width=index.mlp_width,
        image_size=index.image_size or "not recorded",
        source=index.source or "not recorded",
        details=details,
        metadata_key=METADATA_KEY,
        repo_id=repo_id,
        model_class=type(model).__name__,
        licence_text=(
            f"The weights are {base_name}'s, under its licence: `{license}`."
            if license
            else f"The weights are {base_name}'s: for their licence, {UNKNOWN_LICENCE}."
        ),
        bibtex=BIBTEX,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
