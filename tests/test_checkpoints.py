"""Orbax checkpoints: sharded round trips, params-only restore, phase dirs, crashed writes."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rest_jax.checkpoints import phases as ckpt
from rest_jax.config import TrainConfig
from rest_jax.errors import RestJaxError
from rest_jax.improve.trainer import Trainer, make_optimizer
from rest_jax.improve.losses import bc_loss, plain_loss
from conftest import mesh_layout


class Block(nnx.Module):

  def __init__(self, seed: int):
    rng = np.random.default_rng(seed)
    self.w = nnx.Param(jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                       out_sharding=("embed", "mlp"), eager_sharding=False)
    self.b = nnx.Param(jnp.asarray(rng.normal(size=(16,)), jnp.float32),
                       out_sharding=("mlp",), eager_sharding=False)


class Net(nnx.Module):
  """Parameters only (int-keyed layers, sharded names); the trainer is never stepped here."""

  def __init__(self, seed: int = 0):
    self.embed = nnx.Param(jnp.asarray(np.random.default_rng(seed).normal(size=(12, 8)),
                                       jnp.float32),
                           out_sharding=("vocab", "embed"), eager_sharding=False)
    self.layers = nnx.List([Block(seed + 1), Block(seed + 2)])


def _trainer(layout):
  graphdef, params = nnx.split(Net())
  return Trainer(graphdef, layout, plain_loss(bc_loss),
                 optimizer=make_optimizer(TrainConfig())), params


def _params(seed):
  return nnx.split(Net(seed))[1]


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_on_shardings(tree, abstract):
  for x, a in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract)):
    assert isinstance(x, jax.Array)
    assert x.sharding.is_equivalent_to(a.sharding, x.ndim), (x.sharding, a.sharding)


def test_train_state_roundtrip_onto_another_mesh(tmp_path):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  state = trainer.init(params)
  state = state.replace(step=jnp.int32(7))
  ckpt.save_pytree(tmp_path / "s", state)

  # On disk, parameters are named by module path (pure dicts), not by NNX internals.
  keys = json.loads((tmp_path / "s" / "_METADATA").read_text())["tree_metadata"]
  assert "('params', 'layers', '0', 'w')" in keys
  assert not any("value" in k for k in keys)

  other, _ = _trainer(mesh_layout(2, 1, 4))
  abstract = other.abstract_state(params)
  restored = ckpt.restore_pytree(tmp_path / "s", abstract)
  assert isinstance(restored.params, nnx.State)
  assert isinstance(restored.params["layers"][0]["w"], nnx.Param)
  assert restored.params["layers"][0]["w"].get_metadata()["out_sharding"] == ("embed", "mlp")
  assert int(restored.step) == 7
  _assert_tree_equal(jax.device_get(restored), jax.device_get(state))
  _assert_on_shardings(restored, abstract)
  assert restored.params["layers"][0]["w"].get_value().sharding.spec == jax.P(None, "tensor")


def test_restore_params_only(tmp_path):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  ckpt.save_pytree(tmp_path / "state", trainer.init(params))
  ckpt.save_pytree(tmp_path / "params", params)
  abstract = trainer.abstract_params(params)
  for name in ("state", "params"):
    restored = ckpt.restore_params(tmp_path / name, abstract)
    _assert_tree_equal(jax.device_get(restored), jax.device_get(params))
    _assert_on_shardings(restored, abstract)


def test_user_errors(tmp_path):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  ckpt.save_pytree(tmp_path / "p", params)
  with pytest.raises(RestJaxError, match="already exists"):
    ckpt.save_pytree(tmp_path / "p", params)
  with pytest.raises(RestJaxError, match="no checkpoint at"):
    ckpt.restore_pytree(tmp_path / "missing", trainer.abstract_params(params))
  no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  with pytest.raises(RestJaxError, match="ShapeDtypeStruct with .sharding"):
    ckpt.restore_pytree(tmp_path / "p", no_sharding)
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    with pytest.raises(RestJaxError, match="'eval_reward'"):
      phase.save_best(0, params, {"bleu": 3.0})
    with pytest.raises(RestJaxError, match="no best checkpoint"):
      phase.restore_best_params(trainer.abstract_params(params))
    assert phase.latest() is None and phase.best_metrics() is None


def test_phase_latest_keeps_only_newest(tmp_path):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  abstract = trainer.abstract_state(params)
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    for step in (0, 2, 4):
      state = trainer.init(_params(step)).replace(step=jnp.int32(step))
      phase.save_latest(step, state, {"history": [{"step": step, "eval_reward": np.float32(0.5)}],
                                      "bad_evals": step // 2})
  assert sorted(p.name for p in (tmp_path / "phase" / "latest").iterdir()) == ["4"]
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    step, meta = phase.latest()
    assert step == 4
    assert meta == {"history": [{"step": 4, "eval_reward": 0.5}], "bad_evals": 2}
    restored = phase.restore_latest(abstract)
    _assert_tree_equal(jax.device_get(restored), jax.device_get(state))
    _assert_on_shardings(restored, abstract)
    assert phase.latest_state_path() == tmp_path / "phase" / "latest" / "4" / "state"
    _assert_tree_equal(jax.device_get(ckpt.restore_params(phase.latest_state_path(),
                                                          abstract.params)),
                       jax.device_get(_params(4)))


def test_phase_best_keeps_highest_eval_reward(tmp_path):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  abstract = trainer.abstract_params(params)
  best_dir = tmp_path / "phase" / "best"
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    phase.save_best(0, _params(0), {"eval_reward": 0.5, "bleu": 10.0})
    phase.save_best(2, _params(2), {"eval_reward": 0.3, "bleu": 30.0})
    assert phase.best_step() == 0
    assert phase.best_metrics() == {"eval_reward": 0.5, "bleu": 10.0}
    phase.save_best(4, _params(4), {"eval_reward": 0.7, "bleu": 20.0})
    assert phase.best_step() == 4
    assert phase.best_metrics() == {"eval_reward": 0.7, "bleu": 20.0}
    # The previous best survives until the next save_latest commits the phase state.
    assert sorted(p.name for p in best_dir.iterdir()) == ["0", "4"]
    phase.save_latest(4, trainer.init(params), {})
    assert sorted(p.name for p in best_dir.iterdir()) == ["4"]
    restored = phase.restore_best_params(abstract)
    _assert_tree_equal(jax.device_get(restored), jax.device_get(_params(4)))
    _assert_on_shardings(restored, abstract)


def test_crash_after_save_best_before_save_latest(tmp_path):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    phase.save_best(0, _params(0), {"eval_reward": 0.5})
    phase.save_latest(0, trainer.init(params), {"best_reward": 0.5})
    phase.save_best(2, _params(2), {"eval_reward": 0.9})  # ... and the process dies here.
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    step, meta = phase.latest()
    assert (step, meta) == (0, {"best_reward": 0.5})
    phase.discard_best_after(step)
    assert phase.best_metrics() == {"eval_reward": 0.5}
    _assert_tree_equal(jax.device_get(phase.restore_best_params(trainer.abstract_params(params))),
                       jax.device_get(_params(0)))


def test_crashed_write_leaves_older_checkpoint_readable(tmp_path):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  state = trainer.init(params)
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    phase.save_latest(4, state, {"step": 4})
  latest_dir = tmp_path / "phase" / "latest"
  # A write of step 6 that died half-way: orbax's temporary directory, never renamed.
  partial = latest_dir / "6.orbax-checkpoint-tmp-1234567"
  shutil.copytree(latest_dir / "4", partial)
  shutil.rmtree(partial / "state")
  (partial / "_CHECKPOINT_METADATA").unlink()
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    assert phase.latest() == (4, {"step": 4})
    restored = phase.restore_latest(trainer.abstract_state(params))
    _assert_tree_equal(jax.device_get(restored), jax.device_get(state))
    phase.save_latest(6, state.replace(step=jnp.int32(6)), {"step": 6})
    assert phase.latest() == (6, {"step": 6})
  assert sorted(p.name for p in latest_dir.iterdir()) == ["6"]


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    ValueError("Error writing local file \"/w/d/1a2b\": [OS error 28: No space left on device]"),
])
def test_full_disk_during_a_save_is_one_error_and_keeps_the_older_checkpoint(
    tmp_path, monkeypatch, error):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  state = trainer.init(params)
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    phase.save_latest(4, state, {"step": 4})

  def full(self, step, *args, **kwargs):
    raise error

  monkeypatch.setattr(ckpt.ocp.CheckpointManager, "save", full)
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    with pytest.raises(RestJaxError, match=r"could not write .*phase/latest/6: no space left on "
                       r"device\. Free space .* rerun the same command"):
      phase.save_latest(6, state, {"step": 6})
    with pytest.raises(RestJaxError, match=r"could not write .*phase/best/6: no space left"):
      phase.save_best(6, params, {"eval_reward": 0.5})
  monkeypatch.undo()
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    assert phase.latest() == (4, {"step": 4})


def test_relative_phase_directory_works(tmp_path, monkeypatch):
  """orbax needs absolute paths; a relative workdir (as in the README command) must work."""
  import jax.numpy as jnp
  from rest_jax.checkpoints.phases import PhaseCheckpoints
  monkeypatch.chdir(tmp_path)
  ckpt = PhaseCheckpoints("rel/phase")
  params = {"w": jnp.arange(4.0)}
  ckpt.save_best(0, params, {"eval_reward": 0.5})
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
  np.testing.assert_array_equal(ckpt.restore_best_params(abstract)["w"], np.arange(4.0))


def _truncate_data(directory):
  files = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for path in files:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_truncated_checkpoint_names_the_phase_and_the_fix(tmp_path):
  trainer, params = _trainer(mesh_layout(2, 2, 2))
  abstract = trainer.abstract_params(params)
  directory = tmp_path / "checkpoints" / "g001_i02"
  with ckpt.PhaseCheckpoints(directory) as phase:
    phase.save_best(0, _params(0), {"eval_reward": 0.5})
    phase.save_latest(0, trainer.init(params), {"best_reward": 0.5})
  _truncate_data(directory / "best")
  _truncate_data(directory / "latest")
  with ckpt.PhaseCheckpoints(directory) as phase:
    with pytest.raises(RestJaxError, match=r"the best checkpoint of phase 'g001_i02' in .*"
                       r"is corrupt or truncated.*Delete .*g001_i02 \(and the phase's marker "
                       r"phases/g001_i02.json.*the phase before it"):
      phase.restore_best_params(abstract)
    with pytest.raises(RestJaxError, match="the latest checkpoint of phase 'g001_i02'"):
      phase.restore_latest(trainer.abstract_state(params))
  (directory / "latest" / "0" / "meta" / "metadata").write_text("{trunc")
  with ckpt.PhaseCheckpoints(directory) as phase:
    with pytest.raises(RestJaxError, match="latest checkpoint of phase 'g001_i02'.*corrupt"):
      phase.latest()
  path = tmp_path / "plain"
  ckpt.save_pytree(path, _params(1))
  _truncate_data(path)
  with pytest.raises(RestJaxError, match=r"checkpoint .*plain is corrupt or truncated.*write it "
                     "again"):
    ckpt.restore_pytree(path, abstract)
  (path / "_METADATA").write_text("{")
  with pytest.raises(RestJaxError, match="plain is corrupt or truncated"):
    ckpt.restore_params(path, abstract)


def test_phase_saves_leave_jax_preemption_counter_alone(tmp_path, monkeypatch):
  # jax keeps one preemption counter per process; rest_jax.parallel.preemption owns it. orbax's
  # save passed its checkpoint steps too, and a 2-process run then ignored a SIGTERM in Improve.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: calls.append(step) or False)
  trainer, params = _trainer(mesh_layout(8, 1, 1))
  with ckpt.PhaseCheckpoints(tmp_path / "phase") as phase:
    phase.save_best(3, trainer.init(params).params, {"eval_reward": 0.5})
    phase.save_latest(3, trainer.init(params), {"history": []})
  assert calls == []
