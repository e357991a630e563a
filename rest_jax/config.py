"""Frozen, validated configuration dataclasses. Gin binds them (in main.py); the library reads them."""

from __future__ import annotations

import dataclasses
import math

from rest_jax.errors import RestJaxError
from rest_jax.models.base import ModelConfig

PAPER_THRESHOLDS = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise RestJaxError(message)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh sizes for the (data, fsdp, tensor) axes; one may be -1 ("the rest")."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    _require(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
             f"MeshConfig sizes {sizes}: each must be >= 1, and at most one may be -1.")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How Grow samples: N samples per prompt at a temperature, with optional top-k / top-p."""

  num_samples: int = 4
  temperature: float = 0.8
  top_k: int = 0  # 0 disables top-k.
  top_p: float = 1.0  # 1.0 disables nucleus sampling.
  max_decode_len: int = 64
  batch_size: int = 32  # Prompts per sampler call (global, across hosts).

  def __post_init__(self):
    _require(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}.")
    _require(self.temperature > 0 and math.isfinite(self.temperature),
             f"temperature must be a positive number, got {self.temperature}; "
             "use greedy decoding for temperature 0.")
    _require(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
    _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
    _require(self.max_decode_len >= 1, "max_decode_len must be >= 1.")
    _require(self.batch_size >= 1, "SamplingConfig.batch_size must be >= 1.")


@dataclasses.dataclass(frozen=True)
class GrowConfig:
  """One Grow step: sample the policy on every training prompt and score the samples."""

  sampling: SamplingConfig = SamplingConfig()
  chunk_size: int = 256  # Prompts per on-disk chunk (a chunk is the unit of resume).
  include_originals: bool = True  # Keep D in D_g (ReST); False for ReST-EM.
  # A split of prompts without demonstrations ("" for none): Grow samples and scores them like
  # D's prompts (their references are seen only by the reward), but BC never trains on them.
  unlabeled_split: str = ""

  def __post_init__(self):
    _require(self.chunk_size >= 1, "GrowConfig.chunk_size must be >= 1.")


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
    _require(self.horizon >= 1, f"GoldConfig.horizon must be >= 1, got {self.horizon}.")
    _require(0.0 < self.discount <= 1.0, f"GoldConfig.discount must be in (0, 1], got "
             f"{self.discount}.")
    _require(0.0 <= self.weight_floor <= 1.0,
             f"GoldConfig.weight_floor must be in [0, 1], got {self.weight_floor}.")
    _require(self.reward in ("prob", "logprob"),
             f"GoldConfig.reward {self.reward!r} is unknown; use 'prob' or 'logprob'.")


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
    _require(0.0 < self.top_fraction <= 1.0,
             f"BvmpoConfig.top_fraction must be in (0, 1], got {self.top_fraction}.")
    for name in ("eps_eta", "eps_alpha", "init_eta", "init_alpha", "multiplier_lr", "kl_start",
                 "kl_end"):
      _require(getattr(self, name) > 0, f"BvmpoConfig.{name} must be > 0, got "
               f"{getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class OacConfig:
  """Offline actor-critic: -stopgrad(A_t) log pi(y_t | s_t), A_t = return_t - V(s_t)."""

  normalize_advantages: bool = False  # Divide A by its standard deviation over the batch tokens.


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
    _require(0.0 < self.discount <= 1.0, f"ValueConfig.discount must be in (0, 1], got "
             f"{self.discount}.")
    _require(self.learning_rate > 0 and self.num_steps >= 1 and self.batch_size >= 1,
             "ValueConfig.learning_rate must be > 0, num_steps and batch_size >= 1.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One optimisation phase: BC on D, or one Improve step."""

  loss: str = "bc"
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  num_steps: int = 1000  # Upper bound on optimizer steps.
  batch_size: int = 64  # Sequences per step (global).
  eval_every: int = 100
  patience: int = 0  # Stop after this many evaluations without improvement; 0 = never.
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  decay_to_zero: bool = True  # Linear decay from the peak to 0 over num_steps.
  gold: GoldConfig = GoldConfig()  # Read by loss "gold" only.
  bvmpo: BvmpoConfig = BvmpoConfig()  # Read by loss "bvmpo" only.
  oac: OacConfig = OacConfig()  # Read by loss "oac" only.

  def __post_init__(self):
    _require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}.")
    _require(self.num_steps >= 1, "num_steps must be >= 1.")
    _require(self.batch_size >= 1, "batch_size must be >= 1.")
    _require(self.eval_every >= 1, "eval_every must be >= 1.")
    _require(0 <= self.warmup_steps < self.num_steps,
             f"warmup_steps ({self.warmup_steps}) must be in [0, num_steps={self.num_steps}).")
    _require(self.patience >= 0, "patience must be >= 0.")


@dataclasses.dataclass(frozen=True)
class ImproveConfig:
  """The Improve steps that follow each Grow step."""

  train: TrainConfig = TrainConfig()
  thresholds: tuple[float, ...] = PAPER_THRESHOLDS
  lr_decay: float = 0.5  # Improve step k (counted over the whole run) uses lr * lr_decay**k.
  restart_from_base: bool = False  # ReST-EM: every Grow step fine-tunes the BC policy again.
  max_per_prompt: int = 0  # Keep at most this many samples per prompt; 0 = no cap.

  def __post_init__(self):
    object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
    _require(len(self.thresholds) >= 1, "ImproveConfig.thresholds is empty.")
    _require(all(0.0 <= t <= 1.0 for t in self.thresholds),
             f"thresholds {self.thresholds} must lie in [0, 1] (rewards are normalised).")
    _require(all(b > a for a, b in zip(self.thresholds, self.thresholds[1:])),
             f"thresholds {self.thresholds} must be strictly increasing.")
    _require(0.0 < self.lr_decay <= 1.0, f"lr_decay must be in (0, 1], got {self.lr_decay}.")
    _require(self.max_per_prompt >= 0, "max_per_prompt must be >= 0.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation: greedy decoding on D_eval."""

  num_examples: int = 256
  batch_size: int = 128
  max_decode_len: int = 64

  def __post_init__(self):
    _require(self.num_examples >= 1 and self.batch_size >= 1,
             "EvalConfig.num_examples and batch_size must be >= 1.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole ReST experiment: BC on D, then G x (Grow, I x Improve)."""

  task: str = "numbers_de_en"
  model: ModelConfig = ModelConfig()
  reward: str = "chrf"
  input_len: int = 64
  target_len: int = 64
  num_grow_steps: int = 2
  num_improve_steps: int = 2
  seed: int = 0
  mesh: MeshConfig = MeshConfig()
  grow: GrowConfig = GrowConfig()
  bc: TrainConfig = TrainConfig()
  improve: ImproveConfig = ImproveConfig()
  eval: EvalConfig = EvalConfig()
  value: ValueConfig = ValueConfig()  # Used only by losses that need values (bvmpo, oac).

  def __post_init__(self):
    _require(self.num_grow_steps >= 0, "num_grow_steps must be >= 0.")
    _require(self.num_improve_steps >= 0, "num_improve_steps must be >= 0.")
    _require(0 <= self.seed < 2**31, f"seed must be in [0, 2**31), got {self.seed}.")
    _require(self.grow.sampling.max_decode_len <= self.target_len,
             f"grow max_decode_len ({self.grow.sampling.max_decode_len}) exceeds target_len "
             f"({self.target_len}); raise target_len or lower max_decode_len.")
