"""The `rest-jax` command line: argument parsing and the commands (the only gin user)."""
