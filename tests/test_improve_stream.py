"""Improve data streamed per host: the on-disk selection equals selection.select_mixture, the
global batches do not depend on the host count or on who wrote the Grow chunks, each host reads
only its rows, a resumed loader (and a resumed packed phase) continues with the next batch, and
the streamed Grow stats equal numpy's."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from rest_jax.checkpoints.phases import PhaseCheckpoints
from rest_jax.config import TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.grow import chunkindex
from rest_jax.grow import dataset as growdata
from rest_jax.grow import stats as growstats
from rest_jax.grow.dataset import GrowRecord, GrowWriter
from rest_jax.improve import batches, losses, selected, selection
from rest_jax.improve.phase import train_phase
from rest_jax.improve.schedules import Threshold
from rest_jax.improve.trainer import Trainer, make_optimizer
from rest_jax.models import build_model, get_preset
from conftest import mesh_layout

NUM_PROMPTS, NUM_SAMPLES = 24, 4


def _record(e: int, s: int, g: int) -> GrowRecord:
  n = 1 + (e * 3 + s + g) % 5
  reward = 1.0 if s == -1 else ((e * 7 + (s + 1) * 13 + g * 5) % 17) / 16
  targets = [20 + (e + s * (s % 2) + g) % 3] * (n - 1) + [1]  # Repeats: dedup has work to do.
  return GrowRecord(example_id=100 + e, sample_idx=s, inputs=[10 + e % 7, 11, 1],
                    targets=targets, inputs_pretokenized=f"x{e}", targets_pretokenized="y",
                    reward=reward, behaviour_logprobs=-0.5 * np.arange(1, n + 1),
                    is_original=s == -1, grow_step=g)


def _write(directory: str, g: int, hosts: int, prompts_per_chunk: int) -> str:
  """Grow set ``g`` as ``hosts`` hosts write it (prompt p on host p % hosts)."""
  for h in range(hosts):
    mine = [p for p in range(NUM_PROMPTS) if p % hosts == h]
    writer = GrowWriter(directory, host_id=h)
    for k in range(0, len(mine), prompts_per_chunk):
      writer.write_chunk(k // prompts_per_chunk,
                         [_record(e, s, g) for e in mine[k:k + prompts_per_chunk]
                          for s in range(-1, NUM_SAMPLES)])
  if hosts > 1:
    for h in range(hosts):
      growdata.index_chunks(directory, host_id=h, num_hosts=hosts)
  growdata.finalize(directory)
  return directory


@pytest.fixture(scope="module")
def grows(tmp_path_factory):
  """{layout: [g2 dir, g1 dir]}: the same records written by 1 host and by 3 hosts."""
  base = tmp_path_factory.mktemp("stream")
  return {hosts: [_write(str(base / f"h{hosts}" / f"g{g}"), g, hosts, 5 - hosts)
                  for g in (2, 1)] for hosts in (1, 3)}


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
  monkeypatch.setattr(selected, "BUCKET_ROWS", 23)  # Several buckets and spill runs.
  monkeypatch.setattr(selected, "SPILL_ROWS", 17)


def _to_disk(dirs, out, rules, num_hosts):
  """select_to_disk as ``num_hosts`` hosts run it (one stage after another)."""
  for stage in (selected.scatter, selected.reduce):
    for h in range(num_hosts):
      if stage is selected.scatter and h == 0:
        os.makedirs(out, exist_ok=True)
      stage(dirs, out, rules, host_id=h, num_hosts=num_hosts)
  selected.merge(dirs, out, rules)
  return selected.select_to_disk(dirs, out, rules)


def _keys(sel: selected.Selection) -> list[tuple[int, int, int]]:
  """(example_id, sample_idx, grow_step) of every selected record, in canonical order."""
  rows = np.concatenate([np.fromfile(sel.bucket_path(b), selected.SELECTED_ROW)
                         for b in range(len(sel.bucket_counts))])
  paths = [sel.chunk_path(int(r["source"]), int(r["file"])) for r in rows]
  payloads = chunkindex.read_payloads(paths, rows["offset"], rows["length"],
                                      chunkindex.FileCache())
  parsed = tf.io.parse_example(payloads, {k: growdata.FEATURES[k] for k in
                                          ("example_id", "sample_idx", "grow_step")})
  return list(zip(*(parsed[k].numpy().tolist() for k in ("example_id", "sample_idx",
                                                          "grow_step"))))


RULES = [
    dict(),
    dict(include_originals=False, max_per_prompt=2),
    dict(deduplicate=True),
    dict(drop_all_pass=True, drop_all_fail=True, max_per_prompt=3),
]


@pytest.mark.parametrize("kw", RULES)
def test_on_disk_selection_equals_select_mixture_for_any_host_count(grows, tmp_path, kw):
  tau = Threshold(0.5)
  mix = selection.select_mixture(grows[1], threshold=tau, **kw)
  want = set()
  for directory, keep in zip(mix.directories, mix.keep):
    index = growdata.load_index(directory)
    g = int(os.path.basename(directory)[1:])
    want |= {(int(e), int(s), g) for e, s in
             zip(index["example_id"][keep], index["sample_idx"][keep])}
  rules = selected.Rules(threshold=tau, **kw)
  one = _to_disk(grows[1], str(tmp_path / "one"), rules, 1)
  three = _to_disk(grows[3], str(tmp_path / "three"), rules, 3)
  assert one.count == three.count == mix.count == len(want)
  assert len(one.bucket_counts) > 2
  assert (one.dropped_all_pass, one.dropped_all_fail) == (mix.dropped_all_pass,
                                                          mix.dropped_all_fail)
  keys = _keys(one)
  assert set(keys) == want and len(keys) == len(want)
  assert _keys(three) == keys  # The same canonical order, whoever wrote the chunks.
  assert not [n for n in os.listdir(tmp_path / "three") if n.startswith(("run-", "counts-"))]


def test_per_source_threshold_and_nothing_kept(grows, tmp_path):
  ids = np.arange(100, 100 + NUM_PROMPTS, dtype=np.int64)
  tau = Threshold(0.5, ids, np.where(ids % 2 == 0, 0.25, 0.75))
  mix = selection.select_mixture(grows[1][:1], threshold=tau)
  got = _to_disk(grows[3][:1], str(tmp_path / "ps"), selected.Rules(threshold=tau), 3)
  assert got.count == mix.count
  with pytest.raises(RestJaxError, match="keeps no example.*highest eligible reward is 1.0000"):
    selected.select_to_disk(grows[1][:1], str(tmp_path / "none"),
                            selected.Rules(threshold=Threshold(1.5)))


def _loader(sel, rows, batch_size=12, seed=7):
  return batches.ImproveBatches(sel, batch_size=batch_size, seed=seed, rows=rows, input_len=8,
                                target_len=8)


def test_batches_do_not_depend_on_the_host_count(grows, tmp_path):
  rules = selected.Rules(threshold=Threshold(0.3))
  one = _to_disk(grows[1], str(tmp_path / "one"), rules, 1)
  two = _to_disk(grows[3], str(tmp_path / "two"), rules, 2)
  whole = _loader(one, slice(0, 12))
  halves = [_loader(two, slice(0, 6)), _loader(two, slice(6, 12))]
  epoch = -(-one.count // 12) + 1
  seen = []
  for k in range(epoch + 1):
    full = whole.batch(k)
    parts = [h.batch(k) for h in halves]
    for key, value in full.items():
      np.testing.assert_array_equal(value, np.concatenate([p[key] for p in parts]))
    seen.append(whole.records(k))
    assert full["inputs"].shape == (12, 8) and full["targets"].dtype == np.int32
    assert full["behaviour_logprobs"].shape == (12, 8) and full["example_id"].dtype == np.int64
  order = np.concatenate(seen)
  first = order[:one.count]
  assert sorted(first.tolist()) == list(range(one.count))  # Each record once per epoch.
  second = order[one.count:2 * one.count]
  assert second.size < one.count or not np.array_equal(first, second)  # Reshuffled per epoch.


def test_resumed_loader_continues_with_the_next_batch(grows, tmp_path):
  sel = _to_disk(grows[1], str(tmp_path / "s"), selected.Rules(threshold=Threshold(0.3)), 1)
  loader = _loader(sel, slice(0, 12))
  stream = loader.iterate(0)
  uninterrupted = [next(stream) for _ in range(9)]
  state = loader.state(5)
  resumed = _loader(sel, slice(0, 12))
  assert resumed.state(5) == state and state["next_batch"] == 5
  again = resumed.iterate(state["next_batch"])
  for want in uninterrupted[5:]:
    got = next(again)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert _loader(sel, slice(0, 12), seed=8).state(5) != state  # Another order, another state.


def test_too_long_example_is_one_error(grows, tmp_path):
  sel = _to_disk(grows[1], str(tmp_path / "s"), selected.Rules(threshold=Threshold(0.0)), 1)
  loader = batches.ImproveBatches(sel, batch_size=64, seed=0, rows=slice(0, 64), input_len=8,
                                  target_len=2)
  with pytest.raises(RestJaxError, match="raise target_len"):
    loader.batch(0)


def test_permutation_is_a_bijection():
  for size in (1, 2, 3, 17, 1000, 4097):
    for epoch in (0, 1):
      out = batches.permute(np.arange(size), size, seed=3, epoch=epoch)
      assert sorted(out.tolist()) == list(range(size))
  assert not np.array_equal(batches.permute(np.arange(100), 100, seed=3, epoch=0),
                            batches.permute(np.arange(100), 100, seed=3, epoch=1))


def test_chunk_index_points_at_each_record(grows):
  directory = grows[3][0]
  name = growdata.chunk_files(directory)[0]
  rows = chunkindex.read_rows(directory, name)
  payloads = chunkindex.read_payloads([os.path.join(directory, name)] * rows.size,
                                      rows["offset"], rows["length"], chunkindex.FileCache())
  records = list(growdata.read_records(directory, files=[name]))
  assert [r.serialize() for r in records] == payloads


@pytest.mark.parametrize("kind", ["grid", "uniform", "binary", "originals_only"])
def test_streamed_stats_equal_numpy(kind):
  rng = np.random.default_rng(len(kind))
  n = 2001
  rewards = {"grid": rng.integers(0, 65, n) / 64, "uniform": rng.random(n),
             "binary": (rng.random(n) < 0.3) * 1.0, "originals_only": rng.random(n)}[kind]
  rewards = rewards.astype(np.float32)
  original = np.ones(n, bool) if kind == "originals_only" else rng.random(n) < 0.2
  want = growstats.compute_stats(rewards, original)
  acc = growstats.Accumulator()
  parts = np.array_split(np.arange(n), 7)
  for p in parts:
    acc.add(rewards[p], original[p])
  for p in parts:
    acc.refine(rewards[p], original[p])
  got = acc.result()
  assert got.quantiles == want.quantiles and got.histogram == want.histogram
  assert (got.count, got.num_samples, got.min, got.max) == (want.count, want.num_samples,
                                                           want.min, want.max)
  assert got.mean == pytest.approx(want.mean, rel=1e-12)
  assert got.std == pytest.approx(want.std, rel=1e-9)
  assert got.mean_all == pytest.approx(want.mean_all, rel=1e-12)


@pytest.mark.parametrize("name", ["fixed", "quantile", "linear", "per_source_percentile",
                                  "per_source_interpolation"])
def test_streamed_schedules_equal_in_memory(grows, name):
  from rest_jax.grow.rewards import StreamedGrowRewards  # pylint: disable=g-import-not-at-top
  from rest_jax.improve import schedules  # pylint: disable=g-import-not-at-top
  schedule = schedules.make_schedule(name, quantiles=(0.3, 0.5, 0.77), percentiles=(20, 50, 95))
  directory = grows[3][0]
  want, want_messages = schedule.plan(
      schedules.GrowRewards.from_index(growdata.load_index(directory)), num_improve_steps=3)
  got, messages = schedule.plan(StreamedGrowRewards(directory), num_improve_steps=3)
  assert messages == want_messages
  for a, b in zip(got, want):
    assert a.value == pytest.approx(b.value, rel=1e-12)
    if b.per_source is not None:
      np.testing.assert_array_equal(a.example_ids, b.example_ids)
      np.testing.assert_array_equal(a.per_source, b.per_source)


def test_resume_reads_the_checkpointed_position_and_refuses_changed_data():
  import types  # pylint: disable=g-import-not-at-top
  from rest_jax.improve import phase  # pylint: disable=g-import-not-at-top
  ckpt = types.SimpleNamespace(directory="/w/checkpoints/g001_i01")
  state = lambda k: {"next_batch": k, "records": 10, "fingerprint": "a"}  # pylint: disable=unnecessary-lambda-assignment
  assert phase._next_batch({"data": state(7)}, 7, state, ckpt) == 7
  assert phase._next_batch({}, 5, state, ckpt) == 5  # A checkpoint without a position.
  changed = lambda k: {"next_batch": k, "records": 11, "fingerprint": "b"}  # pylint: disable=unnecessary-lambda-assignment
  with pytest.raises(RestJaxError, match="training data of /w/checkpoints/g001_i01 changed"):
    phase._next_batch({"data": state(7)}, 7, changed, ckpt)


def test_resumed_packed_improve_phase_continues_with_the_same_next_batch(grows, tmp_path):
  """A packed phase stopped after 2 steps and rerun to 4 equals the uninterrupted one."""
  sel = _to_disk(grows[1], str(tmp_path / "s"), selected.Rules(threshold=Threshold(0.3)), 1)
  loader = _loader(sel, slice(0, 12))
  graphdef, params = nnx.split(build_model(get_preset("tiny_decoder", num_decoder_layers=1),
                                           rngs=nnx.Rngs(0)))
  cfg = TrainConfig(num_steps=4, eval_every=2, batch_size=12, learning_rate=1e-2,
                    decay_to_zero=False, packing=True)
  trainer = Trainer(graphdef, mesh_layout(2, devices=jax.devices()[:2]),
                    losses.make_loss(cfg), make_optimizer(cfg), packing=True)
  norm = jax.jit(lambda p: -sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p)))
  starts = []

  def run(directory, num_steps):
    def batches(start):
      starts.append(start)
      return loader.iterate(start)
    with PhaseCheckpoints(str(directory)) as checkpoints:
      return train_phase(trainer=trainer, params=params,
                         cfg=dataclasses.replace(cfg, num_steps=num_steps), batches=batches,
                         eval_fn=lambda p: {"eval_reward": float(norm(p))},
                         checkpoints=checkpoints, data_state=loader.state)

  expected = run(tmp_path / "whole", 4)
  run(tmp_path / "parts", 2)
  resumed = run(tmp_path / "parts", 4)
  assert starts == [0, 0, 2]  # The rerun asks the loader for batch 2, the next one.
  assert resumed.history == expected.history and resumed.steps_run == 4
  for a, b in zip(jax.tree.leaves(expected.best_params), jax.tree.leaves(resumed.best_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
