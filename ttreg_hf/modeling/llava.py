"""LLaVA-family models with a test-time-register vision tower, under the names of the first release: `load_llava` is
`load_vlm`, which loads LLaVA, LLaVA-NeXT, LLaVA-OneVision and any VLM whose tower is one of our families' parents."""

from .vlm import load_vlm, vision_tower_with_registers, with_test_time_register_tower

load_llava = load_vlm

__all__ = ["load_llava", "vision_tower_with_registers", "with_test_time_register_tower"]
