"""Re-scoring a workdir's Grow sets with another reward (``rest-jax rescore``), and the reward
version a run reads (``ImproveConfig.reward_version``).

``rescore_workdir`` writes one new version (``rest_jax.grow.versions``) into every finalized
Grow set of a workdir: each process scores its share of the chunks (chunk j of a Grow set when
j % processes == process), one chunk in memory at a time, against the references of the task
the run sampled (only the prompts of its own chunks are kept); host 0 then records the version.
``ensure_version`` gives a run's new Grow sets the version the run reads, with the reward that
version was recorded with.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from rest_jax import rewards, storage
from rest_jax.config import RewardConfig, RunConfig
from rest_jax.errors import RestJaxError
from rest_jax.grow import chunkindex
from rest_jax.grow import dataset as growdata
from rest_jax.grow import versions
from rest_jax.pipeline.workdir import Workdir

logger = logging.getLogger("rest_jax")
Barrier = Callable[[str], None]


def reward_for(spec: str, config: RewardConfig, layout: Any = None) -> versions.RewardCall:
  """The validated reward call of a spec (NaN, inf or out-of-range values raise RestJaxError)."""
  from rest_jax.pipeline import build  # pylint: disable=g-import-not-at-top (jax)
  rewards.check_reward_spec(spec)
  return build.reward_call(rewards.build_reward(spec, config, layout=layout),
                           rewards.reward_label(spec, config))


def task_references(config: RunConfig, example_ids: Iterable[int]) -> dict[int, str]:
  """example_id -> reference text of the given prompts, streamed from the task's train split
  (and ``GrowConfig.unlabeled_split``): only the wanted prompts are kept."""
  from rest_jax import tasks  # pylint: disable=g-import-not-at-top
  from rest_jax.tasks import data  # pylint: disable=g-import-not-at-top
  wanted = set(int(e) for e in example_ids)
  task = tasks.get_task(config.task)
  out: dict[int, str] = {}
  for split in ("train", config.grow.unlabeled_split):
    if not split or not wanted - out.keys():
      continue
    for ex in data.task_dataset(task, split).as_numpy_iterator():
      e = int(ex["example_id"])
      if e in wanted:
        text = ex["targets_pretokenized"]
        out[e] = text.decode("utf-8") if isinstance(text, bytes) else str(text)
  return out


def _my_chunks(directory: str, host_id: int, num_hosts: int) -> list[str]:
  return sorted(growdata.read_stats(directory).chunks)[host_id::num_hosts]


def rescore_workdir(workdir: str, *, spec: str, name: str = "",
                    reward_config: RewardConfig | None = None, host_id: int = 0,
                    num_hosts: int = 1, barrier: Barrier = lambda name: None,
                    reward: versions.RewardCall | None = None,
                    batch_size: int = 1024) -> dict[str, Any]:
  """Writes a new reward version into every finalized Grow set of ``workdir`` (resumable).

  Every process calls it with its own ``host_id``; ``barrier`` waits for all of them.

  Args:
    spec: the reward spec (``RunConfig.reward`` syntax: a name, learned:, remote:, py:).
    name: a label for the version (default: the spec).
    reward_config: its range and remote / learned settings (default: the run's, range (0, 1)).
    reward: the validated reward call to use instead of building ``spec`` (tests).
  Returns:
    {"version": v, "grow_sets": {folder: manifest entry}} (entries on host 0 only).
  Raises:
    RestJaxError: no workdir, no finalized Grow set, an unknown reward, or a reward that fails
      (the version stays pending; rerunning continues it).
  """
  wd = Workdir(workdir)
  wd.require_exists()
  config = wd.load_run_config()
  dirs = [d for _, d in wd.grow_steps() if growdata.is_complete(d)]
  if not dirs:
    raise RestJaxError(f"{workdir} has no finalized Grow set (grow/gNNN with COMPLETED); run "
                       "`rest-jax run` until a Grow step has finished, then rescore.")
  if reward_config is None:
    reward_config = dataclasses.replace(config.reward_config, range=(0.0, 1.0))
  call = reward or reward_for(spec, reward_config)
  version = versions.choose_version(dirs, spec)
  barrier("rescore version chosen")
  if host_id == 0:
    for d in dirs:
      versions.start_version(d, version, spec=spec, name=name or spec,
                             reward_range=reward_config.range)
  barrier("rescore version started")
  mine = {d: _my_chunks(d, host_id, num_hosts) for d in dirs}
  ids = set()
  for d, chunks in mine.items():
    for chunk in chunks:
      if not storage.exists(storage.join(d, versions.side_name(chunk, version))):
        ids.update(np.unique(chunkindex.read_rows(d, chunk)["example_id"]).tolist())
  references = task_references(config, ids) if ids else {}
  for d, chunks in mine.items():
    written = versions.score_chunks(d, chunks, version=version, reward=call,
                                    references=references, batch_size=batch_size)
    logger.info("rescore v%d: %s: scored %d of this process's %d chunks", version, d, written,
                len(chunks))
  barrier("rescore chunks scored")
  entries = {}
  if host_id == 0:
    for d in dirs:
      entries[d] = versions.finish_version(d, version)
  barrier("rescore version recorded")
  return {"version": version, "grow_sets": entries}


def recorded_spec(workdir: Workdir, version: int) -> dict[str, Any]:
  """The manifest entry of ``version`` in any Grow set of ``workdir``.

  Raises:
    RestJaxError: no Grow set records it (the unknown-version error, naming the fix).
  """
  known = {0}
  for _, d in workdir.grow_steps():
    done = versions.complete_versions(d)
    known.update(done)
    if version in done:
      return done[version]
  raise RestJaxError(
      f"ImproveConfig.reward_version = {version} is not recorded in {workdir.root} (recorded: "
      f"{', '.join(map(str, sorted(known)))}); write it with `rest-jax rescore "
      f"{workdir.root} --reward R`, or set ImproveConfig.reward_version to a recorded one.")


def ensure_version(workdir: Workdir, grow_dir: str, version: int, *, prompts: Sequence[dict],
                   host_id: int, num_hosts: int, barrier: Barrier, layout: Any = None) -> None:
  """Gives a run's Grow set ``grow_dir`` reward ``version`` where it lacks it, scored with the
  reward the version was recorded with; host h scores the chunks it wrote (``chunk-h{h}-*``)
  against its own ``prompts`` (dicts with "example_id" and "targets_pretokenized")."""
  if version == 0 or version in versions.complete_versions(grow_dir):
    return
  entry = recorded_spec(workdir, version)
  spec = entry["reward"]
  logger.info("reward version %d (%s) for %s", version, spec, grow_dir)
  call = reward_for(spec, RewardConfig(range=tuple(entry["range"])), layout)
  if host_id == 0:
    versions.start_version(grow_dir, version, spec=spec, name=entry["name"],
                           reward_range=entry["range"])
  barrier(f"{grow_dir} v{version} started")
  prefix = f"chunk-h{host_id:03d}-"
  chunks = [c for c in sorted(growdata.read_stats(grow_dir).chunks) if c.startswith(prefix)]
  versions.score_chunks(grow_dir, chunks, version=version, reward=call, references={
      int(p["example_id"]): p["targets_pretokenized"] for p in prompts})
  barrier(f"{grow_dir} v{version} scored")
  if host_id == 0:
    versions.finish_version(grow_dir, version)
  barrier(f"{grow_dir} v{version} recorded")
