"""Preemption: on SIGTERM every host stops at the same agreed point, saves, and exits with 75.

A TPU VM maintenance event, a SLURM preemption (or time limit with ``--signal``) and ``kill``
send SIGTERM, then SIGKILL after a grace period. ``rest-jax run`` turns the SIGTERM into a
clean stop: the phases call ``check(where)`` at their check points (every train step, every
Grow sampler batch, every value-network step, every phase start), in the same order on every
host; the first check point that every host agrees on after the signal raises ``Preempted``.
There the train loop has saved its TrainState (BC / Improve continue from that very step), a
Grow step drops its unfinished chunk (completed chunks stay; the dropped one is sampled again,
identically), and the CLI exits with ``EXIT_CODE`` (75, ``EX_TEMPFAIL``: "try again").
Rerunning the same command resumes.

How the hosts agree:

* With ``jax.distributed`` (a multi-host run), jax's preemption service does it
  (``multihost_utils.reached_preemption_sync_point``, what orbax's
  ``CheckpointManager.reached_preemption`` calls): its own SIGTERM handler on any host tells
  the coordination service; every host reports its check-point counter and all stop at the
  largest counter + 1. No collective runs at the check points themselves.
* In a single process, a Python SIGTERM handler sets a flag that the next check point reads.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax

from rest_jax.errors import EXIT_PREEMPTED, Preempted

logger = logging.getLogger("rest_jax")

EXIT_CODE = EXIT_PREEMPTED  # 75, os.EX_TEMPFAIL: stopped cleanly, resumes when rerun.


_received_at: float | None = None  # time.time() of the SIGTERM (single process only).
_counter = 0  # Check points passed by this process (the same sequence on every host).
_previous_handler: Any = None
_mode = "off"  # "off", "signal" (single process) or "jax" (jax's preemption service).


def _sync_manager() -> Any:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  state = jax_distributed.global_state
  return state.preemption_sync_manager if state.client is not None else None


def _on_sigterm(signum: int, frame: Any) -> None:
  del signum, frame
  global _received_at
  if _received_at is None:
    _received_at = time.time()
    message = "rest-jax: SIGTERM received; stopping at the next check point (saving first).\n"
    try:  # os.write, not print: the handler may interrupt a print to stderr (reentrant I/O).
      os.write(sys.stderr.fileno(), message.encode())
    except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr is not a file.
      sys.stderr.write(message)


def install() -> str:
  """Starts listening for SIGTERM; call once, after ``distributed.initialize``.

  Returns:
    "jax" (jax.distributed is up: its preemption service listens on every host), "signal"
    (one process: a Python handler), or "off" (jax's preemption service is disabled, or one
    process called this outside its main thread: SIGTERM then ends the run as SIGKILL would,
    resumable from the last evaluation or Grow chunk).
  """
  global _mode, _previous_handler, _received_at, _counter
  _received_at, _counter = None, 0
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  if jax_distributed.global_state.client is not None:
    _mode = "jax" if _sync_manager() is not None else "off"
    if _mode == "off":
      logger.warning("jax's preemption service is off (jax_enable_preemption_service=False): "
                     "SIGTERM will not save a checkpoint before the run ends.")
    return _mode
  if threading.current_thread() is not threading.main_thread():
    _mode = "off"  # Python sets signal handlers in the main thread only.
    return _mode
  _previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
  _mode = "signal"
  return _mode


def uninstall() -> None:
  """Restores the SIGTERM handler that ``install`` replaced (single process); stops checking."""
  global _mode, _previous_handler
  if _mode == "signal" and _previous_handler is not None:
    signal.signal(signal.SIGTERM, _previous_handler)
  _mode, _previous_handler = "off", None


def reached() -> bool:
  """Whether every host has agreed to stop here; call at every check point, same order on
  every host (each call is one check point)."""
  global _counter
  _counter += 1
  if _mode == "jax":
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.reached_preemption_sync_point(_counter)
  return _mode == "signal" and _received_at is not None


def stop(kept: str) -> Preempted:
  """The ``Preempted`` to raise at an agreed check point; ``kept``: what was saved there."""
  waited = "" if _received_at is None else f" {time.time() - _received_at:.1f} s after SIGTERM"
  logger.warning("preempted: stopping%s on all %d processes; %s", waited, jax.process_count(),
                 kept)
  return Preempted(f"preempted (SIGTERM): {kept}. Rerun the same command to resume.")


def check(where: str) -> None:
  """A check point where nothing needs saving: raises ``Preempted`` if the hosts agreed to
  stop here (``where`` names the point, e.g. "before Grow g2")."""
  if reached():
    raise stop(f"stopped {where}, all finished work is saved")
