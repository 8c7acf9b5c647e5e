"""Model classes with test-time registers; import them from `ttreg_hf`."""
