"""Fine-tuning with PEFT LoRA through the edit: gradients, the adapter file, reloading and merging.

The classifier comes from one fixture, `build_classifier`: a tiny `Dinov2TTRegForImageClassification` (``dinov2``
tower, ``classifier`` head on the CLS and the mean patch token, registers left out).
"""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ttreg_hf import Dinov2TTRegForImageClassification, RegisterNeuronEdit, to_test_time_registers

from support import tiny_dinov2_config

peft = pytest.importorskip("peft", reason="the LoRA tests need `peft`, a test extra: pip install -e '.[test]'")

NUM_LABELS = 3
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["classifier"])


@pytest.fixture
def build_classifier():
    """Builds the same tiny classifier every call (edit on: 2 registers, neurons in layers 1 and 2)."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        config = tiny_dinov2_config(num_test_time_registers=2, num_labels=NUM_LABELS)
        return Dinov2TTRegForImageClassification(config).eval()

    return build


def _edits(model: nn.Module) -> list[RegisterNeuronEdit]:
    """The edits that are on (every MLP has one; the others are off)."""
    return [module for module in model.modules() if isinstance(module, RegisterNeuronEdit) and module.neuron_ids]


def _lora_model(build_classifier):
    return peft.get_peft_model(build_classifier(), peft.LoraConfig(**LORA))


def test_gradients_reach_the_adapters_through_the_edit(build_classifier, images):
    model = _lora_model(build_classifier)
    assert len(_edits(model)) == 2
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "classifier.modules_to_save" in name for name in trainable)
    assert {name for name in trainable if "lora_A" in name and ".0." in name}  # layer 0: upstream of every edit
    labels = torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    for _ in range(2):  # a step first: LoRA's B starts at zero, and with it every gradient of A
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images).logits, labels).backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    # the gradient is the derivative of the edited model: a central difference along a random direction (float64)
    model.double()
    images = images.double()
    direction = {name: torch.randn_like(p) for name, p in trainable.items()}
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(images).logits, labels)
    loss.backward()
    predicted = sum((p.grad * direction[name]).sum() for name, p in trainable.items())
    losses = []
    with torch.no_grad():
        for sign in (1, -1):
            for name, p in trainable.items():
                p.add_(sign * 1e-6 * direction[name])
            losses.append(nn.functional.cross_entropy(model(images).logits, labels))
            for name, p in trainable.items():
                p.sub_(sign * 1e-6 * direction[name])
    torch.testing.assert_close(predicted, (losses[0] - losses[1]) / 2e-6, rtol=1e-5, atol=1e-8)


def test_the_adapter_file_holds_no_edit_state_and_reloads_to_the_same_outputs(build_classifier, images, tmp_path):
    model = _lora_model(build_classifier)
    with torch.no_grad():  # adapters away from their (identity) initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    for edit in _edits(model):
        assert dict(edit.named_buffers()).keys() == {"neurons", "scale"} and not list(edit.parameters())
    assert not [key for key in model.state_dict() if "register_edit" in key]  # the buffers are not persistent
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {key for key in saved if "lora_" not in key} == {
        f"base_model.model.classifier.{p}" for p in ("weight", "bias")
    }
    reloaded = peft.PeftModel.from_pretrained(build_classifier(), tmp_path).eval()
    assert len(_edits(reloaded)) == 2
    with torch.no_grad():
        expected = model(images).logits
        assert torch.equal(reloaded(images).logits, expected)
        merged = reloaded.merge_and_unload()
        assert type(merged) is Dinov2TTRegForImageClassification and len(_edits(merged)) == 2
        torch.testing.assert_close(merged(images).logits, expected, atol=1e-5, rtol=0)
        assert (build_classifier()(images).logits - expected).abs().max() > 1e-3  # the adapters change the model


def test_adapters_come_after_the_registers():
    """`to_test_time_registers` on a parent classifier already wrapped by LoRA is refused, naming the way round."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)
    parent = Dinov2ForImageClassification(config)
    wrapped = peft.get_peft_model(parent, peft.LoraConfig(**LORA))
    with pytest.raises(TypeError, match=r"q_proj\.base_layer.*give it registers before"):
        to_test_time_registers(wrapped, register_neurons={1: [3]})
    assert type(parent.dinov2).__name__ == "Dinov2Model"
