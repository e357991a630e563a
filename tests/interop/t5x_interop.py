"""T5X interop, checked by t5x itself (not part of the test suite; t5x is never a dependency).

1. Our random-init T5.1.1 model (dims >= 128, so t5x's Adafactor factors its kernels) is
   exported with ``save_t5x`` (what ``rest-jax export --to t5x`` writes).
2. t5x restores the export through both of its paths: ``checkpoints.load_t5x_checkpoint``, and
   ``utils.TrainStateInitializer.from_checkpoint`` with ``RestoreCheckpointConfig(mode=
   'specific')``, strict and not, under t5x's default optimizer (``adafactor.Adafactor`` as in
   ``t5_1_1/base.gin``). t5x's logits (``EncoderDecoderModel._compute_logits``) are compared
   with ours, and the restored optimizer state with a fresh ``optimizer_def.init_state``.
3. The restored train state takes one t5x training step, t5x's ``Checkpointer`` saves it, and
   our ``load_t5x`` imports that t5x-written checkpoint: logits compared with t5x's again.

Setup and command: docs/checkpoints.md ("Checked with t5x itself"). Exits 1 if a logit
difference exceeds --atol or a structure differs; prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
from absl import logging
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization, traverse_util

import seqio
from t5x import adafactor, checkpoints, models, partitioning, utils
from t5x.examples.t5 import network

from rest_jax.checkpoints.convert import load_t5x, save_t5x
from rest_jax.models import ModelConfig, build_model

CONFIG = ModelConfig(kind="encdec", vocab_size=256, d_model=128, num_heads=4, num_kv_heads=4,
                     head_dim=32, mlp_dim=256, num_encoder_layers=2, num_decoder_layers=2)
T5_CONFIG = network.T5Config(
    vocab_size=256, dtype=jnp.float32, emb_dim=128, num_heads=4, num_encoder_layers=2,
    num_decoder_layers=2, head_dim=32, mlp_dim=256, mlp_activations=("gelu", "linear"),
    dropout_rate=0.0, logits_via_embedding=False)
INPUT_LEN, TARGET_LEN, BATCH = 12, 10, 3


def make_batch(seed: int = 7) -> dict[str, np.ndarray]:
  """A padded encoder-decoder batch as seqio.EncDecFeatureConverter(pack=False) makes it."""
  rng = np.random.default_rng(seed)
  inputs = np.zeros((BATCH, INPUT_LEN), np.int32)
  targets = np.zeros((BATCH, TARGET_LEN), np.int32)
  for row, (n_in, n_out) in enumerate(((11, 9), (6, 5), (3, 2))):
    inputs[row, :n_in] = rng.integers(2, CONFIG.vocab_size, n_in)
    inputs[row, n_in] = 1
    targets[row, :n_out] = rng.integers(2, CONFIG.vocab_size, n_out)
    targets[row, n_out] = 1
  decoder_inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_input_tokens": decoder_inputs,
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


def our_logits(params: nnx.State, batch: dict[str, np.ndarray]) -> np.ndarray:
  graphdef = nnx.graphdef(build_model(CONFIG, rngs=nnx.Rngs(0)))
  run = jax.jit(lambda p, x, y: nnx.merge(graphdef, p)(x, y))
  return np.asarray(run(params, batch["encoder_input_tokens"], batch["decoder_target_tokens"]))


def t5x_model() -> models.EncoderDecoderModel:
  vocab = seqio.PassThroughVocabulary(CONFIG.vocab_size, eos_id=1)
  optimizer = adafactor.Adafactor(decay_rate=0.8, step_offset=0,
                                  logical_factor_rules=adafactor.standard_logical_factor_rules())
  return models.EncoderDecoderModel(module=network.Transformer(T5_CONFIG), input_vocabulary=vocab,
                                    output_vocabulary=vocab, optimizer_def=optimizer)


def max_diff(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> float:
  """Max |a - b| over the non-padded target positions (padded rows attend to nothing)."""
  return float(np.abs(np.asarray(a) - np.asarray(b))[weights > 0].max())


def shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, tree), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="empty scratch directory")
  parser.add_argument("--atol", type=float, default=1e-4)
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)  # t5x warns once per param about its factor rules.
  batch = make_batch()
  weights = batch["decoder_loss_weights"]
  results: dict[str, object] = {}
  ok = True

  # 1. Our model, exported.
  params = nnx.state(build_model(CONFIG, rngs=nnx.Rngs(3)))
  ours = our_logits(params, batch)
  export = os.path.join(args.out, "export", "checkpoint_5")
  save_t5x(export, CONFIG, params, step=5)

  # 2a. t5x.checkpoints.load_t5x_checkpoint.
  model = t5x_model()
  compute = jax.jit(model._compute_logits)  # pylint: disable=protected-access
  loaded = checkpoints.load_t5x_checkpoint(export)
  results["load_t5x_checkpoint_logits_max_abs_diff"] = max_diff(
      compute(loaded["target"], batch), ours, weights)
  results["param_states_match_fresh_adafactor"] = _states_match(model, loaded)
  ok &= results["param_states_match_fresh_adafactor"]

  # 2b. TrainStateInitializer.from_checkpoint, mode='specific', strict and not.
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  shapes_in = {k: v.shape for k, v in batch.items()}
  initializer = utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
      input_shapes=shapes_in, partitioner=partitioner)
  state = None
  for strict in (True, False):
    cfg = utils.RestoreCheckpointConfig(path=export, mode="specific", strict=strict,
                                        dtype="float32")
    state = initializer.from_checkpoint([cfg])
    results[f"from_checkpoint_strict={strict}_logits_max_abs_diff"] = max_diff(
        compute(state.params, batch), ours, weights)
    results[f"from_checkpoint_strict={strict}_step"] = int(state.step)

  # 3. One t5x Adafactor step on the restored state, saved by t5x, imported by us.
  grads = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])(state.params)
  trained = state.apply_gradient(grads, learning_rate=1e-2)
  results["t5x_step_after_restore"] = int(trained.step)
  t5x_dir = os.path.join(args.out, "t5x_written")
  checkpoints.Checkpointer(trained, partitioner, t5x_dir).save(trained)
  reimported = load_t5x(os.path.join(t5x_dir, f"checkpoint_{int(trained.step)}"), config=CONFIG)
  results["t5x_saved_then_load_t5x_logits_max_abs_diff"] = max_diff(
      our_logits(reimported, batch), compute(trained.params, batch), weights)
  results["logits_abs_max"] = float(np.abs(ours).max())

  diffs = [v for k, v in results.items() if k.endswith("max_abs_diff")]
  ok &= all(d <= args.atol for d in diffs)
  results["ok"] = bool(ok)
  print(json.dumps(results))
  return 0 if ok else 1


def _states_match(model: models.EncoderDecoderModel, loaded: dict) -> bool:
  """Whether the restored param_states have exactly the shapes of t5x's own fresh state."""
  fresh = serialization.to_state_dict(model.optimizer_def.init_state(loaded["target"]))
  fresh_dict = jax.tree_util.tree_map(np.asarray, fresh["param_states"])
  got, want = shapes(loaded["state"]["param_states"]), shapes(fresh_dict)
  if got != want:
    print("param_states differ:", {k: (got.get(k), want.get(k))
                                   for k in set(got) | set(want) if got.get(k) != want.get(k)})
  return got == want


if __name__ == "__main__":
  sys.exit(main())
