"""Checkpoint conversion: HF and T5X parity against stored reference outputs, and round trips.

The HF fixtures (tests/testdata/hf/<layout>/) were written by tests/fixtures_gen/
make_hf_fixtures.py with torch + transformers; the T5X fixture (tests/testdata/t5x_tiny_t5_1_1/)
by t5x itself (see its README). These tests need neither.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rest_jax.checkpoints import convert

from rest_jax.grow import decoding
from rest_jax.checkpoints.convert import (hf_config, load_checkpoint, load_hf, load_t5x, save_hf, save_orbax,
                              save_t5x)
from rest_jax.checkpoints.convert.params import host_arrays
from rest_jax.errors import RestJaxError
from rest_jax.models import ModelConfig, abstract_model
from conftest import mesh_layout

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
HF_LAYOUTS = ("t5_v1_1", "mt5_byt5", "t5_tied_scaled", "llama_gqa", "llama3_rope",
              "qwen2_tied", "mistral_linear")
T5X_DIR = os.path.join(DATA, "t5x_tiny_t5_1_1")
T5X_CONFIG = ModelConfig(kind="encdec", vocab_size=64, d_model=32, num_heads=4, num_kv_heads=4,
                         head_dim=8, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2)


@pytest.fixture(scope="module")
def layout():
  """One device: parity runs compile fastest unpartitioned (sharded loading is tested below)."""
  return mesh_layout(devices=jax.devices()[:1])


def _run(config, params, inputs, targets, *, steps, eos_id):
  """Teacher-forced logits and greedy decode (tokens, per-token log-probs), one jit."""
  graphdef = nnx.split(abstract_model(config))[0]

  @jax.jit
  def run(params, inputs, targets):
    model = nnx.merge(graphdef, params)
    logits = model(inputs, targets)
    first, cache = model.prefill(inputs, steps)
    out = decoding.decode(model.decode_step, first, cache, None, max_decode_len=steps,
                          greedy=True, eos_id=eos_id)
    return logits, out.tokens, out.logprobs

  return jax.device_get(run(params, jnp.asarray(inputs), jnp.asarray(targets)))


def _arrays(params):
  return dict(host_arrays(params))


@pytest.mark.parametrize("name", HF_LAYOUTS)
def test_hf_import_matches_transformers(name, layout):
  path = os.path.join(DATA, "hf", name)
  ref = np.load(os.path.join(path, "reference.npz"))
  config, params = load_hf(path, layout=layout)
  logits, tokens, _ = _run(config, params, ref["inputs"], ref["targets"],
                           steps=ref["greedy_decodes"].shape[1], eos_id=-1)
  assert logits.shape == ref["logits"].shape
  assert np.abs(logits - ref["logits"]).max() <= 1e-4
  np.testing.assert_array_equal(tokens, ref["greedy_decodes"])


def test_hf_config_fields_and_sharding():
  config, params = load_hf(os.path.join(DATA, "hf", "qwen2_tied"),
                           layout=mesh_layout(data=2, fsdp=2, tensor=2))
  assert (config.kind, config.num_heads, config.num_kv_heads, config.head_dim) == (
      "decoder", 4, 2, 8)
  assert config.attention_bias and config.tie_embeddings and config.norm_eps == 1e-6
  gate = params["layers_0"]["mlp"]["gate_proj"]["kernel"].get_value()
  assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # [embed, mlp].
  assert "lm_head" not in params
  rope, _ = load_hf(os.path.join(DATA, "hf", "llama3_rope"))
  assert (rope.rope_scaling_type, rope.rope_scaling_factor, rope.rope_original_max_position,
          rope.rope_theta) == ("llama3", 8.0, 16, 500000.0)
  t5, _ = load_hf(os.path.join(DATA, "hf", "mt5_byt5"))
  assert (t5.num_encoder_layers, t5.num_decoder_layers, t5.relative_attention_num_buckets,
          t5.relative_attention_max_distance) == (3, 1, 16, 32)


def _whole_tensor_import(path: str, config: ModelConfig, shapes: dict) -> dict[str, np.ndarray]:
  """What the HF import gave when it read whole tensors: ``to_ours`` of each full tensor."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  tensors = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    scale = hf_config.t5_head_scale(json.load(f)) if config.kind == "encdec" else 1.0
  out = {}
  for name, shape in shapes.items():
    source = hf_config.hf_name(config, name)
    tensor = tensors.get(source)
    if name == "decoder.logits_dense.kernel" and tensor is None:
      tensor = tensors["shared.weight"] * np.float32(scale)
    elif name == "decoder.logits_dense.kernel":
      tensor = tensor * np.float32(scale)
    elif tensor is None and source == "shared.weight":
      tensor = tensors["encoder.embed_tokens.weight"]
    out[name] = hf_config.to_ours(name, tensor, shape)
  return out


@pytest.mark.parametrize("name", ["t5_tied_scaled", "llama_gqa", "qwen2_tied"])
def test_hf_import_reads_only_the_blocks_of_a_sharded_layout(name, monkeypatch):
  # 8 CPU devices, fsdp x tensor sharding: every read is a slice (the sharded tensors are never
  # read whole), each distinct block once, and the parameters equal the whole-tensor import.
  from rest_jax.checkpoints.convert import hf  # pylint: disable=g-import-not-at-top
  path = os.path.join(DATA, "hf", name)
  reads, read_slice = [], hf.read_slice

  def recorded(file, tensor, index):
    block = read_slice(file, tensor, index)
    reads.append((tensor, tuple(index), block.size))
    return block

  monkeypatch.setattr(hf, "read_slice", recorded)
  config, params = load_hf(path, layout=mesh_layout(data=2, fsdp=2, tensor=2))
  got = _arrays(params)
  want = _whole_tensor_import(path, config, {k: v.shape for k, v in got.items()})
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  sizes = {k: v.size for k, v in safetensors.numpy.load_file(
      os.path.join(path, "model.safetensors")).items()}
  partial = [r for r in reads if r[2] < sizes[r[0]]]
  assert len(partial) > len(reads) // 2  # Most reads are blocks, not tensors...
  keys = [(t, tuple((i.start, i.stop) for i in idx)) for t, idx, _ in reads]
  twice = {k[0] for k in keys if keys.count(k) > 1}  # Each block once per parameter: a tied
  assert twice <= {"shared.weight", "model.embed_tokens.weight"}  # embedding feeds two.
  gate = [r for r in reads if "gate" in r[0] or "wi_0" in r[0]]
  assert gate and all(n == sizes[t] // 4 for t, _, n in gate)  # ... [embed, mlp] over 2 x 2.


@pytest.mark.parametrize("name", ["t5_v1_1", "qwen2_tied", "llama3_rope"])
def test_hf_export_round_trip(name, tmp_path):
  config, params = load_hf(os.path.join(DATA, "hf", name))
  save_hf(str(tmp_path / "out"), config, params)
  config2, params2 = load_hf(str(tmp_path / "out"))
  assert config2 == config
  a, b = _arrays(params), _arrays(params2)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  with open(tmp_path / "out" / "config.json", encoding="utf-8") as f:
    assert json.load(f)["architectures"][0] in ("T5ForConditionalGeneration",
                                                "Qwen2ForCausalLM", "LlamaForCausalLM")
  with pytest.raises(RestJaxError, match="already exists"):
    save_hf(str(tmp_path / "out"), config, params)


def test_hf_bfloat16_weights(tmp_path):
  """bfloat16 safetensors (numpy has no bf16) load, and exports keep bf16."""
  config, params = load_hf(os.path.join(DATA, "hf", "llama_gqa"), dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  assert params["embed"]["embedding"].get_value().dtype == jnp.bfloat16
  save_hf(str(tmp_path / "bf16"), config, params)
  config2, params2 = load_hf(str(tmp_path / "bf16"), dtype="bfloat16")
  a, b = _arrays(params), _arrays(params2)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
])
def test_hf_unsupported_configs_raise(change, match, tmp_path):
  path = tmp_path / "m"
  shutil.copytree(os.path.join(DATA, "hf", "llama_gqa"), path)
  with open(path / "config.json", encoding="utf-8") as f:
    cfg = json.load(f)
  cfg.pop("rope_parameters", None)
  cfg.update(change)
  with open(path / "config.json", "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  with pytest.raises(RestJaxError, match=match):
    load_hf(str(path))


def test_hf_t5_relu_unsupported():
  with pytest.raises(RestJaxError, match="feed_forward_proj='relu'"):
    hf_config.config_from_hf({"model_type": "t5", "feed_forward_proj": "relu"})


def test_t5x_import_matches_t5x(layout):
  ref = np.load(os.path.join(T5X_DIR, "reference.npz"))
  params = load_t5x(os.path.join(T5X_DIR, "checkpoint_200"), config=T5X_CONFIG, layout=layout)
  inputs, targets = ref["encoder_input_tokens"], ref["decoder_target_tokens"]
  logits, tokens, logprobs = _run(T5X_CONFIG, params, inputs, targets, steps=10, eos_id=1)
  weights = ref["decoder_loss_weights"] > 0
  assert np.abs(logits - ref["logits"])[weights].max() <= 1e-5
  token_scores = np.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  scores = (token_scores * ref["decoder_loss_weights"]).sum(-1)
  assert np.abs(scores - ref["sequence_scores"]).max() <= 1e-4
  np.testing.assert_array_equal(tokens, ref["greedy_decodes"])
  assert np.abs(logprobs.sum(-1) - ref["greedy_scores"]).max() <= 1e-4


def test_t5x_export_round_trip(tmp_path):
  src = os.path.join(T5X_DIR, "checkpoint_200")
  params = load_t5x(src, config=T5X_CONFIG)
  out = str(tmp_path / "checkpoint_0")
  save_t5x(out, T5X_CONFIG, params)
  a, b = _arrays(params), _arrays(load_t5x(out, config=T5X_CONFIG))
  assert a.keys() == b.keys() and len(a) == 52
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Same on-disk layout as t5x's: a flattened attention kernel in a zarr directory.
  assert os.path.isfile(os.path.join(out, "target.encoder.layers_0.attention.query.kernel",
                                     "0.0"))
  with pytest.raises(RestJaxError, match="does not match|missing"):
    load_t5x(src, config=dataclasses.replace(T5X_CONFIG, num_encoder_layers=3))


def test_load_checkpoint_formats(tmp_path):
  config, params = load_checkpoint("hf:" + os.path.join(DATA, "hf", "llama_gqa"))
  save_orbax(str(tmp_path / "orbax"), config, params)
  config2, params2 = load_checkpoint(str(tmp_path / "orbax"))  # Detected from model_config.json.
  assert config2 == config
  a, b = _arrays(params), _arrays(params2)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  _, t5x_params = load_checkpoint(os.path.join(T5X_DIR, "checkpoint_200"), config=T5X_CONFIG)
  assert len(_arrays(t5x_params)) == 52
  with pytest.raises(RestJaxError, match="does not record its architecture"):
    load_checkpoint("t5x:" + os.path.join(T5X_DIR, "checkpoint_200"))
  with pytest.raises(RestJaxError, match="does not match the configured model"):
    load_checkpoint(os.path.join(DATA, "hf", "llama_gqa"),
                    config=dataclasses.replace(config, num_kv_heads=4))
  with pytest.raises(RestJaxError, match="cannot tell the checkpoint format"):
    load_checkpoint(str(tmp_path))


def test_reorder_vocab_moves_token_rows_and_output_columns():
  """An imported table is re-indexed to a vocabulary that swaps tokenizer ids (PAD 0 / EOS 1)."""
  path = os.path.join(DATA, "hf", "llama_gqa")
  config, params = load_checkpoint(f"hf:{path}")
  embed = np.asarray(params["embed"]["embedding"][...])
  head = np.asarray(params["lm_head"]["kernel"][...])
  perm = np.arange(60)
  perm[[1, 2]] = [2, 1]  # Tokenizer: <s> 1, </s> 2 -> model EOS 1 is the tokenizer's 2.
  out = convert.reorder_vocab(config, params, perm)
  full = np.concatenate([perm, np.arange(60, config.vocab_size)])
  np.testing.assert_array_equal(np.asarray(out["embed"]["embedding"][...]), embed[full])
  np.testing.assert_array_equal(np.asarray(out["lm_head"]["kernel"][...]), head[:, full])
  with pytest.raises(RestJaxError, match="tokenizer has 65 tokens"):
    convert.reorder_vocab(config, params, np.arange(65))
