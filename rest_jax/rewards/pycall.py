"""Rewards given by import path: ``reward = "py:package.module:function"``.

This runs code: the module is imported from the Python import path (PYTHONPATH, the current
directory, installed packages) and the function is called, in runs and in ``serve-reward``
alike. Whoever can set ``RunConfig.reward`` (a gin file, a ``--gin`` flag, a rerun workdir's
run_config.json) can run code as you; see docs/reward-server.md.
"""

from __future__ import annotations

import importlib
from typing import Callable

from rest_jax.errors import RestJaxError

PREFIX = "py:"


def load_callable(path: str) -> Callable:
  """The object ``module:attr`` (``attr`` may be dotted, e.g. ``mod:Class.method``).

  A class or factory is not called: the object itself must be the reward callable
  ``(sources, hypotheses, references) -> [n]``.

  Raises:
    RestJaxError: malformed path, module that fails to import, missing attribute, or an
      object that is not callable.
  """
  module_name, sep, attr = path.partition(":")
  if not sep or not module_name or not attr:
    raise RestJaxError(f"reward import path {path!r} must look like 'package.module:function' "
                       f"(write reward = '{PREFIX}package.module:function').")
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise RestJaxError(f"reward {PREFIX}{path}: cannot import module {module_name!r} ({e}); "
                       "check the spelling and that it is on PYTHONPATH.") from None
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise RestJaxError(f"reward {PREFIX}{path}: {getattr(obj, '__name__', obj)!r} has no "
                         f"attribute {part!r}; check the name after ':'.")
    obj = getattr(obj, part)
  if not callable(obj):
    raise RestJaxError(f"reward {PREFIX}{path} is a {type(obj).__name__}, not a callable; point "
                       "it at a function (sources, hypotheses, references) -> float array [n].")
  return obj
