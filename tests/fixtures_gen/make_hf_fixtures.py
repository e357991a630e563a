"""Writes tests/testdata/hf/<layout>/: tiny random HF models, inputs, logits and greedy decodes.

Needs torch and transformers (the tests that read the fixtures need neither):

  PYTHONPATH=. python tests/fixtures_gen/make_hf_fixtures.py [--check_only]
  PYTHONPATH=. python tests/fixtures_gen/make_hf_fixtures.py --tokenizers_only  # tokenizers only

``--tokenizers_only`` (which needs only the ``tokenizers`` package) writes the ``tokenizer.json``
of the layouts in TOKENIZER_LAYOUTS: a 64-token BPE over the text of examples/numbers/ with
``<pad>`` = 0 and ``</s>`` = 1 (the fixtures' pad / eos ids), so that ``rest-jax import`` of
these checkpoints writes a model.gin that runs on the README's own-data example.

For every layout it (1) builds a tiny random model with ``transformers`` (float32, CPU),
(2) saves it with ``save_pretrained`` (config.json + model.safetensors), (3) stores in
``reference.npz`` the inputs, teacher-forced logits ``[batch, target_len, vocab]`` and 20-token
greedy decodes computed by ``transformers`` (rows run one by one, unpadded, for the decoder-only
models), then (4) checks our side both ways and prints the numbers: our loader's logits and
decodes against the reference, and our export (``save_hf``) loaded back by ``transformers``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import json

import numpy as np

try:  # Only the model fixtures need torch / transformers; --tokenizers_only does not.
  import torch
  import transformers
except ImportError:
  torch = transformers = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "testdata", "hf")
DECODE_STEPS = 20

TOKENIZER_LAYOUTS = ("llama_gqa", "t5_v1_1")  # One decoder-only, one T5.
TOKENIZER_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: the fixtures' pad / eos.
TOKENIZER_TEXT = os.path.join(ROOT, "examples", "numbers")


def _layouts() -> dict:
  _COMMON = dict(pad_token_id=0, eos_token_id=1, bos_token_id=0)
  _T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, feed_forward_proj="gated-gelu",
             tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
             pad_token_id=0, eos_token_id=1)
  _LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-5, **_COMMON)

  LAYOUTS = {
      # T5.1.1 / Flan-T5 layout.
      "t5_v1_1": (transformers.T5ForConditionalGeneration,
                  transformers.T5Config(num_layers=2, num_decoder_layers=2, **_T5)),
      # mT5 class, ByT5-like unequal depths, non-default relative-position buckets.
      "mt5_byt5": (transformers.MT5ForConditionalGeneration,
                   transformers.MT5Config(num_layers=3, num_decoder_layers=1,
                                          relative_attention_num_buckets=16,
                                          relative_attention_max_distance=32,
                                          **dict(_T5, vocab_size=96))),
      # Original-T5-style tied, rescaled (d_model ** -0.5) output layer, on a gated-GELU model.
      "t5_tied_scaled": (transformers.T5ForConditionalGeneration,
                         transformers.T5Config(num_layers=1, num_decoder_layers=2,
                                               **dict(_T5, tie_word_embeddings=True))),
      # Llama 2 style with grouped-query attention (4 query heads, 2 kv heads).
      "llama_gqa": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**_LLAMA)),
      # Llama 3 RoPE scaling; original context 16 so every frequency band matters at short lengths.
      "llama3_rope": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
          **dict(_LLAMA, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))),
      # Qwen2: q/k/v biases, tied embeddings.
      "qwen2_tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
          **dict(_LLAMA, tie_word_embeddings=True, rms_norm_eps=1e-6))),
      # Mistral with linear RoPE scaling and one kv head.
      "mistral_linear": (transformers.MistralForCausalLM, transformers.MistralConfig(
          **dict(_LLAMA, num_key_value_heads=1, sliding_window=None,
                 rope_scaling={"rope_type": "linear", "factor": 2.0}))),
  }
  return LAYOUTS


def write_tokenizers() -> None:
  """Writes tokenizer.json into each TOKENIZER_LAYOUTS fixture (64 tokens: the models' vocab)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  lines = []
  for name in sorted(os.listdir(TOKENIZER_TEXT)):
    with open(os.path.join(TOKENIZER_TEXT, name), encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        lines += [row["prompt"], row["reference"]]
  for layout in TOKENIZER_LAYOUTS:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=64, special_tokens=TOKENIZER_SPECIALS, show_progress=False))
    assert tokenizer.get_vocab_size() <= 64, tokenizer.get_vocab_size()
    path = os.path.join(OUT, layout, "tokenizer.json")
    tokenizer.save(path)
    print(f"{layout:15s} tokenizer.json: {tokenizer.get_vocab_size()} tokens -> {path}")


def _no_grad(fn):
  return torch.no_grad()(fn) if torch is not None else fn


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Larger-than-init random weights (so logits have clear margins); norms near 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
        p.copy_(noise)
      elif p.ndim == 1:  # Biases.
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise * p.shape[1] ** -0.5)


def _untie_t5(model: torch.nn.Module, seed: int) -> None:
  """Gives a T5 its own random ``lm_head`` (transformers 5 ties it to ``shared`` by default)."""
  gen = torch.Generator().manual_seed(1000 + seed)
  weight = torch.randn(model.lm_head.weight.shape, generator=gen) * model.config.d_model ** -0.5
  model.lm_head.weight = torch.nn.Parameter(weight)


def _save(model: torch.nn.Module, path: str, *, untied_t5: bool) -> None:
  """``save_pretrained``; an untied T5 is written as hub T5.1.1 checkpoints are (both tensors,
  ``tie_word_embeddings: false``)."""
  model.save_pretrained(path, safe_serialization=True)
  for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(path, extra)):
      os.remove(os.path.join(path, extra))
  if untied_t5:
    import json  # pylint: disable=g-import-not-at-top
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
               if not k.endswith("embed_tokens.weight")}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)


def _inputs(rng: np.random.Generator, vocab: int, *, input_len: int, lengths: list[int],
            target_len: int) -> tuple[np.ndarray, np.ndarray]:
  inputs = np.zeros((len(lengths), input_len), np.int32)
  for row, n in enumerate(lengths):
    inputs[row, :n] = rng.integers(2, vocab, n)
  targets = rng.integers(2, vocab, (len(lengths), target_len)).astype(np.int32)
  return inputs, targets


@_no_grad
def _reference_encdec(model, inputs, targets):
  ids, mask = torch.tensor(inputs, dtype=torch.long), torch.tensor(inputs != 0, dtype=torch.long)
  dec = torch.tensor(np.pad(targets[:, :-1], ((0, 0), (1, 0))), dtype=torch.long)
  logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.numpy()
  encoder = model.get_encoder()(input_ids=ids, attention_mask=mask)
  tokens = torch.zeros((len(inputs), 1), dtype=torch.long)
  margins = []
  for _ in range(DECODE_STEPS):
    step = model(encoder_outputs=encoder, attention_mask=mask, decoder_input_ids=tokens).logits[:, -1]
    top = torch.topk(step, 2).values
    margins.append(float((top[:, 0] - top[:, 1]).min()))
    tokens = torch.cat([tokens, step.argmax(-1, keepdim=True)], axis=1)
  return logits, tokens[:, 1:].numpy().astype(np.int32), min(margins)


@_no_grad
def _reference_decoder(model, inputs, targets):
  logits, decodes, margins = [], [], []
  for row in range(len(inputs)):
    prompt = [int(t) for t in inputs[row] if t != 0] or [0]
    seq = torch.tensor([prompt + list(targets[row, :-1])], dtype=torch.long)
    logits.append(model(input_ids=seq).logits[0, len(prompt) - 1:].numpy())
    tokens = torch.tensor([prompt], dtype=torch.long)
    for _ in range(DECODE_STEPS):
      step = model(input_ids=tokens).logits[0, -1]
      top = torch.topk(step, 2).values
      margins.append(float(top[0] - top[1]))
      tokens = torch.cat([tokens, step.argmax().view(1, 1)], axis=1)
    decodes.append(tokens[0, len(prompt):].numpy())
  return np.stack(logits), np.stack(decodes).astype(np.int32), min(margins)


def _ours(path: str, inputs: np.ndarray, targets: np.ndarray):
  """Our loader's logits and greedy decodes (imported late: needs jax + rest_jax)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rest_jax.checkpoints.convert import load_hf  # pylint: disable=g-import-not-at-top
  from rest_jax.models import abstract_model  # pylint: disable=g-import-not-at-top

  config, params = load_hf(path)
  model = nnx.merge(nnx.split(abstract_model(config))[0], params)
  logits = np.asarray(model(jnp.asarray(inputs), jnp.asarray(targets)))
  step_logits, cache = model.prefill(jnp.asarray(inputs), DECODE_STEPS)
  tokens = []
  for t in range(DECODE_STEPS):
    token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
    tokens.append(np.asarray(token))
    step_logits, cache = model.decode_step(token, cache, jnp.int32(t))
  return config, params, logits, np.stack(tokens, axis=1)


@_no_grad
def _export_check(config, params, hf_model, kind: str, inputs, targets) -> float:
  """Our export loaded by transformers: max |logit diff| against the original HF model."""
  from rest_jax.checkpoints.convert import save_hf  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "export")
    save_hf(out, config, params)
    auto = (transformers.AutoModelForSeq2SeqLM if kind == "encdec"
            else transformers.AutoModelForCausalLM)
    back = auto.from_pretrained(out).eval()
  if kind == "encdec":
    ids = torch.tensor(inputs, dtype=torch.long)
    kw = dict(input_ids=ids, attention_mask=(ids != 0).long(),
              decoder_input_ids=torch.tensor(np.pad(targets[:, :-1], ((0, 0), (1, 0))),
                                             dtype=torch.long))
  else:
    kw = dict(input_ids=torch.tensor(np.concatenate([inputs, targets], axis=1), dtype=torch.long))
  return float((back(**kw).logits - hf_model(**kw).logits).abs().max())


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--check_only", action="store_true", help="do not rewrite the fixtures")
  parser.add_argument("--tokenizers_only", action="store_true",
                      help="only (re)write the tokenizer.json files (needs no torch)")
  args = parser.parse_args()
  if args.tokenizers_only:
    write_tokenizers()
    return 0
  torch.manual_seed(0)
  worst = 0.0
  ok = True
  for index, (layout, (cls, config)) in enumerate(_layouts().items()):
    path = os.path.join(OUT, layout)
    if args.check_only:
      model = cls.from_pretrained(path).eval()
      ref = np.load(os.path.join(path, "reference.npz"))
      inputs, targets = ref["inputs"], ref["targets"]
    else:
      model = cls(config).eval()
      _randomize(model, seed=index)
      untied_t5 = config.is_encoder_decoder and layout != "t5_tied_scaled"
      if untied_t5:
        _untie_t5(model, seed=index)
      rng = np.random.default_rng(index)
      encdec = config.is_encoder_decoder
      inputs, targets = _inputs(rng, config.vocab_size, input_len=10 if encdec else 8,
                                lengths=[10, 6, 2] if encdec else [8, 5, 1], target_len=6)
      if os.path.exists(path):
        shutil.rmtree(path)
      _save(model, path, untied_t5=untied_t5)
    kind = "encdec" if config.is_encoder_decoder else "decoder"
    ref_fn = _reference_encdec if kind == "encdec" else _reference_decoder
    logits, decodes, margin = ref_fn(model, inputs, targets)
    if not args.check_only:
      np.savez(os.path.join(path, "reference.npz"), inputs=inputs, targets=targets,
               logits=logits.astype(np.float32), greedy_decodes=decodes)
    ours_config, params, our_logits, our_decodes = _ours(path, inputs, targets)
    diff = float(np.abs(our_logits - logits).max())
    same = bool((our_decodes == decodes).all())
    export_diff = _export_check(ours_config, params, model, kind, inputs, targets)
    worst = max(worst, diff, export_diff)
    ok &= same and diff <= 1e-4 and export_diff <= 1e-4
    print(f"{layout:15s} import: max|logit diff| {diff:.2e}, greedy {DECODE_STEPS} tokens "
          f"identical: {same} (smallest top-2 margin {margin:.3f}); export -> transformers: "
          f"max|logit diff| {export_diff:.2e}")
  if not args.check_only:
    write_tokenizers()
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f"worst max|diff| {worst:.2e}; fixtures {size / 1e6:.2f} MB; "
        f"torch {torch.__version__}, transformers {transformers.__version__}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
