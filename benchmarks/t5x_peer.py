"""t5x's own train step and ``temperature_sample`` on our T5.1.1 ``wmt_base`` shapes (a peer).

Runs only in a separate environment where t5x is installed (``--t5x_python`` of
``benchmarks.run``, see docs/benchmarks.md); never imported by rest_jax. Reads a JSON request
on the command line, prints one JSON line of results: seconds and tokens/s of t5x's
``Trainer`` step (AdamW + clipping like ours, or t5x's default Adafactor) and of
``EncoderDecoderModel.predict_batch_with_aux`` with ``decoding.temperature_sample`` (EOS never
emitted, so every row decodes every token), each timed as ours: best of the repeats after a
compile run.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
from t5x import adafactor, decoding, models, optimizers, partitioning, trainer, utils
from t5x.examples.t5 import network

NEVER_EOS = -1


def _timed(fn, repeats: int) -> dict[str, float]:
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"first_s": first, "min_s": min(times)}


def _model(cfg: dict[str, Any], optimizer: str) -> models.EncoderDecoderModel:
  config = network.T5Config(
      vocab_size=cfg["vocab_size"], dtype=jnp.float32, emb_dim=cfg["d_model"],
      num_heads=cfg["num_heads"], num_encoder_layers=cfg["num_encoder_layers"],
      num_decoder_layers=cfg["num_decoder_layers"], head_dim=cfg["head_dim"],
      mlp_dim=cfg["mlp_dim"], mlp_activations=("gelu", "linear"), dropout_rate=0.0,
      logits_via_embedding=False)
  vocab = seqio.PassThroughVocabulary(size=cfg["vocab_size"], eos_id=NEVER_EOS)
  if optimizer == "adamw":
    opt = optimizers.OptaxWrapper(optax.chain(optax.clip_by_global_norm(1.0),
                                              optax.adamw(1e-4, weight_decay=0.0)))
  else:
    opt = adafactor.Adafactor(decay_rate=0.8, step_offset=0)
  return models.EncoderDecoderModel(
      module=network.Transformer(config), input_vocabulary=vocab, output_vocabulary=vocab,
      optimizer_def=opt, decode_fn=decoding.temperature_sample)


def train(cfg: dict[str, Any], *, batch: int, input_len: int, target_len: int, repeats: int,
          optimizer: str) -> dict[str, Any]:
  """Seconds of one t5x ``Trainer`` train step on random tokens."""
  model = _model(cfg, optimizer)
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  shapes = {"encoder_input_tokens": (batch, input_len), "decoder_input_tokens": (batch, target_len),
            "decoder_target_tokens": (batch, target_len),
            "decoder_loss_weights": (batch, target_len)}
  init = utils.TrainStateInitializer(optimizer_def=model.optimizer_def,
                                     init_fn=model.get_initial_variables, input_shapes=shapes,
                                     partitioner=partitioner)
  state = init.from_scratch(jax.random.PRNGKey(0))
  t = trainer.Trainer(model=model, train_state=state, partitioner=partitioner, eval_names=[],
                      summary_dir=None, train_state_axes=init.train_state_axes,
                      rng=jax.random.PRNGKey(1), learning_rate_fn=lambda step: 1e-4,
                      num_microbatches=None)
  rng = np.random.default_rng(2)
  targets = rng.integers(2, cfg["vocab_size"], (batch, target_len), dtype=np.int32)
  data = {"encoder_input_tokens": rng.integers(2, cfg["vocab_size"], (batch, input_len),
                                               dtype=np.int32),
          "decoder_input_tokens": np.concatenate(
              [np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1),
          "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones((batch, target_len), np.int32)}
  step = t._partitioned_train_step  # pylint: disable=protected-access  (the step alone)
  holder = {"state": t.train_state}

  def run():
    holder["state"], metrics = step(holder["state"], data)
    jax.block_until_ready((holder["state"], metrics))

  times = _timed(run, repeats)
  tokens = batch * (input_len + target_len)
  return {"optimizer": optimizer, "batch": batch, "input_len": input_len,
          "target_len": target_len, "tokens": tokens, "seconds": times["min_s"],
          "compile_and_first_s": times["first_s"], "tokens_per_s": tokens / times["min_s"]}


def sample(cfg: dict[str, Any], *, prompts: int, num_samples: int, input_len: int,
           max_decode_len: int, repeats: int, temperature: float) -> dict[str, Any]:
  """Seconds of t5x ``temperature_sample`` (jitted predict_batch_with_aux) on random prompts."""
  model = _model(cfg, "adamw")
  shapes = {"encoder_input_tokens": (1, input_len), "decoder_input_tokens": (1, max_decode_len)}
  params = model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
  rng = np.random.default_rng(1)
  data = {"encoder_input_tokens": rng.integers(2, cfg["vocab_size"], (prompts, input_len),
                                               dtype=np.int32),
          "decoder_input_tokens": np.zeros((prompts, max_decode_len), np.int32)}
  predict = jax.jit(functools.partial(
      model.predict_batch_with_aux, num_decodes=num_samples, return_all_decodes=True,
      decoder_params={"temperature": temperature, "topk": 0}))
  out = {}

  def run():
    out["tokens"], _ = jax.block_until_ready(predict(params, data, jax.random.PRNGKey(2)))

  times = _timed(run, repeats)
  generated = int(np.sum(np.asarray(out["tokens"]) != 0))
  tokens = prompts * num_samples * max_decode_len
  return {"prompts": prompts, "num_samples": num_samples, "rows": prompts * num_samples,
          "input_len": input_len, "max_decode_len": max_decode_len, "tokens": tokens,
          "nonzero_tokens": generated, "seconds": times["min_s"],
          "compile_and_first_s": times["first_s"], "tokens_per_s": tokens / times["min_s"]}


def main() -> int:
  request = json.loads(sys.argv[1])
  cfg, repeats = request["config"], request["repeats"]
  out: dict[str, Any] = {"jax_version": jax.__version__, "improve": [], "grow": []}
  for case in request["improve"]:
    out["improve"].append(train(cfg, repeats=repeats, **case))
  for case in request["grow"]:
    out["grow"].append(sample(cfg, repeats=repeats, temperature=request["temperature"], **case))
  print("T5X_PEER_RESULT " + json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
