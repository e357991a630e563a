"""The online and semi-online baselines' configuration (rest_jax.online), beside ReST's."""

from __future__ import annotations

import dataclasses

from rest_jax.config.checks import require

ALGORITHMS = ("rest", "semi_online", "online")


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """The on-policy loop of ``RunConfig.algorithm`` "online" / "semi_online" (after BC).

  Every ``regrow_every`` optimizer steps the loop samples ``regrow_every x prompts_per_step``
  fresh training prompts x N (``SamplingConfig.num_samples``) from the current policy and
  scores them with the run's reward; each step then trains on one ``prompts_per_step x N``
  slice. "online" (``regrow_every`` 1) uses group-relative advantages (GRPO): (r - mean of the
  prompt's N rewards) / (their std + 1e-6); "semi_online" (ReST re-Grown every k steps) keeps
  the samples with reward >= ``threshold`` and trains BC on them. The optimizer is
  ``ImproveConfig.train``'s (learning rate, warmup, clipping, decay) over ``num_steps``.
  """

  num_steps: int = 20  # Optimizer steps.
  prompts_per_step: int = 16  # B: prompts per step (B x N samples per step).
  regrow_every: int = 4  # k: "semi_online" samples for k steps at once ("online" needs 1).
  kl_coef: float = 0.0  # KL(pi || start policy) penalty (k3 estimator on sampled tokens).
  threshold: float = 1.0  # "semi_online": samples with reward >= this are trained on.
  eval_every: int = 5  # Evaluate (validation and test) and write a summary row every k steps.

  def __post_init__(self):
    for name in ("num_steps", "prompts_per_step", "regrow_every", "eval_every"):
      require(getattr(self, name) >= 1, f"OnlineConfig.{name} must be >= 1, got "
               f"{getattr(self, name)}.")
    require(self.kl_coef >= 0, f"OnlineConfig.kl_coef must be >= 0, got {self.kl_coef}.")
    require(0.0 <= self.threshold <= 1.0,
             f"OnlineConfig.threshold must lie in [0, 1], got {self.threshold}.")
