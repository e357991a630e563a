"""Benchmarks of Grow sampling and the Improve train step against this machine's limits.

Run ``python -m benchmarks.run --out results.json`` (see docs/benchmarks.md). Imports only the
rest_jax modules that need no seqio / tensorflow / gin, so it runs on a bare JAX+CUDA machine.
"""
