"""A learned reward model: the T5.1.1 encoder-decoder trunk with a scalar head, R(x, y) in (0, 1).

The encoder reads the source x; the decoder stack reads the whole hypothesis y (its tokens as
they are, not shifted, with bidirectional self-attention over y's non-pad tokens) while
cross-attending to x. The final decoder states are mean-pooled over y's tokens and a
``[embed, 1]`` head gives a logit; the reward is its sigmoid. Parameter tree (logical names):

  token_embedder.embedding                  [vocab, embed]
  encoder.*                                  as rest_jax.models.t5 (Encoder)
  decoder.relpos_bias.rel_embedding          [heads, relpos_buckets] (bidirectional buckets)
  decoder.layers_{i}.*                       as rest_jax.models.t5 (DecoderLayer)
  decoder.decoder_norm.scale                 [embed]
  score_head.kernel                          [embed, 1] ("embed", None)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rest_jax.errors import RestJaxError
from rest_jax.models.base import PAD_ID, ModelConfig
from rest_jax.models.layers import Dense, Embed, RMSNorm, activation_dtypes
from rest_jax.models.t5 import DecoderLayer, Encoder, RelativePositionBias


class ScoringDecoder(nnx.Module):
  """The t5 decoder layers without the vocabulary projection, bidirectional over y."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.num_layers = config.num_decoder_layers
    self.relpos_bias = RelativePositionBias(config, bidirectional=True, rngs=rngs)
    for i in range(self.num_layers):
      setattr(self, f"layers_{i}", DecoderLayer(config, rngs=rngs))
    self.decoder_norm = RMSNorm(config.d_model, eps=config.norm_eps,
                                **activation_dtypes(config))

  def __call__(self, x: jax.Array, *, target_mask: jax.Array, encoded_mask: jax.Array,
               cross_kvs: list) -> jax.Array:
    """Embedded hypotheses `[batch, len, embed]` -> normalised states `[batch, len, embed]`."""
    positions = jnp.arange(x.shape[1])
    bias = self.relpos_bias(positions, positions)
    self_mask = target_mask[:, None, :]
    for i in range(self.num_layers):
      x, _ = getattr(self, f"layers_{i}")(x, cross_kv=cross_kvs[i], cross_mask=encoded_mask,
                                          self_mask=self_mask, self_bias=bias)
    return self.decoder_norm(x)


class RewardModel(nnx.Module):
  """Encoder-decoder scalar reward model (see the module docstring)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.kind != "encdec" or config.num_kv_heads != config.num_heads:
      raise RestJaxError("the reward model uses the encoder-decoder trunk: set ModelConfig.kind="
                         "'encdec' and num_kv_heads = num_heads (e.g. the 'tiny' or 'small' "
                         "preset).")
    self.config = config
    kw = activation_dtypes(config)
    self.token_embedder = Embed(config.vocab_size, config.d_model, rngs=rngs, **kw)
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = ScoringDecoder(config, rngs=rngs)
    self.score_head = Dense((config.d_model,), (1,), ("embed", None), rngs=rngs,
                            dtype=jnp.float32, param_dtype=jnp.dtype(config.param_dtype))

  def logits(self, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Sources `[batch, input_len]`, hypotheses `[batch, target_len]` (right-padded int32)
    -> float32 logits `[batch]`; the reward is ``sigmoid(logits)``."""
    input_mask = inputs != PAD_ID
    target_mask = targets != PAD_ID
    encoded = self.encoder(self.token_embedder(inputs), input_mask)
    cross_kvs = [getattr(self.decoder, f"layers_{i}").encoder_decoder_attention.key_value(encoded)
                 for i in range(self.decoder.num_layers)]
    states = self.decoder(self.token_embedder(targets), target_mask=target_mask,
                          encoded_mask=input_mask[:, None, :], cross_kvs=cross_kvs)
    weights = target_mask.astype(jnp.float32)[..., None]
    pooled = (states.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return self.score_head(pooled)[:, 0]

  def __call__(self, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Rewards float32 `[batch]` in (0, 1) of `[batch, input_len]` x `[batch, target_len]`."""
    return jax.nn.sigmoid(self.logits(inputs, targets))
