"""`ttreg evaluate MODEL DATA --tasks zero-shot`, end to end and offline: tiny CLIP, SigLIP, SigLIP2 and open_clip
dual encoders saved to folders as their libraries save them (with a tokenizer built here), their zero-shot accuracy
recomputed by hand (the argmax of cosine similarities between image and prompt embeddings), and what is refused."""

import json

import open_clip
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from ttreg_cli import main
from ttreg_hf import CLIPTTRegModel, Siglip2TTRegModel, SiglipTTRegModel
from ttreg_hf.analysis import with_register_neurons
from ttreg_hf.index import RegisterNeuronIndex
from ttreg_hf.modeling.open_clip import create_model_and_transforms
from ttreg_hf.planted import textured_images

from family_models import HF, LAYER, MLP, NAFLEX, NEURONS, SIZE
from support import save_as_parent_checkpoint

CLASSES = ("cat", "dog", "red_fox")  # folder names; "red_fox" is prompted as "red fox"
TEMPLATE = "an image of a {}."
WORDS = ("a", "an", "photo", "image", "of", ".", "cat", "dog", "red", "fox")
EOS = 3  # not 2: CLIP's text model reads an end token of id 2 as its legacy "highest id" pooling
TEXT = dict(  # as wide as the image tower: SigLIP compares the two towers' outputs unprojected
    hidden_size=HF["hidden_size"], intermediate_size=MLP, num_hidden_layers=1, num_attention_heads=2, vocab_size=40,
    max_position_embeddings=32, eos_token_id=EOS, pad_token_id=0,
)  # fmt: skip


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of the prompts' words that ends each prompt with its end token, as a `transformers`
    tokenizer saves and `AutoTokenizer` loads: what a checkpoint folder ships, built offline."""
    vocab = {word: i for i, word in enumerate(("[PAD]", "[UNK]", "[UNUSED]", "[EOS]", *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", EOS)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", model_max_length=32
    )


def siglip2_tokenizer() -> transformers.Siglip2Tokenizer:
    """SigLIP2's own tokenizer class (`AutoTokenizer` builds it for any SigLIP2 folder) on a vocabulary of characters,
    no merges: one token per character."""
    characters = sorted(set("".join(WORDS)) | {"▁"})
    vocab = {token: i for i, token in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *characters))}
    return transformers.Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=32)


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    for i, name in enumerate(CLASSES):  # unequal counts: a prompt matched to the wrong class shows
        (root / name).mkdir()
        for j, image in enumerate(textured_images(1 + 2 * i, seed=20 + i, size=SIZE, uniform_regions=i != 1)):
            Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(root / name / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def index_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("index") / "index.safetensors"
    return RegisterNeuronIndex({LAYER: list(NEURONS)}, num_layers=HF["num_hidden_layers"], mlp_width=MLP).save(path)


TRANSFORMERS = {  # the dual encoder, the image processor and the tokenizer its checkpoint ships
    "clip": (
        lambda: CLIPTTRegModel(
            transformers.CLIPConfig(vision_config={**HF, "intermediate_size": MLP}, text_config=TEXT)
        ),
        transformers.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=SIZE),
        word_tokenizer,
    ),
    "siglip": (
        lambda: SiglipTTRegModel(
            transformers.SiglipConfig(vision_config={**HF, "intermediate_size": MLP}, text_config=TEXT)
        ),
        transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}),
        word_tokenizer,
    ),
    "siglip2": (
        lambda: Siglip2TTRegModel(
            transformers.Siglip2Config(vision_config={**NAFLEX, "intermediate_size": MLP}, text_config=TEXT)
        ),
        transformers.Siglip2ImageProcessor(patch_size=NAFLEX["patch_size"], max_num_patches=NAFLEX["num_patches"]),
        siglip2_tokenizer,
    ),
}


def hand_accuracy(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    images = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
    texts = text_embeddings / text_embeddings.norm(dim=-1, keepdim=True)
    return float(((images @ texts.T).argmax(dim=-1) == labels).double().mean())


def labelled(class_folders) -> tuple[list[Image.Image], torch.Tensor]:
    paths = [path for name in CLASSES for path in sorted((class_folders / name).glob("*.png"))]
    return [Image.open(path).convert("RGB") for path in paths], torch.tensor(
        [CLASSES.index(p.parent.name) for p in paths]
    )


def run_cli(spec: str, class_folders, index_file, out) -> dict:
    argv = ["evaluate", spec, str(class_folders), "--tasks", "outliers,zero-shot", "--template", TEMPLATE]
    argv += ["--index", str(index_file), "--out-dir", str(out), "--resamples", "20", "--no-figure"]
    assert main(argv) == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["settings"]["tasks"] == ["outliers", "zero-shot"] and data["settings"]["template"] == TEMPLATE
    assert data["data"]["classes"] == list(CLASSES)
    return data["tasks"]["zero_shot_accuracy"]


@pytest.mark.parametrize("family", sorted(TRANSFORMERS))
def test_zero_shot_from_the_cli_on_a_transformers_dual_encoder(family, class_folders, index_file, tmp_path, capsys):
    """Saved as `transformers` saves the parent (`CLIPModel`, ...), with the checkpoint's image processor and
    tokenizer; recomputed here with the checkpoint's processor, tokenizer and the package's class."""
    build, processor, tokenizer = TRANSFORMERS[family]
    torch.manual_seed(0)
    folder = tmp_path / "model"
    save_as_parent_checkpoint(build().eval(), folder)
    processor.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    accuracy = run_cli(str(folder), class_folders, index_file, tmp_path / "out")
    assert "zero_shot_accuracy" in capsys.readouterr().out

    model = type(build()).from_pretrained(folder, register_neurons=str(index_file)).eval()
    images, labels = labelled(class_folders)
    pixels = transformers.AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt")
    prompts = [TEMPLATE.format(name.replace("_", " ")) for name in CLASSES]
    tokens = transformers.AutoTokenizer.from_pretrained(folder)(prompts, padding="max_length", return_tensors="pt")
    assert len(set(map(tuple, tokens["input_ids"].tolist()))) == 3
    for neurons, expected in (({}, accuracy["off"]), (None, accuracy["on"])):
        with torch.no_grad(), with_register_neurons(model, neurons):
            image_embeddings = model.get_image_features(**pixels).pooler_output
            text_embeddings = model.get_text_features(**tokens).pooler_output
        assert expected == pytest.approx(hand_accuracy(image_embeddings, text_embeddings, labels))


OPEN_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=SIZE, layers=HF["num_hidden_layers"], width=HF["hidden_size"], patch_size=HF["patch_size"],
                    head_width=HF["hidden_size"] // HF["num_attention_heads"], mlp_ratio=MLP / HF["hidden_size"]),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),  # open_clip's own BPE tokenizer
)  # fmt: skip


def test_zero_shot_from_the_cli_on_an_open_clip_folder(class_folders, index_file, tmp_path):
    """An open_clip ``local-dir:`` folder, tokenized by ``open_clip.get_tokenizer``; recomputed here with open_clip's
    own preprocessing and tokenizer of that folder."""
    folder = tmp_path / "open_clip"
    folder.mkdir()
    torch.manual_seed(0)
    model = open_clip.CLIP(OPEN_CLIP["embed_dim"], OPEN_CLIP["vision_cfg"], OPEN_CLIP["text_cfg"])
    config = {"model_cfg": OPEN_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    accuracy = run_cli(f"local-dir:{folder}", class_folders, index_file, tmp_path / "out")

    model, _, preprocess = create_model_and_transforms(f"local-dir:{folder}", register_neurons=str(index_file))
    images, labels = labelled(class_folders)
    pixels = torch.stack([preprocess(image) for image in images])
    text = open_clip.get_tokenizer(f"local-dir:{folder}")([TEMPLATE.format(c.replace("_", " ")) for c in CLASSES])
    for neurons, expected in (({}, accuracy["off"]), (None, accuracy["on"])):
        with torch.no_grad(), with_register_neurons(model.eval(), neurons):
            image_embeddings, text_embeddings = model.encode_image(pixels), model.encode_text(text)
        assert expected == pytest.approx(hand_accuracy(image_embeddings, text_embeddings, labels))


def test_zero_shot_refuses_a_model_without_a_text_tower_or_tokenizer(class_folders, index_file, tmp_path, capsys):
    tower = tmp_path / "tower"  # a CLIP vision tower alone, as CLIPVisionModel saves it
    save_as_parent_checkpoint(TRANSFORMERS["clip"][0]().vision_model, tower)
    no_tokenizer = tmp_path / "no_tokenizer"  # a whole CLIP without its tokenizer
    save_as_parent_checkpoint(TRANSFORMERS["clip"][0](), no_tokenizer)
    capsys.readouterr()
    for spec, reason in (
        (
            "planted",
            "zero-shot needs a dual encoder with its text tower and tokenizer: a CLIP, SigLIP or SigLIP2 "
            "checkpoint (Hub id or folder) or an open_clip model; 'planted' is a vision tower.",
        ),
        (
            str(tower),
            f"zero-shot needs a dual encoder with its text tower and tokenizer: a CLIP, SigLIP or SigLIP2 "
            f"checkpoint (Hub id or folder) or an open_clip model; '{tower}' is a 'clip_vision_model' checkpoint without "
            "a text tower.",
        ),
        (str(no_tokenizer), "The tokenizer gives the prompts of the classes 'cat' and 'dog' the same tokens"),
    ):  # fmt: skip  (transformers builds an empty CLIPTokenizer for a folder without one: every word unknown)
        argv = ["evaluate", spec, str(class_folders), "--tasks", "zero-shot", "--out-dir", str(tmp_path / "out")]
        argv += ["--index", str(index_file)]
        assert main(argv) == 2
        err = capsys.readouterr().err  # after transformers' progress bar, if it loaded weights: one line
        assert err.count("ttreg: error: ") == 1 and err.endswith("\n") and f"ttreg: error: {reason}" in err, err
        assert "\n" not in err[err.index("ttreg: error: ") : -1], err
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_unknown_tasks_and_templates_naming_the_choices(class_folders, tmp_path, capsys):
    argv = ["evaluate", "planted", str(class_folders), "--out-dir", str(tmp_path / "out")]
    assert main([*argv, "--tasks", "outliers,zeroshot"]) == 2
    err = capsys.readouterr().err
    assert "Unknown task(s) 'zeroshot'; tasks are outliers, knn, linear, zero-shot, lost, segmentation." in err
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--tasks", "zero-shot", "--template", "a photo"])
    assert exit_.value.code == 2 and "has no {} where the class name goes" in capsys.readouterr().err
    assert main([*argv, "--template", "a {}"]) == 2
    assert "add zero-shot to --tasks" in capsys.readouterr().err
