"""Scanned layers, remat policies and mixed precision: same numbers as the plain model.

A scanned model is built from the same unrolled layers (same random numbers), so a scanned and
an unscanned model of one seed must give the same logits, decodes and gradients; checkpoints
convert between the two layouts (orbax, HF, T5X), and remat changes memory, not gradients.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rest_jax.checkpoints.convert import (convert_layers, load_checkpoint, load_hf, load_t5x,
                                          save_hf, save_orbax)
from rest_jax.checkpoints.convert.params import host_arrays
from rest_jax.errors import RestJaxError
from rest_jax.models import build_model, get_preset
from conftest import mesh_layout

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
INPUTS = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)
TARGETS = jnp.array([[3, 4, 1], [2, 1, 0]], jnp.int32)
FAMILIES = ("tiny", "tiny_decoder")


def _split(name: str, **overrides):
  return nnx.split(build_model(get_preset(name, **overrides), rngs=nnx.Rngs(0)))


def _loss_and_grads(graphdef, params):
  def loss(p):
    logits = nnx.merge(graphdef, p)(INPUTS, TARGETS)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * (TARGETS != 0))
  return jax.jit(jax.value_and_grad(loss))(params)


def _decode(graphdef, params):
  model = nnx.merge(graphdef, params)
  first, cache = model.prefill(INPUTS, 3)
  second, _ = model.decode_step(jnp.array([3, 2], jnp.int32), cache, jnp.int32(0))
  return np.asarray(first), np.asarray(second)


def _by_name(params) -> dict[str, np.ndarray]:
  return dict(host_arrays(params))  # Unscanned names for both layouts.


@pytest.mark.parametrize("name", FAMILIES)
def test_scanned_equals_unscanned(name):
  graphdef, params = _split(name)
  s_graphdef, s_params = _split(name, scan_layers=True)
  stacked = s_params["layers"] if name == "tiny_decoder" else s_params["encoder"]["layers"]
  kernel = jax.tree.leaves(stacked)[0]
  assert kernel.shape[0] == 2  # [layers, ...]
  a, b = _by_name(params), _by_name(s_params)
  assert a.keys() == b.keys()
  for key in a:  # Same random numbers: the same weights in the other layout.
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  loss, grads = _loss_and_grads(graphdef, params)
  s_loss, s_grads = _loss_and_grads(s_graphdef, s_params)
  assert abs(float(loss) - float(s_loss)) <= 1e-6
  ga, gb = _by_name(grads), _by_name(s_grads)
  for key in ga:
    np.testing.assert_allclose(ga[key], gb[key], atol=1e-6, err_msg=key)
  for x, y in zip(_decode(graphdef, params), _decode(s_graphdef, s_params)):
    np.testing.assert_allclose(x, y, atol=1e-5)


# Each family with one scanned and one unrolled policy by default; the rest are slow (suite time).
_REMAT = [("tiny", ((True, "full"), (False, "dots_no_batch"))),
          ("tiny_decoder", ((False, "full"), (True, "dots"))),
          pytest.param("tiny", ((False, "full"), (True, "dots")), marks=pytest.mark.slow),
          pytest.param("tiny_decoder", ((True, "full"), (False, "dots_no_batch")),
                       marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,cases", _REMAT)
def test_remat_policies_keep_gradients(name, cases):
  base_loss, base = _loss_and_grads(*_split(name))
  for scan, policy in cases:
    loss, grads = _loss_and_grads(*_split(name, scan_layers=scan, remat_policy=policy))
    assert abs(float(loss) - float(base_loss)) <= 1e-6
    a, b = _by_name(base), _by_name(grads)
    for key in a:
      np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=f"{policy} {key}")


@pytest.mark.parametrize("name,scan", [("tiny_decoder", True),
                                       pytest.param("tiny", False, marks=pytest.mark.slow)])
def test_offload_dots_policy_compiles_and_keeps_gradients(name, scan):
  """"offload_dots" (dot outputs to pinned host memory) compiles here too (on CPU the host
  memory is the device's) and gives the plain model's loss and gradients."""
  base_loss, base = _loss_and_grads(*_split(name))
  loss, grads = _loss_and_grads(*_split(name, scan_layers=scan, remat_policy="offload_dots"))
  assert abs(float(loss) - float(base_loss)) <= 1e-6
  a, b = _by_name(base), _by_name(grads)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)


def test_unknown_remat_policy_names_the_choices():
  with pytest.raises(RestJaxError, match="remat_policy 'some'.*'full'"):
    get_preset("tiny", remat_policy="some")


@pytest.mark.parametrize("name", FAMILIES)
def test_convert_layers_round_trip_and_layers_axis_unsharded(name):
  layout = mesh_layout(data=2, fsdp=2, tensor=2)
  config = get_preset(name)
  _, params = _split(name)
  scanned = convert_layers(dataclasses.replace(config, scan_layers=True), params, layout=layout)
  _, reference = _split(name, scan_layers=True)
  flat = dict(nnx.to_flat_state(scanned))
  for path, var in nnx.to_flat_state(reference):
    np.testing.assert_array_equal(np.asarray(flat[path].get_value()),
                                  np.asarray(var.get_value()))
    if "layers" in path:
      assert flat[path].get_metadata()["out_sharding"][0] == "layers"
      assert flat[path].get_value().sharding.spec[0] is None  # The layer axis is never split.
  back = convert_layers(config, scanned, layout=layout)
  a, b = _by_name(params), _by_name(back)
  assert a.keys() == b.keys() and any(".layers_1." in f".{k}" for k in a)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_orbax_checkpoint_converts_between_layouts(tmp_path):
  config = get_preset("tiny_decoder", scan_layers=True)
  _, params = _split("tiny_decoder", scan_layers=True)
  save_orbax(str(tmp_path / "scanned"), config, params)
  plain = get_preset("tiny_decoder")
  loaded_config, loaded = load_checkpoint(f"orbax:{tmp_path / 'scanned'}", config=plain)
  assert not loaded_config.scan_layers and "layers_0" in loaded
  a, b = _by_name(params), _by_name(loaded)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  save_orbax(str(tmp_path / "plain"), plain, loaded)
  _, again = load_checkpoint(str(tmp_path / "plain"), config=config)
  assert "layers" in again and "layers_0" not in again


@pytest.mark.parametrize("name", ["t5_v1_1", "llama_gqa"])
def test_hf_import_and_export_scanned(name, tmp_path):
  """HF parity holds for the scanned layout; a scanned export reads back unscanned."""
  path = os.path.join(DATA, "hf", name)
  ref = np.load(os.path.join(path, "reference.npz"))
  config, params = load_hf(path, scan_layers=True)
  assert config.scan_layers
  graphdef = nnx.split(build_model(config, rngs=nnx.Rngs(0)))[0]
  logits = jax.jit(lambda p: nnx.merge(graphdef, p)(ref["inputs"], ref["targets"]))(params)
  assert np.abs(np.asarray(logits) - ref["logits"]).max() <= 1e-4
  save_hf(str(tmp_path / "out"), config, params)
  _, plain = load_hf(str(tmp_path / "out"))
  a, b = _by_name(params), _by_name(plain)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_t5x_import_scanned_matches_unscanned():
  from test_convert import T5X_CONFIG, T5X_DIR  # pylint: disable=import-outside-toplevel
  src = os.path.join(T5X_DIR, "checkpoint_200")
  plain = _by_name(load_t5x(src, config=T5X_CONFIG))
  scanned = load_t5x(src, config=dataclasses.replace(T5X_CONFIG, scan_layers=True))
  assert "layers" in scanned["decoder"]
  b = _by_name(scanned)
  for key in plain:
    np.testing.assert_array_equal(plain[key], b[key], err_msg=key)


# -- Mixed precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype,moment_dtype", [("float32", ""), ("bfloat16", "float32")])
def test_bf16_step_keeps_float32_master_weights_or_moments(param_dtype, moment_dtype):
  """bf16 activations and matmuls; float32 master weights and moments (or bf16 weights with
  float32 moments); the loss is that of the float32 model to bf16 precision."""
  from rest_jax.config import TrainConfig  # pylint: disable=import-outside-toplevel
  from rest_jax.improve.losses import bc_loss, plain_loss  # pylint: disable=import-outside-toplevel
  from rest_jax.improve.trainer import Trainer, make_optimizer  # pylint: disable=import-outside-toplevel
  layout = mesh_layout(devices=jax.devices()[:1])
  batch = {"inputs": np.asarray(INPUTS), "targets": np.asarray(TARGETS)}
  losses = []
  for dtype, pdtype in (("float32", "float32"), ("bfloat16", param_dtype)):
    graphdef, params = _split("tiny_decoder", dtype=dtype, param_dtype=pdtype, scan_layers=True)
    cfg = TrainConfig(learning_rate=1e-2, moment_dtype=moment_dtype if dtype != "float32" else "")
    trainer = Trainer(graphdef, layout, plain_loss(bc_loss), optimizer=make_optimizer(cfg))
    state, metrics = trainer.train_step(trainer.init(params), batch)
    losses.append(float(metrics["loss"]))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(param_dtype)}
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 1]
  assert moments and {x.dtype for x in moments} == {jnp.dtype("float32")}
  assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) <= 0.05 * abs(losses[0])


def test_bf16_model_samples_in_bf16_with_float32_logits():
  graphdef, params = _split("tiny", dtype="bfloat16")
  model = nnx.merge(graphdef, params)
  logits, cache = model.prefill(INPUTS, 3)
  assert logits.dtype == jnp.float32  # Log-probs are computed from float32 logits.
  assert {x.dtype for x in jax.tree.leaves(cache["layers"])} == {jnp.dtype("bfloat16")}
  from rest_jax.grow.sampler import Sampler  # pylint: disable=import-outside-toplevel
  sampler = Sampler(graphdef, mesh_layout(data=2, fsdp=2, tensor=2), num_samples=2,
                    max_decode_len=4, param_dtype="bfloat16")
  placed = sampler.place_params(params)  # float32 master weights -> bf16 sampling weights.
  assert {x.dtype for x in jax.tree.leaves(placed)} == {jnp.dtype("bfloat16")}
  out = sampler.generate(params, np.asarray(INPUTS), np.arange(2), seed=0, grow_step=0)
  assert out.logprobs.dtype == np.float32 and out.tokens.shape == (4, 4)
