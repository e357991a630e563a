"""Checkpoints: orbax phase checkpoints and conversion to and from HF / T5X."""
