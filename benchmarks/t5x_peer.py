"""t5x's own train step and ``temperature_sample`` on our T5.1.1 ``wmt_base`` shapes (a peer).

Runs only in a separate environment where t5x is installed (``--t5x_python`` of
``benchmarks.run``, see docs/benchmarks.md); never imported by rest_jax. Reads a JSON request
on the command line, prints one JSON line of results: seconds and tokens/s of t5x's
``Trainer`` step (AdamW + clipping like ours, or t5x's default Adafactor) and of
``EncoderDecoderModel.predict_batch_with_aux`` with ``decoding.temperature_sample`` (EOS never
emitted, so every row decodes every token), each timed as ours: best of the repeats after a
compile run. With ``"interleave": true`` (rest_jax importable too) it also builds our Improve
step and Grow call of the same case and alternates the timed runs (ours, t5x, ours, ...), so
load from other processes on a shared machine hits both alike.
"""

from __future__ import annotations

import functools
import json
import os
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


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


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


def train_call(cfg: dict[str, Any], *, batch: int, input_len: int, target_len: int,
               optimizer: str):
  """One t5x ``Trainer`` train step on random tokens, ready to time."""
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

  return run


def sample_call(cfg: dict[str, Any], *, prompts: int, num_samples: int, input_len: int,
                max_decode_len: int, temperature: float):
  """t5x ``temperature_sample`` (jitted predict_batch_with_aux) on random prompts, ready to
  time; it checks that every row decoded every token (no EOS)."""
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
  def run():
    tokens, _ = jax.block_until_ready(predict(params, data, jax.random.PRNGKey(2)))
    if np.any(np.asarray(tokens) == 0):
      raise RuntimeError("t5x temperature_sample ended a row early")

  return run


def _time_pair(theirs, ours, repeats: int) -> dict[str, Any]:
  """Best seconds of each after a first (compile) call, the timed calls alternating."""
  calls = {"t5x": theirs} | ({"ours": ours} if ours else {})
  first = {name: _seconds(fn) for name, fn in calls.items()}
  best = {name: float("inf") for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      best[name] = min(best[name], _seconds(fn))
  return {"seconds": best["t5x"], "compile_and_first_s": first["t5x"],
          **({"ours_seconds": best["ours"]} if ours else {})}


def _ours(request: dict[str, Any]):
  """Our workloads module and ModelConfig of the request's preset, or (None, None)."""
  if not request.get("interleave"):
    return None, None
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import workloads  # pylint: disable=import-outside-toplevel
  return workloads, workloads.model_config(request["preset"], dtype="float32",
                                           param_dtype="float32")


def main() -> int:
  request = json.loads(sys.argv[1])
  cfg, repeats = request["config"], request["repeats"]
  workloads, ours_config = _ours(request)
  out: dict[str, Any] = {"jax_version": jax.__version__, "improve": [], "grow": []}
  for case in request["improve"]:
    ours = workloads and case["optimizer"] == "adamw" and workloads.train_step_call(
        ours_config, **{k: case[k] for k in ("batch", "input_len", "target_len")})
    times = _time_pair(train_call(cfg, **case), ours, repeats)
    tokens = case["batch"] * (case["input_len"] + case["target_len"])
    out["improve"].append({**case, "tokens": tokens, **times,
                           "tokens_per_s": tokens / times["seconds"]})
  for case in request["grow"]:
    ours = workloads and workloads.grow_call(ours_config, temperature=request["temperature"],
                                             **case)
    times = _time_pair(sample_call(cfg, temperature=request["temperature"], **case), ours,
                       repeats)
    tokens = case["prompts"] * case["num_samples"] * case["max_decode_len"]
    out["grow"].append({**case, "rows": case["prompts"] * case["num_samples"],
                        "tokens": tokens, **times, "tokens_per_s": tokens / times["seconds"]})
  print("T5X_PEER_RESULT " + json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
