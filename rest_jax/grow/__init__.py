"""Grow: decoding loop, sampler, memory plan, the Grow step and the Grow dataset."""
