"""Parallelism: the Layout and its rules table, meshes, multi-host runtime, topologies, compile check."""
