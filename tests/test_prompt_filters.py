"""The prompt filters of the Improve selection (drop_all_pass / drop_all_fail) on hand-built Grow
indexes: which records are kept, the originals, the threshold, the top-k cap and mixed Grow sets."""

from __future__ import annotations

import numpy as np
import pytest

from rest_jax.config import ImproveConfig
from rest_jax.errors import RestJaxError
from rest_jax.improve.schedules import Threshold
from rest_jax.improve.selection import select_mixture

# (example_id, sample_idx) -> reward; sample_idx -1 is the original pair of D.
CURRENT = {
    (0, -1): 1.0, (0, 0): 0.9, (0, 1): 0.8, (0, 2): 0.95,  # All pass at 0.5.
    (1, -1): 1.0, (1, 0): 0.1, (1, 1): 0.2, (1, 2): 0.3,  # All fail at 0.5.
    (2, -1): 1.0, (2, 0): 0.9, (2, 1): 0.1, (2, 2): 0.6,  # Mixed.
    (3, -1): 0.2, (3, 0): 0.7, (3, 1): 0.4,  # Mixed; its original fails.
}
PREVIOUS = {  # An earlier Grow set (mix_previous_grows = 1): its originals are never kept.
    (0, -1): 1.0, (0, 0): 0.6, (0, 1): 0.2,
    (1, -1): 1.0, (1, 0): 0.7, (1, 1): 0.1,  # Passed before, all fail now: dropped all the same.
    (2, -1): 1.0, (2, 0): 0.5,
    (3, -1): 0.2, (3, 0): 0.1,
}


def _index(table: dict) -> dict:
  keys = list(table)
  return {"example_id": np.asarray([e for e, _ in keys], np.int64),
          "sample_idx": np.asarray([s for _, s in keys], np.int64),
          "reward": np.asarray(list(table.values()), np.float32),
          "is_original": np.asarray([s == -1 for _, s in keys])}


def _kept(threshold=0.5, tables=(CURRENT,), **kw) -> set:
  """(grow set, example_id, sample_idx) of the kept records; 0 is the current Grow set."""
  indexes = [_index(t) for t in tables]
  mix = select_mixture([f"g{d}" for d in range(len(tables))], indexes=indexes,
                       threshold=threshold if isinstance(threshold, Threshold)
                       else Threshold(threshold), **kw)
  out = {(d, int(e), int(s)) for d, (index, keep) in enumerate(zip(indexes, mix.keep))
         for e, s in zip(index["example_id"][keep], index["sample_idx"][keep])}
  assert len(out) == mix.count
  return out, (mix.dropped_all_pass, mix.dropped_all_fail)


def _prompts(kept: set) -> set:
  return {e for _, e, _ in kept}


BASE = {(0, 0, -1), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, -1), (0, 2, -1), (0, 2, 0),
        (0, 2, 2), (0, 3, 0)}


def test_filters_are_off_by_default():
  assert not ImproveConfig().drop_all_pass and not ImproveConfig().drop_all_fail
  assert _kept() == (BASE, (0, 0))


def test_drop_all_pass_drops_the_prompt_and_its_original():
  kept, dropped = _kept(drop_all_pass=True)
  assert kept == {k for k in BASE if k[1] != 0} and dropped == (1, 0)


def test_drop_all_fail_drops_the_original_of_an_unsolved_prompt():
  # Prompt 1 has no passing sample: the filter only removes its (passing) original.
  kept, dropped = _kept(drop_all_fail=True)
  assert kept == BASE - {(0, 1, -1)} and dropped == (0, 1)
  # Without originals (ReST-EM) an all-fail prompt has nothing kept: the filter changes nothing.
  assert _kept(drop_all_fail=True, include_originals=False) == (
      {k for k in BASE if k[2] >= 0}, (0, 1))


def test_both_filters_keep_the_mixed_prompts_only():
  kept, dropped = _kept(drop_all_pass=True, drop_all_fail=True)
  assert kept == {(0, 2, -1), (0, 2, 0), (0, 2, 2), (0, 3, 0)} and dropped == (1, 1)


def test_the_threshold_decides_pass_and_fail():
  # At 0.85 prompt 0 is mixed (0.8 fails), prompt 3 all fails (0.7, 0.4), prompt 2 mixed.
  kept, dropped = _kept(0.85, drop_all_pass=True, drop_all_fail=True)
  assert _prompts(kept) == {0, 2} and dropped == (0, 2)
  assert kept == {(0, 0, -1), (0, 0, 0), (0, 0, 2), (0, 2, -1), (0, 2, 0)}
  # At 0.0 every prompt all passes.
  with pytest.raises(RestJaxError, match="keeps no example.*dropped 4 prompts whose samples all "
                     "pass.*drop_all_pass"):
    _kept(0.0, drop_all_pass=True)


def test_per_source_threshold():
  # Prompt 0 at 0.85 (mixed), prompt 2 at 0.05 (all pass), prompts 1 and 3 at 0.5.
  tau = Threshold(0.5, example_ids=np.array([0, 1, 2, 3]),
                  per_source=np.array([0.85, 0.5, 0.05, 0.5]))
  kept, dropped = _kept(tau, drop_all_pass=True)
  assert _prompts(kept) == {0, 1, 3} and dropped == (1, 0)


def test_previous_grow_sets_are_judged_by_the_current_one():
  kept, dropped = _kept(tables=(CURRENT, PREVIOUS), drop_all_pass=True, drop_all_fail=True)
  # Prompt 1's earlier passing sample (1, 0) and prompt 0's (0, 0) go with their prompts.
  assert kept == {(0, 2, -1), (0, 2, 0), (0, 2, 2), (0, 3, 0), (1, 2, 0)} and dropped == (1, 1)
  kept, _ = _kept(tables=(CURRENT, PREVIOUS))
  assert {(1, 0, 0), (1, 1, 0), (1, 2, 0)} <= kept


def test_top_k_counts_the_prompts_that_stay():
  # max_per_prompt is the per-prompt top-k; the filters run first, so a dropped prompt's
  # samples never take a place, and the cap never turns a mixed prompt into a dropped one.
  kept, _ = _kept(tables=(CURRENT, PREVIOUS), max_per_prompt=1, drop_all_pass=True)
  assert kept == {(0, 1, -1), (0, 2, -1), (0, 2, 0), (0, 3, 0), (1, 1, 0)}
  kept, _ = _kept(max_per_prompt=1, drop_all_fail=True, include_originals=False)
  assert kept == {(0, 0, 2), (0, 2, 0), (0, 3, 0)}


def test_everything_dropped_is_the_clear_keeps_no_example_error():
  with pytest.raises(RestJaxError) as info:
    _kept(0.99, drop_all_fail=True)  # Only the originals pass; every prompt all fails.
  message = str(info.value)
  assert "keeps no example" in message and "4 whose samples all fail" in message
  assert "drop_all_pass / drop_all_fail = False" in message
  # The filters off: the usual message about the threshold.
  with pytest.raises(RestJaxError, match="keeps no example.*highest eligible reward is 0.9500"):
    _kept(0.99, include_originals=False)
