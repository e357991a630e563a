"""The t5x peer (``benchmarks/t5x_peer.py``) run in its own environment, and our ratios to it.

t5x is never a dependency: the peer runs as a subprocess under the Python given with
``--t5x_python`` (a virtual environment where t5x, airio and jestimator are installed; see
docs/benchmarks.md), on the same T5.1.1 configuration, batch and lengths as our Improve and
Grow cases of ``profile.t5x_preset``. Our step and call of each case run in the same peer
process, alternating with t5x's (rest_jax imports there too: the environment is made with
``--system-site-packages``), so the ratios hold on a machine shared with other load.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from benchmarks import profiles

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t5x_peer.py")
MARK = "T5X_PEER_RESULT "


def unavailable(python: str | None) -> str | None:
  """Why the peer cannot run, or None."""
  if not python:
    return "no t5x environment given (--t5x_python PATH; see docs/benchmarks.md)"
  if not os.path.exists(python):
    return f"--t5x_python {python}: no such file"
  probe = subprocess.run([python, "-c", "import t5x.trainer, t5x.decoding"],
                         capture_output=True, text=True, check=False)
  if probe.returncode:
    return f"t5x does not import under {python}: {probe.stderr.strip().splitlines()[-1:]}"
  return None


def _request(profile: profiles.Profile, repeats: int) -> dict[str, Any]:
  from rest_jax.models import get_preset  # pylint: disable=import-outside-toplevel
  config = get_preset(profile.t5x_preset)
  return {"preset": profile.t5x_preset, "interleave": True,
          "config": {k: getattr(config, k) for k in (
              "vocab_size", "d_model", "num_heads", "num_encoder_layers", "num_decoder_layers",
              "head_dim", "mlp_dim")},
          "repeats": repeats, "temperature": 1.0,  # As workloads.grow.
          "improve": [dict(batch=c.batch, input_len=c.input_len, target_len=c.target_len,
                           optimizer=opt) for c in profile.improve
                      if c.preset == profile.t5x_preset for opt in ("adamw", "adafactor")],
          "grow": [dict(prompts=c.prompts, num_samples=c.num_samples, input_len=c.input_len,
                        max_decode_len=c.max_decode_len) for c in profile.grow
                   if c.preset == profile.t5x_preset]}


def run_peer(python: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
  """Runs the peer; its results dict."""
  proc = subprocess.run([python, PEER, json.dumps(request)], capture_output=True, text=True,
                        timeout=timeout_s, check=False,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  for line in proc.stdout.splitlines():
    if line.startswith(MARK):
      return json.loads(line[len(MARK):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  raise RuntimeError(f"t5x peer exited {proc.returncode}: {' | '.join(tail)}")


def _ratios(peer: dict[str, Any]) -> list[dict[str, Any]]:
  """Our tokens/s over t5x's, both timed in the peer process, alternating."""
  rows = []
  for theirs in peer["improve"]:
    shape = f"{theirs['batch']} x ({theirs['input_len']} + {theirs['target_len']})"
    if "ours_seconds" in theirs:
      rows.append({"what": "Improve step (both AdamW + clipping)", "shape": shape,
                   "ours_tokens_per_s": theirs["tokens"] / theirs["ours_seconds"],
                   "t5x_tokens_per_s": theirs["tokens_per_s"],
                   "ratio": theirs["seconds"] / theirs["ours_seconds"]})
    else:
      rows.append({"what": f"t5x Improve step ({theirs['optimizer']})", "shape": shape,
                   "ours_tokens_per_s": None, "t5x_tokens_per_s": theirs["tokens_per_s"],
                   "ratio": None})
  for theirs in peer["grow"]:
    rows.append({"what": "Grow (t5x temperature_sample)",
                 "shape": f"{theirs['prompts']} x {theirs['num_samples']} rows, "
                          f"{theirs['input_len']} in, {theirs['max_decode_len']} out",
                 "ours_tokens_per_s": theirs["tokens"] / theirs["ours_seconds"],
                 "t5x_tokens_per_s": theirs["tokens_per_s"],
                 "ratio": theirs["seconds"] / theirs["ours_seconds"]})
  return rows


def section(profile: profiles.Profile, budget: Any, *, selected: bool,
            python: str | None) -> dict[str, Any]:
  """The peer's results and our tokens/s ratios to them, or why it was skipped."""
  if not selected:
    return {"skipped": "section not selected"}
  reason = unavailable(python)
  if reason:
    budget.skipped.append(f"t5x comparison: {reason}")
    print(f"[bench] skip t5x comparison: {reason}", flush=True)
    return {"skipped": reason}
  request = _request(profile, repeats=profile.repeats)
  peer = budget.run(f"t5x peer {profile.t5x_preset}",
                    lambda: run_peer(python, request, timeout_s=1800))
  if not peer:
    return {"skipped": "failed or out of time (see skipped)"}
  # The peer's environment by its versions (in ``peer``), not by this machine's path to it.
  return {"preset": profile.t5x_preset, "peer": peer, "rows": _ratios(peer)}
