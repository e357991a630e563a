"""The Improve data mixture on small fabricated Grow sets written with the real Grow writer:
threshold (global and per source), D in / out, per-prompt cap, deduplication, previous Grows."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rest_jax import tasks

from rest_jax.grow import dataset as growdata

from rest_jax.improve import selection as mixture
from rest_jax.errors import RestJaxError
from rest_jax.grow.dataset import GrowRecord, GrowWriter
from rest_jax.improve.schedules import Threshold
from rest_jax.pipeline.workdir import Workdir

# (example_id, sample_idx) -> (reward, targets); sample_idx -1 is the original pair of D.
G1 = {
    (0, -1): (1.0, [40, 1]), (0, 0): (0.25, [41, 1]), (0, 1): (0.75, [30, 31, 1]),
    (0, 2): (0.75, [30, 31, 1]), (0, 3): (1.0, [40, 1]),
    (1, -1): (1.0, [60, 1]), (1, 0): (0.5, [50, 1]), (1, 1): (0.5, [50, 1]),
    (1, 2): (0.0, [51, 1]), (1, 3): (0.875, [52, 1]),
    (2, -1): (0.875, [70, 1]), (2, 0): (0.125, [71, 1]), (2, 1): (0.25, [72, 1]),
    (2, 2): (0.375, [73, 1]), (2, 3): (0.5, [74, 1]),
}
G2 = {
    (0, -1): (1.0, [40, 1]), (0, 0): (0.75, [30, 31, 1]), (0, 1): (1.0, [42, 1]),
    (1, -1): (1.0, [60, 1]), (1, 0): (0.875, [53, 1]), (1, 1): (0.25, [54, 1]),
    (2, -1): (0.875, [70, 1]), (2, 0): (0.625, [75, 1]), (2, 1): (0.5, [74, 1]),
}


def _write(directory: str, table: dict, grow_step: int) -> str:
  records = [GrowRecord(example_id=e, sample_idx=s, inputs=[10 + e, 1], targets=t,
                        inputs_pretokenized=f"x{e}", targets_pretokenized=f"y{t}", reward=r,
                        behaviour_logprobs=[-0.5] * len(t), is_original=s == -1,
                        grow_step=grow_step)
             for (e, s), (r, t) in table.items()]
  writer = GrowWriter(directory)
  writer.write_chunk(0, records[:7])  # Two chunks: the index spans files.
  writer.write_chunk(1, records[7:])
  growdata.finalize(directory)
  return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  work = tmp_path_factory.mktemp("work")
  g1 = _write(str(work / "grow" / "g001"), G1, 1)
  g2 = _write(str(work / "grow" / "g002"), G2, 2)
  return str(work), g1, g2


def _kept(mix: mixture.Mixture) -> set:
  out = set()
  for g, (directory, keep) in enumerate(zip(mix.directories, mix.keep)):
    index = growdata.load_index(directory)
    step = int(os.path.basename(directory)[1:])
    out |= {(step, int(e), int(s)) for e, s in zip(index["example_id"][keep],
                                                    index["sample_idx"][keep])}
  return out


def _numpy_select(index, threshold: float, cap: int, originals: bool) -> np.ndarray:
  """One Grow set's filter, restated with a Python loop: reward >= tau (float32), originals
  only if asked, then the ``cap`` best samples per prompt (ties: lower sample_idx)."""
  reward = index["reward"].astype(np.float32)
  keep = (reward >= np.float32(threshold)) & (originals | ~index["is_original"])
  if cap > 0:
    for e in np.unique(index["example_id"]):
      rows = [i for i in np.flatnonzero(keep & ~index["is_original"])
              if index["example_id"][i] == e]
      rows.sort(key=lambda i: (-reward[i], index["sample_idx"][i]))
      keep[rows[cap:]] = False
  return keep


def test_one_grow_set_against_a_loop(dirs):
  _, g1, _ = dirs
  index = growdata.load_index(g1)
  for threshold in (0.0, 0.5, 0.875):
    for cap in (0, 1, 2):
      for originals in (True, False):
        mix = mixture.select_mixture([g1], threshold=Threshold(threshold), max_per_prompt=cap,
                                     include_originals=originals, indexes=[index])
        np.testing.assert_array_equal(mix.keep[0],
                                      _numpy_select(index, threshold, cap, originals))
  # By hand: threshold 0.5, one sample per prompt, no originals.
  mix = mixture.select_mixture([g1], threshold=Threshold(0.5), max_per_prompt=1,
                               include_originals=False)
  assert _kept(mix) == {(1, 0, 3), (1, 1, 3), (1, 2, 3)}


def test_originals_in_and_out(dirs):
  _, g1, _ = dirs
  with_d = _kept(mixture.select_mixture([g1], threshold=Threshold(0.875)))
  without = _kept(mixture.select_mixture([g1], threshold=Threshold(0.875),
                                         include_originals=False))
  assert with_d == {(1, 0, -1), (1, 0, 3), (1, 1, -1), (1, 1, 3), (1, 2, -1)}
  assert without == {(1, 0, 3), (1, 1, 3)}


def test_deduplication_keeps_one_per_prompt_and_targets(dirs):
  _, g1, _ = dirs
  mix = mixture.select_mixture([g1], threshold=Threshold(0.0), deduplicate=True)
  # Prompt 0: sample 3 repeats the original (the original stays), 1 and 2 are equal (1 stays).
  # Prompt 1: samples 0 and 1 are equal (0 stays).
  dropped = {(1, 0, 3), (1, 0, 2), (1, 1, 1)}
  assert _kept(mix) == {(1, e, s) for e, s in G1} - dropped
  # Without D the sample that repeated the original is kept.
  mix = mixture.select_mixture([g1], threshold=Threshold(0.0), deduplicate=True,
                               include_originals=False)
  assert _kept(mix) == {(1, e, s) for e, s in G1 if s >= 0} - {(1, 0, 2), (1, 1, 1)}


def test_previous_grow_sets(dirs):
  work, g1, g2 = dirs
  assert Workdir(work).mixed_grow_dirs(2, 1) == [g2, g1]
  assert Workdir(work).mixed_grow_dirs(2, 5) == [g2, g1]
  assert Workdir(work).mixed_grow_dirs(1, 3) == [g1]
  assert Workdir(work).mixed_grow_dirs(2, 0) == [g2]
  mix = mixture.select_mixture([g2, g1], threshold=Threshold(0.75))
  # D comes from the current Grow set only; samples >= 0.75 from both.
  assert _kept(mix) == {(2, 0, -1), (2, 1, -1), (2, 2, -1), (2, 0, 0), (2, 0, 1), (2, 1, 0),
                        (1, 0, 1), (1, 0, 2), (1, 0, 3), (1, 1, 3)}
  assert mix.count == 10
  # Deduplication across Grow sets prefers the newest; g1's copy of D's pair 0 goes too.
  dedup = mixture.select_mixture([g2, g1], threshold=Threshold(0.75), deduplicate=True)
  assert _kept(dedup) == _kept(mix) - {(1, 0, 1), (1, 0, 2), (1, 0, 3)}
  # The cap counts samples of every Grow set; ties go to the newer Grow set.
  capped = mixture.select_mixture([g2, g1], threshold=Threshold(0.75), max_per_prompt=1,
                                  include_originals=False)
  assert _kept(capped) == {(2, 0, 1), (2, 1, 0)}
  capped = mixture.select_mixture([g2, g1], threshold=Threshold(0.75), max_per_prompt=2,
                                  include_originals=False)
  assert _kept(capped) == {(2, 0, 1), (1, 0, 3), (2, 1, 0), (1, 1, 3)}


def test_per_source_threshold(dirs):
  _, g1, g2 = dirs
  tau = Threshold(0.5, np.asarray([0, 1, 2]), np.asarray([0.9, 0.5, 0.4]))
  mix = mixture.select_mixture([g2, g1], threshold=tau, include_originals=False)
  assert _kept(mix) == {(2, 0, 1), (2, 1, 0), (2, 2, 0), (2, 2, 1), (1, 0, 3), (1, 1, 0),
                        (1, 1, 1), (1, 1, 3), (1, 2, 3)}


def test_improve_dataset_reads_exactly_the_kept_records(dirs):
  _, g1, g2 = dirs
  mix = mixture.select_mixture([g2, g1], threshold=Threshold(0.75), deduplicate=True,
                               max_per_prompt=1)
  dataset = mixture.improve_dataset(mix, output_features=tasks.ENCDEC_FEATURES)
  got = [(int(ex["grow_step"]), int(ex["example_id"]), int(ex["sample_idx"]),
          ex["targets"].tolist(), float(ex["reward"])) for ex in dataset.as_numpy_iterator()]
  assert {g[:3] for g in got} == _kept(mix) and len(got) == mix.count
  table = {1: G1, 2: G2}
  for g, e, s, targets, reward in got:
    assert (reward, targets) == (table[g][(e, s)][0], table[g][(e, s)][1])


def test_threshold_that_keeps_nothing(dirs):
  _, g1, _ = dirs
  tau = Threshold(0.9, np.asarray([0, 1, 2]), np.asarray([np.inf, 0.9, 0.9]))
  with pytest.raises(RestJaxError, match=r"keeps no example.*highest eligible reward is "
                     r"1\.0000.*Lower the threshold"):
    mixture.select_mixture([g1], threshold=tau, include_originals=False)
