"""Key capture (``run_with_cache(keys=...)``, what LOST reads) for every family: the captured keys are the ones the
attention maps are made of."""

import pytest
import torch
from PIL import Image

from ttreg_hf.analysis import run_with_cache
from ttreg_hf.planted import textured_images
from ttreg_hf.registry import families

from family_models import SIZE, TINY, planted


def unexplained(keys: torch.Tensor, attention: torch.Tensor) -> float:
    """How much of the attention's log-probabilities the keys leave unexplained, per head.

    ``log p[i, j] - log p[i, 0] = scaling * q_i . (k_j - k_0)``: each query's row of log-probability differences is a
    linear function of the key differences, so least squares over ``q_i`` fits it exactly when ``keys`` ``(tokens,
    heads * head_dim)`` are the attention's (``(heads, tokens, tokens)``) and leaves a residual otherwise."""
    heads = attention.shape[0]
    keys = keys.double().unflatten(-1, (heads, -1)).transpose(0, 1)
    log_probabilities = attention.double().log()
    differences = (log_probabilities[:, :, 1:] - log_probabilities[:, :, :1]).transpose(1, 2)
    key_differences = keys[:, 1:] - keys[:, :1]
    queries = torch.linalg.lstsq(key_differences, differences).solution
    return float((key_differences @ queries - differences).norm() / differences.norm())


def one_image(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    image = textured_images(1, seed=3, size=SIZE)
    if name != "siglip2":
        return {"pixel_values": (image - 0.5) / 0.25}
    picture = Image.fromarray((image[0].permute(1, 2, 0) * 255).byte().numpy())
    processor = next(f for f in families() if f.name == "siglip2").default_image_processor(model.config)
    return dict(processor([picture], return_tensors="pt"))


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_captured_keys_make_the_attention_maps(name):
    model = planted(name)
    inputs = one_image(name, model)
    _, cache = run_with_cache(model, keys=[0, -1], attentions=[0, -1], **inputs)
    last = len(model.transformer_blocks) - 1
    assert sorted(cache.keys) == [0, last]
    for layer in (0, last):
        keys, attention = cache.keys[layer][0], cache.attentions[layer][0]
        assert keys.shape[0] == attention.shape[-1]  # every token, the registers too
        assert unexplained(keys, attention) < 1e-4
    keys, attention = cache.keys[0][0], cache.attentions[0][0]  # before the planted sink, which every head shares
    assert unexplained(keys.roll(keys.shape[-1] // attention.shape[0], dims=-1), attention) > 1e-2  # heads swapped
