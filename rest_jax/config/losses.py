"""Hyperparameters of the Improve losses that have their own (``TrainConfig.gold`` etc.) and of
the behaviour value network (bvmpo, oac)."""

from __future__ import annotations

import dataclasses
import math

from rest_jax.config.checks import one_of, require


@dataclasses.dataclass(frozen=True)
class GoldConfig:
  """GOLD (Pang and He, 2021): importance-weighted policy gradient with returns from the frozen BC
  policy. ``reward``: "prob" (r_t = pi_BC(y_t | s_t), GOLD-p) or "logprob"
  (r_t = log pi_BC(y_t | s_t) - log_reward_baseline, GOLD-s); each r_t is clipped below at
  ``reward_min``; Q_t sums the next ``horizon`` rewards (from t on) discounted by ``discount``."""

  horizon: int = 5
  discount: float = 1.0
  weight_floor: float = 0.1  # u in w_t = stopgrad(max(pi_theta(y_t | s_t), u)).
  reward: str = "prob"
  log_reward_baseline: float = -5.0
  reward_min: float = 0.0

  def __post_init__(self):
    require(self.horizon >= 1, f"GoldConfig.horizon must be >= 1, got {self.horizon}.")
    require(0.0 < self.discount <= 1.0, f"GoldConfig.discount must be in (0, 1], got "
             f"{self.discount}.")
    require(0.0 <= self.weight_floor <= 1.0,
             f"GoldConfig.weight_floor must be in [0, 1], got {self.weight_floor}.")
    one_of("GoldConfig.reward", self.reward, ("prob", "logprob"))


@dataclasses.dataclass(frozen=True)
class BvmpoConfig:
  """Behaviour V-MPO: top-``top_fraction`` advantages, temperature eta (bound ``eps_eta``), KL trust
  region to the phase's starting policy (multiplier alpha, bound ``eps_alpha``), both multipliers
  learned with Adam at ``multiplier_lr``; plus lambda * KL(pi_behaviour || pi_theta) with lambda
  annealed geometrically from ``kl_start`` to ``kl_end`` over the phase's steps."""

  top_fraction: float = 0.5
  eps_eta: float = 0.1
  eps_alpha: float = 0.01
  init_eta: float = 1.0
  init_alpha: float = 1.0
  multiplier_lr: float = 1e-2
  kl_start: float = 1.0
  kl_end: float = 1e-5

  def __post_init__(self):
    require(0.0 < self.top_fraction <= 1.0,
             f"BvmpoConfig.top_fraction must be in (0, 1], got {self.top_fraction}.")
    for name in ("eps_eta", "eps_alpha", "init_eta", "init_alpha", "multiplier_lr", "kl_start",
                 "kl_end"):
      require(getattr(self, name) > 0, f"BvmpoConfig.{name} must be > 0, got "
               f"{getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class OacConfig:
  """Offline actor-critic: -stopgrad(A_t) log pi(y_t | s_t), A_t = return_t - V(s_t)."""

  normalize_advantages: bool = False  # Divide A by its standard deviation over the batch tokens.


@dataclasses.dataclass(frozen=True)
class RaftPpConfig:
  """RAFT++: BC weighted by rho = pi_theta / pi_behaviour (Grow's stored log-probs), per "token"
  or per "sequence"; ``clip`` "ppo": no gradient where rho > 1 + clip_high (clip_low unread),
  "truncate": weight clip(rho, 1 - clip_low, 1 + clip_high). See improve/losses/raft_pp.py."""

  ratio: str = "token"
  clip: str = "ppo"
  clip_low: float = 0.2  # The ratio range is [1 - clip_low, 1 + clip_high].
  clip_high: float = 0.2

  def __post_init__(self):
    one_of("RaftPpConfig.ratio", self.ratio, ("token", "sequence"))
    one_of("RaftPpConfig.clip", self.clip, ("ppo", "truncate"))
    require(0.0 <= self.clip_low < 1.0 and math.isfinite(self.clip_low),
             f"RaftPpConfig.clip_low must be in [0, 1) (the lowest ratio is 1 - clip_low), got "
             f"{self.clip_low}.")
    require(self.clip_high >= 0.0 and math.isfinite(self.clip_high),
             f"RaftPpConfig.clip_high must be a finite number >= 0 (the highest ratio is "
             f"1 + clip_high), got {self.clip_high}.")


@dataclasses.dataclass(frozen=True)
class ValueConfig:
  """The behaviour value network of BVMPO / OAC: the policy's architecture with a scalar head,
  regressed on the Monte-Carlo returns discount**(T - t) * R of each Grow dataset D_g."""

  discount: float = 1.0
  learning_rate: float = 1e-3
  num_steps: int = 200
  batch_size: int = 64
  init_from_policy: bool = True  # Start the trunk from the BC policy's weights.

  def __post_init__(self):
    require(0.0 < self.discount <= 1.0, f"ValueConfig.discount must be in (0, 1], got "
             f"{self.discount}.")
    require(self.learning_rate > 0 and self.num_steps >= 1 and self.batch_size >= 1,
             "ValueConfig.learning_rate must be > 0, num_steps and batch_size >= 1.")
