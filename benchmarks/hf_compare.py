"""Our decoder-only sampler against ``transformers``' ``generate`` on the same weights.

Greedy (``Sampler.greedy`` vs ``do_sample=False``) and sampled (the Grow sampler,
``Sampler.generate`` at a temperature, vs ``do_sample=True`` at the same temperature, top-k and
top-p off on both sides). Needs torch, transformers and
``rest_jax.checkpoints.convert.hf.save_hf``; skipped (with the reason) when any is missing. Both
sides decode ``max_new_tokens`` tokens for every row (EOS suppressed).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np

from benchmarks.ceilings import timed
from benchmarks.workloads import NEVER_EOS, _model, random_tokens
from rest_jax.models.base import ModelConfig
from rest_jax.grow.sampler import Sampler
from rest_jax.config import MeshConfig
from rest_jax.parallel.meshes import layout_from_config


def unavailable() -> str | None:
  """Why the comparison cannot run here, or None."""
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    import transformers  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return f"torch/transformers not installed ({e})"
  try:
    from rest_jax.checkpoints.convert.hf import save_hf  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return f"rest_jax.checkpoints.convert.hf.save_hf not available ({e})"
  return None


def _row(mode: str, batch: int, input_len: int, max_new_tokens: int, t_ours: dict,
         t_hf: dict) -> dict[str, Any]:
  tokens = batch * max_new_tokens
  return {"mode": mode, "batch": batch, "input_len": input_len, "max_new_tokens": max_new_tokens,
          "ours_s": t_ours["min_s"], "hf_s": t_hf["min_s"],
          "ours_tokens_per_s": tokens / t_ours["min_s"], "hf_tokens_per_s": tokens / t_hf["min_s"],
          "speedup": t_hf["min_s"] / t_ours["min_s"]}


def compare(config: ModelConfig, *, batches: list[int], input_len: int, max_new_tokens: int,
            repeats: int, temperature: float = 0.8) -> list[dict[str, Any]]:
  """tokens/s of ours and of ``LlamaForCausalLM.generate`` at each batch size: a greedy row
  (with the fraction of equal tokens) and a sampled row at ``temperature`` per batch."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import LlamaForCausalLM  # pylint: disable=import-outside-toplevel

  from rest_jax.checkpoints.convert.hf import save_hf  # pylint: disable=import-outside-toplevel

  if config.kind != "decoder":
    raise ValueError("the transformers comparison uses the decoder-only (Llama) family")
  graphdef, params, _ = _model(config)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
  torch.set_grad_enabled(False)
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model")
    save_hf(path, config, params)
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch_dtype).to(device).eval()
  layout = layout_from_config(MeshConfig(), devices=jax.local_devices()[:1])
  rows = []
  for batch in batches:
    inputs = random_tokens(batch, input_len, config.vocab_size, seed=4)
    ids = torch.as_tensor(inputs, dtype=torch.long, device=device)
    out = {}

    def run_hf(**sampling):
      out["hf"] = hf.generate(
          ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
          min_new_tokens=max_new_tokens, pad_token_id=0, **sampling)
      if device == "cuda":
        torch.cuda.synchronize()

    for mode in ("greedy", "sampled"):
      sampler = Sampler(graphdef, layout, num_samples=1, max_decode_len=max_new_tokens,
                        batch_size=batch, eos_id=NEVER_EOS, temperature=temperature)
      placed = sampler.place_params(params)
      if mode == "greedy":
        ours = lambda: out.__setitem__("ours", sampler.greedy(placed, inputs)[0])
        theirs = lambda: run_hf(do_sample=False)
      else:
        ours = lambda: out.__setitem__("ours", sampler.generate(
            placed, inputs, np.arange(batch), seed=0, grow_step=0).tokens)
        theirs = lambda: run_hf(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
      row = _row(mode, batch, input_len, max_new_tokens, timed(ours, repeats=repeats),
                 timed(theirs, repeats=repeats))
      hf_tokens = out["hf"][:, input_len:].cpu().numpy()
      assert hf_tokens.shape == out["ours"].shape, (hf_tokens.shape, out["ours"].shape)
      if mode == "greedy":
        row["first_token_agreement"] = float(np.mean(hf_tokens[:, 0] == out["ours"][:, 0]))
        row["token_agreement"] = float(np.mean(hf_tokens == out["ours"]))
      else:
        row["temperature"] = temperature
      row["torch_threads"] = torch.get_num_threads()
      rows.append(row)
  return rows
