"""Zero-shot classification for dual encoders: `transformers`' CLIP / SigLIP / SigLIP2 models and open_clip's CLIP
models, with their tokenizer and a prompt template; the image embedding runs the model's register tower inside."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

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
    """The test-time-register vision tower of ``model``: itself, an open_clip model's ``visual``, or a `transformers`
    dual encoder's vision model."""
    if hasattr(model, "get_text_features"):
        from ..modeling.registers import vision_tower_with_registers

        model = vision_tower_with_registers(model)
    tower = getattr(model, "visual", model)
    if not isinstance(tower, TestTimeRegisterMixin):
        raise TTRegTypeError(
            f"{type(tower).__name__} has no test-time registers: load the model with ttreg_hf (a ttreg_hf class, "
            "`to_test_time_registers`, or ttreg_hf.modeling.open_clip.create_model_and_transforms)."
        )
    return tower


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
        text = model.encode_text(tokenizer(prompts).to(device))

        def embed_images(inputs: dict) -> torch.Tensor:
            return model.encode_image(inputs["pixel_values"])

    elif hasattr(model, "get_text_features"):
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
