"""The workdir of a run: every path, marker, state file and write, in one place.

Layout (``root`` may be a local folder, a shared one, or ``gs://bucket/path``)::

  config.gin            the operative gin config (text, for people)
  run_config.json       the RunConfig it produced (compared on resume)
  shared_from.json      (only in a run started from another run's BC and Grow g1, as
                        ``rest-jax sweep --share_grow`` does) that run's path and config
  state.json            current phase and accumulated wall time
  phases/{name}.json    completion marker + summary row of a finished BC / Improve phase
  grow/g{g:03d}/        the Grow dataset of step g (chunks, index, stats.json, COMPLETED)
  checkpoints/{name}/   orbax checkpoints of a training phase (latest for resume, best)
  checkpoints/value_g{g:03d}/  the behaviour value network of Grow step g (bvmpo, oac)
  tb/                   TensorBoard events
  summary.json          one row per phase, the wall time and the reward-hacking monitor
  report/*.png          plots

Every write goes through ``rest_jax.storage``; the tools (inspect, best-of-N, compare, sweep)
ask a ``Workdir`` for paths instead of building them. Writes that every host would make are made
by host 0 only; callers hold the barriers. Imports neither jax nor gin (the CLI tools and the
launchers use it on machines without them).
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Any

from rest_jax import storage
from rest_jax.errors import RestJaxError

if typing.TYPE_CHECKING:
  from rest_jax.config import RunConfig

CONFIG_GIN = "config.gin"
RUN_CONFIG = "run_config.json"
STATE = "state.json"
SUMMARY = "summary.json"
SHARED_FROM = "shared_from.json"
# RunConfig fields that neither the BC phase nor Grow step 1 read: runs that differ only in these
# (and share the seed) may start from one run's BC phase and first Grow step (``share_from``).
IMPROVE_ONLY_FIELDS = ("improve", "value", "num_grow_steps", "num_improve_steps")
MARKER_KEYS = ("phase", "eval_reward", "eval_exact_match")  # Of a phases/{name}.json row.
SUMMARY_KEYS = ("rows",)
_GROW_RE = re.compile(r"^g(\d+)$")
_PHASE_RE = re.compile(r"^(bc|g\d{3}_i\d{2})\.json$")


def phase_name(grow_step: int, improve_step: int) -> str:
  """"bc" for grow step 0, else "g{g:03d}_i{i:02d}" (the checkpoint and marker name)."""
  return "bc" if grow_step == 0 else f"g{grow_step:03d}_i{improve_step:02d}"


def parse_phase(text: str) -> str | None:
  """"bc", "g2_i2" or "g002_i02" -> the phase name; None if it is not one."""
  if text == "bc":
    return "bc"
  match = re.fullmatch(r"g0*(\d+)_i0*(\d+)", text)
  return phase_name(int(match[1]), int(match[2])) if match else None


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The paths and the small state files of one run's workdir."""

  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", storage.absolute(self.root))

  def path(self, *parts: str) -> str:
    return storage.join(self.root, *parts)

  # -- Paths -------------------------------------------------------------------------------------

  @property
  def tb_dir(self) -> str:
    return self.path("tb")

  @property
  def report_dir(self) -> str:
    return self.path("report")

  @property
  def summary_path(self) -> str:
    return self.path(SUMMARY)

  def grow_dir(self, grow_step: int) -> str:
    return self.path("grow", f"g{grow_step:03d}")

  def checkpoint_dir(self, phase: str) -> str:
    return self.path("checkpoints", phase)

  def selection_dir(self, phase: str) -> str:
    """The Improve set of an Improve phase, as ``improve.selected`` writes it."""
    return self.path("selection", phase)

  def value_dir(self, grow_step: int) -> str:
    return self.path("checkpoints", f"value_g{grow_step:03d}")

  def marker_path(self, phase: str) -> str:
    return self.path("phases", f"{phase}.json")

  def mixed_grow_dirs(self, grow_step: int, previous: int) -> list[str]:
    """The Grow folders of steps g, g-1, .., max(1, g - previous) (current first)."""
    return [self.grow_dir(s) for s in range(grow_step, max(0, grow_step - previous - 1), -1)]

  # -- Discovery (tools) ----------------------------------------------------------------------------

  def require_exists(self) -> None:
    if not storage.isdir(self.root):
      raise RestJaxError(f"workdir {self.root} does not exist; pass the directory given to "
                         "`rest-jax run`.")

  def grow_steps(self) -> list[tuple[int, str]]:
    """(grow step, folder) of every grow/gNNN folder, by step."""
    found = []
    for name in storage.listdir(self.path("grow")):
      match = _GROW_RE.match(name.rstrip("/"))
      if match and storage.isdir(self.path("grow", name.rstrip("/"))):
        found.append((int(match.group(1)), self.path("grow", name.rstrip("/"))))
    return sorted(found)

  def finished_phases(self) -> list[str]:
    """Names of the phases with a completion marker, in run order (bc first)."""
    return sorted(m.group(1) for n in storage.listdir(self.path("phases"))
                  if (m := _PHASE_RE.match(n)))

  def resolve_phase(self, phase: str) -> str:
    """"bc", "final" (the last finished phase) or "gG_iI" -> a finished phase's name."""
    done = self.finished_phases()
    if phase == "final":
      name = done[-1] if done else ""
    else:
      name = parse_phase(phase) or ""
    if not name or name not in done:
      raise RestJaxError(f"phase {phase!r} has no finished checkpoint in {self.root} (finished: "
                         f"{done or 'none'}); pass bc, final, or gG_iI of a finished phase.")
    return name

  def is_finished(self) -> bool:
    """True when ``rest-jax run`` finished here (state ``done`` and a summary)."""
    if not (storage.exists(self.path(STATE)) and storage.exists(self.summary_path)):
      return False
    return self._state()["phase"] == "done"

  # -- Run config ------------------------------------------------------------------------------

  def load_run_config(self) -> RunConfig:
    """The RunConfig this workdir was made with (fields added since read as defaults)."""
    from rest_jax.config import RunConfig  # pylint: disable=g-import-not-at-top
    path = self.path(RUN_CONFIG)
    if not storage.exists(path):
      raise RestJaxError(f"{path} does not exist; pass the --workdir of a `rest-jax run`.")
    try:
      return _build(RunConfig, storage.read_json(path, keys=()))
    except (TypeError, ValueError, AttributeError) as e:
      raise RestJaxError(f"{path} does not hold a valid RunConfig ({e}); restore it, or pass "
                         "the workdir of another run.") from None

  def config_differences(self, config: RunConfig) -> list[str] | None:
    """None for a workdir without a recorded config, else how ``config`` differs from it."""
    from rest_jax.config import RunConfig  # pylint: disable=g-import-not-at-top
    path = self.path(RUN_CONFIG)
    if not storage.exists(path):
      return None
    mine = json.loads(json.dumps(dataclasses.asdict(config)))
    default = json.loads(json.dumps(dataclasses.asdict(RunConfig())))
    return _diff(storage.read_json(path, keys=()), mine, default)

  def shared_differences(self, config: RunConfig) -> tuple[str, list[str]] | None:
    """None for a workdir not started by ``share_from``; else (the source run, how ``config``
    differs from the source's config in fields that BC or Grow step 1 read)."""
    path = self.path(SHARED_FROM)
    if not storage.exists(path):
      return None
    from rest_jax.config import RunConfig  # pylint: disable=g-import-not-at-top
    shared = storage.read_json(path, keys=("source", "run_config"))
    mine = json.loads(json.dumps(dataclasses.asdict(config)))
    default = json.loads(json.dumps(dataclasses.asdict(RunConfig())))
    theirs = dict(shared["run_config"])
    for field in IMPROVE_ONLY_FIELDS:
      for values in (theirs, mine, default):
        values.pop(field, None)
    return shared["source"], _diff(theirs, mine, default)

  def share_from(self, source: Workdir) -> list[str]:
    """Starts this new workdir from ``source``'s BC phase and first Grow step (both read only
    fields outside ``IMPROVE_ONLY_FIELDS``): copies checkpoints/bc, phases/bc.json and grow/g001
    (where the source has one) and records the source's path and config in shared_from.json,
    which ``shared_differences`` checks when the run starts. Returns what was copied.

    Raises:
      RestJaxError: this workdir was already started, or ``source`` has no finished BC phase.
    """
    if storage.exists(self.path(RUN_CONFIG)) or storage.exists(self.marker_path("bc")):
      raise RestJaxError(f"{self.root} already holds a run; share into a new workdir only.")
    if not (storage.exists(source.marker_path("bc")) and
            storage.exists(source.path(RUN_CONFIG))):
      raise RestJaxError(f"{source.root} has no finished BC phase to share; finish that run "
                         "first (rerun its `rest-jax run`).")
    parts = [("checkpoints", "bc")] + ([("grow", "g001")] if storage.isdir(source.grow_dir(1))
                                       else [])
    for part in parts:
      if storage.exists(self.path(*part)):
        storage.rmtree(self.path(*part))  # A copy cut short before its marker was written.
      storage.makedirs(self.path(part[0]))
      storage.copy_tree(source.path(*part), self.path(*part))
    storage.write_json(self.path(SHARED_FROM), {
        "source": source.root, "phases": ["bc", "grow g1"][:len(parts)],
        "run_config": storage.read_json(source.path(RUN_CONFIG), keys=())})
    storage.makedirs(self.path("phases"))
    storage.write_json(self.marker_path("bc"), storage.read_json(source.marker_path("bc")))
    return ["/".join(part) for part in parts] + ["phases/bc.json"]

  def record_config(self, config: RunConfig, config_text: str) -> None:
    """Writes run_config.json and config.gin (host 0, once the run has been checked)."""
    storage.makedirs(self.root)
    storage.write_text(self.path(CONFIG_GIN), config_text)
    storage.write_json(self.path(RUN_CONFIG), dataclasses.asdict(config))

  # -- State and markers --------------------------------------------------------------------------

  def _state(self) -> dict:
    path = self.path(STATE)
    state = storage.read_json(path, keys=("phase", "wall_time_s"))
    if not isinstance(state["wall_time_s"], (int, float)):
      raise RestJaxError(f"{path} has wall_time_s {state['wall_time_s']!r}, not a number; "
                         "delete it and rerun (only the recorded wall time is lost).")
    return state

  def check_state_files(self) -> None:
    """Reads state.json and every phase marker, so that a damaged one is named before the run
    builds anything (RestJaxError naming the file and the fix)."""
    if storage.exists(self.path(STATE)):
      self._state()
    for phase in self.finished_phases():
      self.marked(phase)

  def previous_wall_time(self) -> float:
    return float(self._state()["wall_time_s"]) if storage.exists(self.path(STATE)) else 0.0

  def write_state(self, phase: str, wall_time_s: float) -> None:
    storage.write_json(self.path(STATE), {"phase": phase, "wall_time_s": float(wall_time_s)})

  def mark(self, phase: str, row: dict) -> None:
    """Records that ``phase`` finished, with its summary row (written last, by host 0)."""
    storage.write_json(self.marker_path(phase), row)

  def marked(self, phase: str) -> dict | None:
    """The summary row of a finished phase, or None."""
    path = self.marker_path(phase)
    return storage.read_json(path, keys=MARKER_KEYS) if storage.exists(path) else None

  def read_summary(self) -> dict:
    if not storage.exists(self.summary_path):
      raise RestJaxError(f"{self.root} has no {SUMMARY}: the run has not finished. Rerun "
                         "`rest-jax run` there, or pass finished runs.")
    return storage.read_json(self.summary_path, keys=SUMMARY_KEYS)


def _diff(a: Any, b: Any, default: Any = None, prefix: str = "") -> list[str]:
  """Differences between recorded config ``a`` and ``b``; keys missing in ``a`` read as
  ``default``."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    default = default if isinstance(default, dict) else {}
    for key in sorted(set(a) | set(b)):
      theirs = a[key] if key in a else default.get(key)
      out += _diff(theirs, b.get(key), default.get(key), f"{prefix}{key}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {a!r} in the workdir, {b!r} now"]


def _build(cls: type, values: dict) -> Any:
  """A (nested) frozen config dataclass from its ``dataclasses.asdict`` JSON; fields missing
  from ``values`` take their defaults, unknown ones are ignored."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in values:
      continue
    value, kind = values[field.name], hints[field.name]
    if dataclasses.is_dataclass(kind) and isinstance(value, dict):
      value = _build(kind, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  return cls(**kwargs)
