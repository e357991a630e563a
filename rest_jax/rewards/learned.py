"""A learned reward R(x, y): a saved RewardModel (rest_jax.models.scalar_head) used as a RewardFn.

A reward-model directory (written by ``save_reward_model``, read by ``LearnedReward``) holds:

  reward_model.json   {"model": ModelConfig fields, "vocabulary": {"kind": "byte"} or
                       {"kind": "sentencepiece", "path": ...}, "input_len", "target_len",
                       "metrics": {...}}
  params/             the model's parameters (an orbax checkpoint, rest_jax.checkpoints.phases)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
import seqio
from flax import nnx

from rest_jax.checkpoints import phases as checkpoints
from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.models.base import EOS_ID, PAD_ID, ModelConfig
from rest_jax.models.scalar_head import RewardModel
from rest_jax.rewards.fitting import META, PARAMS, write_reward_model_dir
from rest_jax.config import MeshConfig
from rest_jax.parallel.layout import Layout
from rest_jax.parallel.meshes import host_local_layout, layout_from_config



def vocabulary_info(vocab: Any) -> dict[str, str]:
  """The JSON description of a seqio vocabulary (byte or SentencePiece)."""
  if isinstance(vocab, seqio.ByteVocabulary):
    return {"kind": "byte"}
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return {"kind": "sentencepiece", "path": vocab.sentencepiece_model_file}
  raise RestJaxError(f"cannot describe vocabulary {type(vocab).__name__} for a reward model; "
                     "use a seqio ByteVocabulary or SentencePieceVocabulary.")


def make_vocabulary(info: Mapping[str, str]) -> seqio.Vocabulary:
  """Inverse of ``vocabulary_info``."""
  if info.get("kind") == "byte":
    return seqio.ByteVocabulary()
  if info.get("kind") == "sentencepiece":
    return seqio.SentencePieceVocabulary(info["path"])
  raise RestJaxError(f"unknown reward-model vocabulary {dict(info)}; expected kind 'byte' or "
                     "'sentencepiece' (re-save the model with rest-jax train-reward).")


def encode(vocab: seqio.Vocabulary, texts: Sequence[str], length: int) -> np.ndarray:
  """Texts -> int32 `[len(texts), length]`: ids + EOS, truncated (EOS kept last), right-padded."""
  out = np.full((len(texts), length), PAD_ID, np.int32)
  for i, text in enumerate(texts):
    ids = list(vocab.encode(text))[:length - 1] + [EOS_ID]
    out[i, :len(ids)] = ids
  return out


def save_reward_model(directory: str, params: nnx.State, *, model: ModelConfig, vocab: Any,
                      input_len: int, target_len: int,
                      metrics: Mapping[str, Any] | None = None) -> None:
  """Writes params (orbax) and reward_model.json into the new directory ``directory``."""
  write_reward_model_dir(directory, params, model=model, vocabulary=vocabulary_info(vocab),
                         input_len=input_len, target_len=target_len, metrics=metrics)


def read_meta(directory: str) -> dict[str, Any]:
  """reward_model.json of a reward-model directory."""
  path = storage.require_file(
      storage.join(directory, META), f"{directory} is not a reward-model directory (no {META}); "
      "train one with `rest-jax train-reward --output_dir DIR` and use reward = 'learned:DIR'.")
  return storage.read_json(path, keys=("model", "vocabulary", "input_len", "target_len"),
                           fix="restore it, or retrain with `rest-jax train-reward`.")


def abstract_params(config: ModelConfig, layout: Layout) -> nnx.State:
  """The RewardModel's params as ShapeDtypeStructs on their Layout shardings."""
  return layout.abstract_state(nnx.state(nnx.eval_shape(
      lambda: RewardModel(config, rngs=nnx.Rngs(0)))))


class LearnedReward:
  """RewardFn of a saved reward model; reference-free (references are ignored).

  The model lives on ``meshes.host_local_layout(layout)`` (default layout: every device, pure
  data parallel): with several processes each host holds its own replica on its own devices and
  scores only the rows it is given, in as many calls as it needs, without the other hosts.
  """

  def __init__(self, directory: str, *, batch_size: int = 256, layout: Layout | None = None):
    directory = storage.absolute(directory)
    meta = read_meta(directory)
    try:
      self.config = ModelConfig(**meta["model"])
      self.input_len, self.target_len = int(meta["input_len"]), int(meta["target_len"])
    except (TypeError, ValueError) as e:
      raise RestJaxError(f"{storage.join(directory, META)} does not describe a reward model "
                         f"({e}); restore it, or retrain with `rest-jax train-reward`.") from None
    self.vocab = make_vocabulary(meta["vocabulary"])
    self.metrics = meta.get("metrics", {})
    layout = host_local_layout(layout or layout_from_config(MeshConfig()))
    shards = layout.num_batch_shards
    self.batch_size = -(-batch_size // shards) * shards
    params = checkpoints.restore_params(storage.join(directory, PARAMS),
                                        abstract_params(self.config, layout))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: RewardModel(self.config, rngs=nnx.Rngs(0))))
    self._params = params
    self._sharding = layout.batch_sharding((self.batch_size, 1))

    @jax.jit
    def forward(params, inputs, targets):
      return nnx.merge(graphdef, params)(inputs, targets)

    self._forward = forward

  def __call__(self, sources: Sequence[str], hypotheses: Sequence[str],
               references: Sequence[str] | None) -> np.ndarray:
    """float32 `[n]` rewards in (0, 1), computed in fixed-size batches (one compilation)."""
    del references
    inputs = encode(self.vocab, sources, self.input_len)
    targets = encode(self.vocab, hypotheses, self.target_len)
    out = []
    for start in range(0, len(hypotheses), self.batch_size):
      x, y = inputs[start:start + self.batch_size], targets[start:start + self.batch_size]
      rows = x.shape[0]
      if rows < self.batch_size:
        x = np.concatenate([x, np.repeat(x[:1], self.batch_size - rows, 0)])
        y = np.concatenate([y, np.repeat(y[:1], self.batch_size - rows, 0)])
      x, y = (jax.device_put(a, self._sharding) for a in (x, y))
      out.append(np.asarray(self._forward(self._params, x, y))[:rows])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0,), np.float32)
