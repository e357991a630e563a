"""The checks every config dataclass runs in ``__post_init__``."""

from __future__ import annotations

from rest_jax.errors import RestJaxError


def require(ok: bool, message: str) -> None:
  """Raises RestJaxError(message) unless ``ok``."""
  if not ok:
    raise RestJaxError(message)


def one_of(what: str, value: str, choices: tuple[str, ...]) -> None:
  """Raises RestJaxError unless ``value`` is one of ``choices`` (naming them)."""
  require(value in choices, f"{what} {value!r} is unknown; use one of {choices}.")
