"""Zero-shot classification for dual encoders: `transformers`' CLIP / SigLIP / SigLIP2 models and open_clip's CLIP
models, with their tokenizer and a prompt template; the image embedding runs the model's register tower inside."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..analysis.towers import register_tower
from ..errors import TTRegTypeError, TTRegValueError
from ..modeling.registers import TestTimeRegisterMixin

TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class ZeroShotClassifier:
    """tower: the model's vision tower with test-time registers (what `evaluate` measures and switches).
    embed_images: ``embed_images(inputs)`` -> ``(batch, dim)`` image embeddings of the whole model (its tower inside).
    class_embeddings: ``(classes, dim)`` embeddings of the class prompts, normalized."""

    tower: TestTimeRegisterMixin
    embed_images: Callable[[dict], torch.Tensor]
    class_embeddings: torch.Tensor

    def predict(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The class whose prompt embedding is the most cosine-similar to each image embedding."""
        images = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
        return (images @ self.class_embeddings.T.to(images.device)).argmax(dim=-1)


def vision_tower(model: torch.nn.Module) -> TestTimeRegisterMixin:
    """The test-time-register vision tower of ``model``: itself, or the one inside it (`register_tower`: an open_clip
    model's ``visual``, a dual encoder's vision model, a classifier's or a VLM's tower, ...)."""
    try:
        return register_tower(model)
    except ValueError as error:
        raise TTRegTypeError(str(error)) from None


def _check_distinct(tokens, classes: Sequence[str]) -> None:
    """Refuse prompts that tokenize alike (e.g. by a tokenizer without a vocabulary, every word unknown): the model
    could not tell their classes apart. ``tokens``: token ids (a tensor or lists), or a tokenizer's output holding
    them (``input_ids``)."""
    token_ids = tokens["input_ids"] if isinstance(tokens, Mapping) else tokens
    token_ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
    seen = {}
    for name, ids in zip(classes, token_ids):
        if tuple(ids) in seen:
            raise TTRegValueError(
                f"The tokenizer gives the prompts of the classes {seen[tuple(ids)]!r} and {name!r} the same tokens, so "
                "zero-shot cannot tell them apart: use the model's own tokenizer (one with its vocabulary), a template "
                "short enough to leave room for the class name, and class folders named apart."
            )
        seen[tuple(ids)] = name


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module, tokenizer: Callable, classes: Sequence[str], template: str = TEMPLATE
) -> ZeroShotClassifier:
    """The zero-shot classifier of ``model`` for ``classes`` (folder names; ``_`` read as spaces) prompted with
    ``template``: a `transformers` dual encoder with test-time registers (`CLIPTTRegModel`, `SiglipTTRegModel`,
    ...) and its tokenizer (prompts padded to the maximum length, as SigLIP was trained), or an open_clip model with
    test-time registers and ``open_clip.get_tokenizer(name)``."""
    if "{}" not in template:
        raise TTRegValueError(f"The prompt template must hold '{{}}' where the class name goes, got {template!r}.")
    prompts = [template.format(name.replace("_", " ")) for name in classes]
    device = next(model.parameters()).device
    if hasattr(model, "encode_text"):  # open_clip
        tokens = tokenizer(prompts)
        _check_distinct(tokens, classes)
        text = model.encode_text(tokens.to(device))

        def embed_images(inputs: dict) -> torch.Tensor:
            return model.encode_image(inputs["pixel_values"])

    elif hasattr(model, "get_text_features"):
        _check_distinct(tokenizer(prompts, truncation=True), classes)  # unpadded: a tokenizer without a vocabulary
        tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(device)
        text = model.get_text_features(**tokens).pooler_output

        def embed_images(inputs: dict) -> torch.Tensor:
            return model.get_image_features(**inputs).pooler_output

    else:
        raise TTRegTypeError(
            f"{type(model).__name__} is not a dual encoder: zero-shot needs a CLIP / SigLIP model with its text tower "
            "(get_text_features) or an open_clip CLIP model (encode_text)."
        )
    return ZeroShotClassifier(vision_tower(model), embed_images, torch.nn.functional.normalize(text.float(), dim=-1))
