"""The rewards of tests/test_multihost_rewards.py; as a script, one of its 2 processes.

``make(DIR)``: writes a tiny random reward model (the 'tiny' preset, score head scaled by 4 so
the rewards spread over (0, 1)) into DIR (conftest's ``reward_model``).
``results(...)``: builds each reward the way a run does (``pipeline.build.make_reward`` on the
run's Layout), then
  * scores the given rows with it (Grow: each host its own share, a different number of calls
    per host), and
  * runs the evaluation function (greedy decodes of a fake sampler, scored on every host, with
    the reward-hacking monitor's independent metric, BLEU).
``python multihost_reward_worker.py score JSON``: starts jax.distributed (2 processes) and
writes ``results`` of this host's rows to JSON["out"].p{process}.npz.
"""

import json
import sys

import numpy as np

SOURCES = [f"n{i} " + "abcdefgh"[: i % 8] for i in range(21)]
HYPOTHESES = [("x" * (i % 5)) + str(i * 7) for i in range(21)]
REFERENCES = [str(i * 7) for i in range(21)]
SPLIT = 13  # Process 0 scores rows [0, 13), process 1 rows [13, 21) (Grow: its own samples).


def make(directory: str, scale: float = 4.0) -> None:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from rest_jax.models.presets import get_preset  # pylint: disable=g-import-not-at-top
  from rest_jax.models.scalar_head import RewardModel  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards.learned import save_reward_model  # pylint: disable=g-import-not-at-top
  model = get_preset("tiny")
  params = nnx.state(RewardModel(model, rngs=nnx.Rngs(7)), nnx.Param)
  kernel = params["score_head"]["kernel"]
  kernel.set_value(kernel.get_value() * scale)
  save_reward_model(directory, params, model=model, vocab=seqio.ByteVocabulary(), input_len=16,
                    target_len=16)


def results(rewards: dict, layout, rows: slice) -> dict:
  """Each reward (name -> spec) built as a run builds it on ``layout``: its Grow rewards of
  ``rows`` (``{name}_grow``) and the evaluation function's metrics (``{name}_eval_*``)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from rest_jax.config import RewardConfig, RunConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.evaluation import EvalSet, make_eval_fn  # pylint: disable=g-import-not-at-top
  from rest_jax.grow.fake import FakeSampler  # pylint: disable=g-import-not-at-top
  from rest_jax.pipeline.build import make_reward, reward_call  # pylint: disable=g-import-not-at-top
  from rest_jax.rewards import get_reward  # pylint: disable=g-import-not-at-top
  from rest_jax.tasks.data import pad_rows  # pylint: disable=g-import-not-at-top

  vocab = seqio.ByteVocabulary()
  # The fake sampler's greedy decode echoes the prompt: the eval hypotheses are HYPOTHESES.
  eval_set = EvalSet(inputs=pad_rows([vocab.encode(h) for h in HYPOTHESES], 16),
                     sources=SOURCES, references=REFERENCES)
  out = {}
  for name, spec in rewards.items():
    # batch_size 4: process 0 calls the model 4 times, process 1 twice (the last one padded);
    # request_batch_size 3: process 0 sends 5 requests, process 1 three.
    config = RunConfig(reward=spec, reward_config=RewardConfig(batch_size=4,
                                                               request_batch_size=3))
    reward = make_reward(config, layout)
    out[f"{name}_grow"] = reward(SOURCES[rows], HYPOTHESES[rows], REFERENCES[rows])
    eval_fn = make_eval_fn(sampler=FakeSampler(max_decode_len=16), eval_set=eval_set,
                           reward=reward, vocab=vocab, batch_size=8,
                           independent=reward_call(get_reward("bleu"), "bleu"))
    for key, value in eval_fn(None).items():
      out[f"{name}_{key}"] = np.float64(value)
  return out


def score(args: dict) -> None:
  """One of 2 processes: its own rows on the run's Layout (DCN data over the processes, ICI
  fsdp 2), the results in ARGS["out"].p{process}.npz."""
  from rest_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(distributed.DistributedSettings(
      coordinator_address=args["coordinator"], num_processes=2, process_id=args["process_id"],
      heartbeat_timeout_s=60))
  import jax  # pylint: disable=g-import-not-at-top
  from rest_jax.config import MeshConfig  # pylint: disable=g-import-not-at-top
  from rest_jax.parallel.meshes import layout_from_config  # pylint: disable=g-import-not-at-top

  layout = layout_from_config(MeshConfig(data=-1, fsdp=2, dcn_data=2))
  me = jax.process_index()
  rows = slice(0, SPLIT) if me == 0 else slice(SPLIT, len(SOURCES))
  np.savez(f"{args['out']}.p{me}.npz", **results(args["rewards"], layout, rows))
  print(f"process {me} of 2: scored rows {rows.start}-{rows.stop}", flush=True)


if __name__ == "__main__":
  score(json.loads(sys.argv[2]))
