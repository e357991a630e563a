"""rest_jax: Reinforced Self-Training (ReST) of language models on JAX."""

__version__ = "0.1.0"
