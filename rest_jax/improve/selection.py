"""The Improve set of one Improve step: which Grow records it trains on (the data mixture).

Given the Grow directory of the current step g (and, with ``mix_previous_grows = k``, those of
g-1..g-k) and the step's ``schedules.Threshold``, ``select_mixture`` decides on the host, from
the Grow indexes, which records are kept, in this order:

1. threshold: ``reward >= tau`` (tau global, or per source prompt by example_id); the same tau
   is applied to the previous Grow sets' samples.
2. originals: the pairs of D are kept only if ``include_originals`` (ReST; ReST-EM drops them),
   and only from the current Grow set (each Grow set holds the same D: no repeats).
3. prompt filters (``drop_all_pass`` / ``drop_all_fail``, as Reinforce-Rej and DAPO's dynamic
   sampling): a prompt (example_id) whose samples in the current Grow set all pass (all fail)
   the threshold of step 1 loses every record: its original and its samples of previous Grow
   sets too. Originals are not judged; a prompt without samples in the current set is kept.
4. deduplication (``deduplicate``): records with the same example_id and the same target
   tokens keep one: an original if there is one, else the newest Grow step's, else the lowest
   sample_idx.
5. cap, the per-prompt top-k (``max_per_prompt = K > 0``): at most K samples per example_id
   over all mixed Grow sets, the highest rewards first (ties: newer Grow step, then lower
   sample_idx); originals are not counted.

``improve_dataset`` reads the kept records back as one tf.data.Dataset (the Grow sets' seqio
tasks from ``growdata.grow_task``, an unfiltered reader, filtered by a key table); files are
never rewritten. This module holds the selection rules: the Improve sets of a run are selected
by every host together with them (``rest_jax.improve.selected``, memory bounded whatever the
Grow set's size); ``select_mixture`` / ``improve_dataset`` are the in-memory reference of the
same rules (a bool per record: for tests and small sets), and ``value_dataset`` (the value
network's data) streams one Grow set's chunks. None of them reads a Grow set's whole index.npz:
they read the per-chunk index files (``rest_jax.grow.chunkindex``) one chunk at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from rest_jax import storage
from rest_jax.grow import chunkindex
from rest_jax.grow import dataset as growdata
from rest_jax.grow import versions
from rest_jax.errors import RestJaxError
from rest_jax.improve.schedules import Threshold


@dataclasses.dataclass(frozen=True)
class Mixture:
  """The kept records of each Grow directory (current first): bool `[records]` in index order;
  and how many prompts the prompt filters dropped (0 when a filter is off)."""

  directories: tuple[str, ...]
  keep: tuple[np.ndarray, ...]
  dropped_all_pass: int = 0
  dropped_all_fail: int = 0
  reward_version: int = 0  # The reward column the rules read and the records carry.

  @property
  def count(self) -> int:
    return int(sum(k.sum() for k in self.keep))


def _chunk_rows(directory: str) -> Iterator[tuple[str, np.ndarray]]:
  """(chunk file, its ``chunkindex.ROW`` `[records]`) of a finalized Grow set, in index order
  (the sorted chunk files), one chunk at a time."""
  for name in sorted(growdata.read_stats(directory).chunks):
    yield name, chunkindex.read_rows(directory, name)


def index_columns(directory: str) -> dict[str, np.ndarray]:
  """``growdata.load_index``'s example_id, sample_idx, reward (float32), is_original (bool)
  and chunk (int32 into "files") columns `[records]` and "files", gathered from the per-chunk
  index files (index.npz is never read)."""
  cols: dict[str, list[np.ndarray]] = {"example_id": [], "sample_idx": [], "reward": [],
                                        "is_original": []}
  files, chunk = [], []
  for name, rows in _chunk_rows(directory):
    for key in cols:
      cols[key].append(rows[key])
    chunk.append(np.full([len(rows)], len(files), np.int32))
    files.append(name)
  out = {k: np.concatenate(v) if v else np.zeros([0], chunkindex.ROW[k])
         for k, v in cols.items()}
  out["reward"] = out["reward"].astype(np.float32)
  out["is_original"] = out["is_original"].astype(bool)
  out["chunk"] = np.concatenate(chunk) if chunk else np.zeros([0], np.int32)
  out["files"] = np.asarray(files, dtype=str)
  return out


def target_tokens(directory: str) -> list[bytes]:
  """Each record's target token ids (as int64 bytes), in index order; one chunk at a time."""
  spec = {k: growdata.FEATURES[k] for k in ("example_id", "sample_idx", "targets")}
  out = []
  for name, rows in _chunk_rows(directory):
    ids = []
    dataset = tf.data.TFRecordDataset(storage.join(directory, name))
    for ex in dataset.map(lambda s: tf.io.parse_single_example(s, spec)).as_numpy_iterator():
      out.append(np.asarray(ex["targets"], np.int64).tobytes())
      ids.append((int(ex["example_id"]), int(ex["sample_idx"])))
    if ids != list(zip(rows["example_id"].tolist(), rows["sample_idx"].tolist())):
      raise RestJaxError(f"the chunk {name} of {directory} no longer matches its index; delete "
                         "the directory and rerun the Grow step.")
  return out


def _drop_prompts(t: Mapping[str, np.ndarray], *, drop_all_pass: bool,
                  drop_all_fail: bool) -> tuple[np.ndarray, int, int]:
  """The prompt filters over the concatenated records ``t`` (columns `[records]`).

  A prompt is judged on its samples in the current Grow set (``source == 0``, not originals):
  all of them have ``passed`` (all pass) or none (all fail).
  Returns:
    bool `[records]`, True for every record of a dropped prompt; the numbers of prompts dropped
    as all-pass and as all-fail.
  """
  if not (drop_all_pass or drop_all_fail):
    return np.zeros(t["example_id"].shape, bool), 0, 0
  judged = (t["source"] == 0) & ~t["is_original"]
  prompts, inverse = np.unique(t["example_id"][judged], return_inverse=True)
  num_pass = np.bincount(inverse, weights=t["passed"][judged].astype(np.float64),
                         minlength=prompts.size)
  num = np.bincount(inverse, minlength=prompts.size)
  all_pass = prompts[num_pass == num] if drop_all_pass else prompts[:0]
  all_fail = prompts[num_pass == 0] if drop_all_fail else prompts[:0]
  dropped = np.isin(t["example_id"], np.concatenate([all_pass, all_fail]))
  return dropped, int(all_pass.size), int(all_fail.size)


def _deduplicate(t: Mapping[str, np.ndarray], keep: np.ndarray, token_key: np.ndarray) -> None:
  """Clears ``keep`` (bool `[records]`, in place) on all but one record per (example_id, target
  tokens): an original first, then the newest Grow set (lowest source), then lowest sample_idx.
  ``token_key`` int64 `[records]` names each record's target tokens (equal tokens, equal key)."""
  cand = np.flatnonzero(keep)
  token_id = np.asarray(token_key)[cand]
  order = np.lexsort((t["sample_idx"][cand], t["source"][cand], ~t["is_original"][cand],
                      token_id, t["example_id"][cand]))
  e, tok = t["example_id"][cand][order], token_id[order]
  first = np.ones(order.size, bool)
  first[1:] = (e[1:] != e[:-1]) | (tok[1:] != tok[:-1])
  keep[cand[order[~first]]] = False


def _cap_per_prompt(t: Mapping[str, np.ndarray], keep: np.ndarray, k: int) -> None:
  """The per-prompt top-k: clears ``keep`` (bool `[records]`, in place) on all but the ``k``
  best kept samples of each example_id (reward, then lowest source, then lowest sample_idx);
  originals are not counted."""
  cand = np.flatnonzero(keep & ~t["is_original"])
  order = np.lexsort((t["sample_idx"][cand], t["source"][cand], -t["reward"][cand],
                      t["example_id"][cand]))
  cand, ids = cand[order], t["example_id"][cand][order]
  pos = np.arange(cand.size)
  starts = np.ones(cand.size, bool)
  starts[1:] = ids[1:] != ids[:-1]
  rank = pos - np.maximum.accumulate(np.where(starts, pos, 0))
  keep[cand[rank >= k]] = False


def _nothing_kept(t: Mapping[str, np.ndarray], *, threshold: Threshold,
                  directories: Sequence[str], include_originals: bool, dropped_all_pass: int,
                  dropped_all_fail: int) -> RestJaxError:
  """The error of a selection that keeps no record: names the cause and the fix."""
  where = f"threshold {threshold.describe()} keeps no example of {list(directories)}"
  if dropped_all_pass or dropped_all_fail:
    return RestJaxError(
        f"{where} after the prompt filters dropped {dropped_all_pass} prompts whose samples all "
        f"pass it and {dropped_all_fail} whose samples all fail it. Turn the filter off "
        "(ImproveConfig.drop_all_pass / drop_all_fail = False) or choose a threshold that some "
        "but not all samples of a prompt pass.")
  eligible = t["reward"][~t["is_original"] | include_originals]
  best = float(eligible.max()) if eligible.size else float("nan")
  return RestJaxError(
      f"{where}: the highest eligible reward is {best:.4f}. Lower the threshold or choose a "
      "schedule relative to the Grow rewards (ImproveConfig.schedule), or check the reward "
      "function.")


def record_table(source: int, example_id: np.ndarray, sample_idx: np.ndarray,
                 reward: np.ndarray, is_original: np.ndarray, *, threshold: Threshold,
                 include_originals: bool) -> dict[str, np.ndarray]:
  """The selection columns of one Grow set's records (``source`` 0 is the current set), `[n]`
  each: source, example_id, sample_idx, reward, is_original, passed (reward >= tau) and keep
  (passed, originals only from the current set and only with ``include_originals``)."""
  reward = np.asarray(reward, np.float32)
  original = np.asarray(is_original, bool)
  tau = threshold.for_records(example_id).astype(np.float32)
  passed = reward >= tau
  keep = passed.copy()
  if not include_originals or source > 0:
    keep &= ~original
  return {"source": np.full(reward.shape, source), "example_id": np.asarray(example_id),
          "sample_idx": np.asarray(sample_idx), "reward": reward, "is_original": original,
          "passed": passed, "keep": keep}


def keep_records(t: Mapping[str, np.ndarray], *, max_per_prompt: int = 0,
                 drop_all_pass: bool = False, drop_all_fail: bool = False,
                 token_key: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
  """Steps 3-5 of the selection over the records ``t`` (``record_table`` columns concatenated,
  `[records]`): every record of a prompt (example_id) must be in ``t``.

  Args:
    t: the columns; ``t["keep"]`` holds steps 1-2.
    max_per_prompt / drop_all_pass / drop_all_fail: as ``select_mixture``.
    token_key: int64 `[records]` naming each record's target tokens; deduplicates when given.
  Returns:
    bool `[records]` kept; the numbers of prompts dropped as all-pass and as all-fail.
  """
  keep = np.array(t["keep"], bool)
  dropped, num_pass, num_fail = _drop_prompts(t, drop_all_pass=drop_all_pass,
                                              drop_all_fail=drop_all_fail)
  keep &= ~dropped
  if token_key is not None and keep.any():
    _deduplicate(t, keep, token_key)
  if max_per_prompt > 0:
    _cap_per_prompt(t, keep, max_per_prompt)
  return keep, num_pass, num_fail


def select_mixture(directories: Sequence[str], *, threshold: Threshold,
                   include_originals: bool = True, max_per_prompt: int = 0,
                   deduplicate: bool = False, drop_all_pass: bool = False,
                   drop_all_fail: bool = False,
                   indexes: Sequence[Mapping[str, np.ndarray]] | None = None,
                   reward_version: int = 0) -> Mixture:
  """Which records of ``directories`` (current Grow set first) the Improve step trains on.

  Args:
    directories: finalized Grow directories, the current step's first.
    threshold: the step's threshold (global or per source).
    include_originals: keep D's pairs (from the current Grow set).
    max_per_prompt: if > 0, at most this many samples per example_id (the per-prompt top-k).
    deduplicate: keep one record per (example_id, target tokens).
    drop_all_pass: drop the prompts whose current samples all pass the threshold.
    drop_all_fail: drop the prompts whose current samples all fail it.
    indexes: the directories' ``index_columns`` (read chunk by chunk when None).
    reward_version: the reward column to read (0: Grow's; ``grow.versions``).
  Returns:
    the Mixture.
  Raises:
    RestJaxError: nothing is kept (names the threshold, the best reward or the prompt filters,
      and the fix).
  """
  if not directories:
    raise ValueError("select_mixture needs at least one Grow directory")
  indexes = [index_columns(d) for d in directories] if indexes is None else list(indexes)
  tables = [record_table(d, index["example_id"], index["sample_idx"],
                         versions.index_rewards(directory, index, reward_version),
                         index["is_original"], threshold=threshold,
                         include_originals=include_originals)
            for d, (directory, index) in enumerate(zip(directories, indexes))]
  cols = {k: [table[k] for table in tables] for k in tables[0]}
  t = {k: np.concatenate(v) for k, v in cols.items()}
  token_key = None
  if deduplicate:
    ids: dict[bytes, int] = {}
    token_key = np.asarray([ids.setdefault(tok, len(ids)) for d in directories
                            for tok in target_tokens(d)], np.int64)
  keep, num_pass, num_fail = keep_records(
      t, max_per_prompt=max_per_prompt, drop_all_pass=drop_all_pass,
      drop_all_fail=drop_all_fail, token_key=token_key)
  if not keep.any():
    raise _nothing_kept(t, threshold=threshold, directories=directories,
                        include_originals=include_originals, dropped_all_pass=num_pass,
                        dropped_all_fail=num_fail)
  bounds = np.cumsum([0] + [len(i["reward"]) for i in indexes])
  return Mixture(tuple(directories), tuple(keep[a:b] for a, b in zip(bounds, bounds[1:])),
                 dropped_all_pass=num_pass, dropped_all_fail=num_fail,
                 reward_version=reward_version)


def _record_key(ex: Mapping[str, tf.Tensor]) -> tf.Tensor:
  return tf.strings.join([tf.strings.as_string(ex["example_id"]),
                          tf.strings.as_string(ex["sample_idx"])], separator=":")


def _key_table(index: Mapping[str, np.ndarray], keep: np.ndarray, values: np.ndarray,
               default: float) -> tf.lookup.StaticHashTable:
  """"example_id:sample_idx" of the records with ``keep`` -> ``values`` (float32 `[kept]`)."""
  keys = [f"{e}:{s}" for e, s in zip(index["example_id"][keep], index["sample_idx"][keep])]
  return tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.string),
                                          tf.constant(values, tf.float32)),
      default_value=default)


def _key_filter(index: Mapping[str, np.ndarray], keep: np.ndarray):
  """A tf.data predicate: True for the records of ``index`` with ``keep`` (bool `[records]`)."""
  table = _key_table(index, keep, np.ones(int(keep.sum()), np.float32), 0.0)
  return lambda ex: table.lookup(_record_key(ex)) == 1.0


def _with_rewards(index: Mapping[str, np.ndarray], keep: np.ndarray, rewards: np.ndarray):
  """A tf.data map: each kept record's "reward" replaced by ``rewards`` (float32 `[records]`)."""
  table = _key_table(index, keep, rewards[keep], float("nan"))
  return lambda ex: dict(ex, reward=table.lookup(_record_key(ex)))


def improve_dataset(mixture: Mixture, *,
                    output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """The kept records of a Mixture, unshuffled, in directory then chunk-file order.

  Features: those of ``growdata.grow_task``. Raises RestJaxError when a chunk changed since
  finalize.
  """
  datasets = []
  for directory, keep in zip(mixture.directories, mixture.keep):
    if not keep.any():
      continue
    task = growdata.grow_task(directory, output_features=output_features)
    dataset = task.get_dataset(None, split="train", shuffle=False)
    index = index_columns(directory) if (not keep.all() or mixture.reward_version) else None
    if not keep.all():
      dataset = dataset.filter(_key_filter(index, keep))
    if mixture.reward_version:
      dataset = dataset.map(_with_rewards(
          index, keep, versions.index_rewards(directory, index, mixture.reward_version)))
    datasets.append(dataset)
  dataset = datasets[0]
  for other in datasets[1:]:
    dataset = dataset.concatenate(other)
  return dataset


def value_dataset(directory: str, *, include_originals: bool,
                  output_features: Mapping[str, seqio.Feature],
                  reward_version: int = 0) -> tf.data.Dataset:
  """The value network's data: every record of one Grow set (its originals only if
  ``include_originals``), unshuffled, in chunk-file order, with reward ``reward_version``.

  Version 0 is streamed (``growdata.grow_task`` filtered on is_original; memory does not grow
  with the Grow set); a re-scored version reads the per-chunk index columns and the version's
  side files (one float and key per record) through ``select_mixture``. The same records and
  order as ``improve_dataset(select_mixture([directory], threshold=Threshold(0.0), ...))``.

  Raises:
    RestJaxError: the Grow set holds only originals and ``include_originals`` is False.
  """
  if reward_version:
    mixture = select_mixture([directory], threshold=Threshold(0.0),
                             include_originals=include_originals, reward_version=reward_version)
    return improve_dataset(mixture, output_features=output_features)
  stats = growdata.read_stats(directory)
  if not include_originals and stats.num_samples == 0:
    raise RestJaxError(
        f"threshold {Threshold(0.0).describe()} keeps no example of {[directory]}: the highest "
        "eligible reward is nan. Lower the threshold or choose a schedule relative to the Grow "
        "rewards (ImproveConfig.schedule), or check the reward function.")
  dataset = growdata.grow_task(directory, output_features=output_features).get_dataset(
      None, split="train", shuffle=False)
  if not include_originals:
    dataset = dataset.filter(lambda ex: tf.equal(ex["is_original"], 0))
  return dataset
