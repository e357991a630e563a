"""The run's configuration: a ``RunConfig`` of frozen dataclasses (mesh, Grow, training, Improve,
evaluation, reward), validated once when built."""

from __future__ import annotations

import dataclasses
import math

from rest_jax.config.checks import one_of, require
from rest_jax.config.online import ALGORITHMS, OnlineConfig
from rest_jax.config.losses import BvmpoConfig, GoldConfig, OacConfig, RaftPpConfig, ValueConfig
from rest_jax.models.base import ModelConfig

PAPER_THRESHOLDS = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh sizes for the (data, fsdp, tensor) axes; one may be -1 ("the rest").

  ``data`` / ``fsdp`` / ``tensor`` are the ICI sizes (within a slice); ``dcn_*`` the DCN sizes
  (across slices, or hosts without slices); a mesh axis is their product. With every DCN size
  1 the ICI sizes span all devices. ``rules`` names a rule set of ``rest_jax.parallel.meshes``: "2d"
  (fsdp + tensor, the default), "fsdp" (ZeRO-3), "tensor" (Megatron) or "data" (pure data
  parallel); each has its sampling variant.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  rules: str = "2d"

  def __post_init__(self):
    for what, sizes in (("", (self.data, self.fsdp, self.tensor)),
                        ("dcn_", (self.dcn_data, self.dcn_fsdp, self.dcn_tensor))):
      require(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
               f"MeshConfig {what}sizes {sizes}: each must be >= 1, and at most one may be -1.")
    rule_sets = ("2d", "fsdp", "tensor", "data")
    one_of("MeshConfig.rules", self.rules, rule_sets)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How Grow samples: N samples per prompt at a temperature, with optional top-k / top-p."""

  num_samples: int = 4
  temperature: float = 0.8
  top_k: int = 0  # 0 disables top-k.
  top_p: float = 1.0  # 1.0 disables nucleus sampling.
  max_decode_len: int = 64
  batch_size: int = 32  # Prompts per sampler call (global, across hosts).
  # "" samples with the trained params' dtype; "bfloat16" casts float32 master weights once
  # per Grow step (half the weight memory; logits and log-probs stay float32).
  param_dtype: str = ""

  def __post_init__(self):
    require(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}.")
    require(self.temperature > 0 and math.isfinite(self.temperature),
             f"temperature must be a positive number, got {self.temperature}; "
             "use greedy decoding for temperature 0.")
    require(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
    require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
    require(self.max_decode_len >= 1, "max_decode_len must be >= 1.")
    require(self.batch_size >= 1, "SamplingConfig.batch_size must be >= 1.")
    require(self.param_dtype in ("", "float32", "bfloat16"),
            f"SamplingConfig.param_dtype must be '', 'float32' or 'bfloat16', got "
            f"{self.param_dtype!r}.")


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """Adaptive sampling budgets (``rest_jax.grow.adaptive``): Grow samples each prompt in rounds
  of ``SamplingConfig.num_samples`` and stops a prompt once ``min_passing`` of its samples have
  reward >= ``threshold``; unsolved prompts get more rounds, up to ``max_samples`` in all.

  ``max_samples`` 0 turns it off (every prompt gets ``num_samples``). Round r draws sample
  indices ``r * num_samples ..``: the samples a fixed-N Grow with N = max_samples draws there.
  ``threshold`` < 0 ("auto") takes the first threshold the Improve schedule configures (the
  "fixed" schedule's first ``thresholds``, the "linear" schedule's ``start``); the schedules
  relative to the Grow rewards need it set.
  """

  max_samples: int = 0  # N_max; a multiple of SamplingConfig.num_samples (the round size).
  min_passing: int = 1  # k: stop a prompt once it has this many passing samples.
  threshold: float = -1.0  # A sample passes at reward >= threshold; < 0: auto (see above).

  @property
  def enabled(self) -> bool:
    return self.max_samples > 0

  def __post_init__(self):
    require(self.max_samples >= 0,
            f"AdaptiveConfig.max_samples must be >= 0 (0 turns adaptive sampling off), got "
            f"{self.max_samples}.")
    require(self.min_passing >= 1,
            f"AdaptiveConfig.min_passing must be >= 1, got {self.min_passing}.")
    require(not self.enabled or self.min_passing <= self.max_samples,
            f"AdaptiveConfig.min_passing ({self.min_passing}) exceeds max_samples "
            f"({self.max_samples}): no prompt could ever stop early; lower min_passing.")
    require(math.isfinite(self.threshold) and self.threshold <= 1.0,
            f"AdaptiveConfig.threshold must be in [0, 1] (or < 0 for the schedule's first "
            f"threshold), got {self.threshold}.")


@dataclasses.dataclass(frozen=True)
class GrowConfig:
  """One Grow step: sample the policy on every training prompt and score the samples."""

  sampling: SamplingConfig = SamplingConfig()
  adaptive: AdaptiveConfig = AdaptiveConfig()  # Off by default (max_samples = 0).
  chunk_size: int = 256  # Prompts per on-disk chunk (a chunk is the unit of resume).
  include_originals: bool = True  # Keep D in D_g (ReST); False for ReST-EM.
  # A split of prompts without demonstrations ("" for none): Grow samples and scores them like
  # D's prompts (their references are seen only by the reward), but BC never trains on them.
  unlabeled_split: str = ""

  def __post_init__(self):
    require(self.chunk_size >= 1, "GrowConfig.chunk_size must be >= 1.")
    n, a = self.sampling.num_samples, self.adaptive
    require(not a.enabled or (a.max_samples % n == 0 and a.max_samples >= 2 * n),
            f"AdaptiveConfig.max_samples ({a.max_samples}) must be a multiple of "
            f"SamplingConfig.num_samples ({n}, the samples per round) and at least two rounds "
            f"({2 * n}); e.g. max_samples = {max(2, -(-a.max_samples // n)) * n}.")

  @property
  def max_samples(self) -> int:
    """The most samples a prompt can get: N, or N_max with adaptive sampling."""
    return self.adaptive.max_samples if self.adaptive.enabled else self.sampling.num_samples


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
  # dtype of the Adam moments: "" keeps the params' dtype (float32 master weights give float32
  # moments); "float32" with bfloat16 params (ModelConfig.param_dtype) keeps float32 moments.
  moment_dtype: str = ""
  # Sequence packing: the model runs on rows holding several examples each (segment ids and
  # positions, attention within an example; rest_jax.improve.packing). The steps, their
  # examples and the loss are those of the unpacked batch; fewer padding tokens are computed.
  packing: bool = False
  packing_scale: int = 1  # Packed rows are this many times input_len / target_len long.
  gold: GoldConfig = GoldConfig()  # Read by loss "gold" only.
  bvmpo: BvmpoConfig = BvmpoConfig()  # Read by loss "bvmpo" only.
  oac: OacConfig = OacConfig()  # Read by loss "oac" only.
  raft_pp: RaftPpConfig = RaftPpConfig()  # Read by loss "raft_pp" only.

  def __post_init__(self):
    require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}.")
    require(self.num_steps >= 1, "num_steps must be >= 1.")
    require(self.batch_size >= 1, "batch_size must be >= 1.")
    require(self.eval_every >= 1, "eval_every must be >= 1.")
    require(0 <= self.warmup_steps < self.num_steps,
             f"warmup_steps ({self.warmup_steps}) must be in [0, num_steps={self.num_steps}).")
    require(self.patience >= 0, "patience must be >= 0.")
    require(self.packing_scale >= 1, f"packing_scale must be >= 1, got {self.packing_scale}.")
    require(self.moment_dtype in ("", "float32", "bfloat16"),
            f"moment_dtype must be '', 'float32' or 'bfloat16', got {self.moment_dtype!r}.")


@dataclasses.dataclass(frozen=True)
class ScheduleParams:
  """Parameters of the threshold schedules (rest_jax.improve.schedules); each reads only its own."""

  quantiles: tuple[float, ...] = (0.5, 0.75, 0.9)  # "quantile": of the Grow sample rewards.
  percentiles: tuple[float, ...] = (50.0, 75.0, 90.0)  # "per_source_percentile", 0..100.
  gammas: tuple[float, ...] = (0.0, 0.5, 0.9)  # "per_source_interpolation": rising gamma.
  start: float = 0.8  # "linear": threshold of Improve step 1 ...
  end: float = 0.99  # ... and of the last Improve step.

  def __post_init__(self):
    for name in ("quantiles", "percentiles", "gammas"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class ImproveConfig:
  """The Improve steps that follow each Grow step."""

  train: TrainConfig = TrainConfig()
  thresholds: tuple[float, ...] = PAPER_THRESHOLDS
  lr_decay: float = 0.5  # Improve step k (counted over the whole run) uses lr * lr_decay**k.
  restart_from_base: bool = False  # ReST-EM: every Grow step fine-tunes the BC policy again.
  max_per_prompt: int = 0  # Per-prompt top-k: at most K samples, best rewards first; 0 = no cap.
  # Drop every record of a prompt whose samples in the current Grow set all pass (all fail) the
  # step's threshold (Reinforce-Rej, DAPO); see rest_jax.improve.selection.
  drop_all_pass: bool = False
  drop_all_fail: bool = False
  # Threshold schedule (rest_jax.improve.schedules): "fixed" (the `thresholds` list), "quantile",
  # "linear", "per_source_percentile" or "per_source_interpolation".
  schedule: str = "fixed"
  schedule_params: ScheduleParams = ScheduleParams()
  deduplicate: bool = False  # Keep one of the records with the same example_id and targets.
  mix_previous_grows: int = 0  # Also train on the samples of Grow steps g-1..g-k (same filter).
  # Which reward column of the Grow sets the schedule, the selection and the losses read: 0 is
  # the rewards Grow wrote, v >= 1 a version `rest-jax rescore` recorded (rest_jax.grow.versions).
  reward_version: int = 0

  def __post_init__(self):
    object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
    require(len(self.thresholds) >= 1, "ImproveConfig.thresholds is empty.")
    require(all(0.0 <= t <= 1.0 for t in self.thresholds),
             f"thresholds {self.thresholds} must lie in [0, 1] (rewards are normalised).")
    require(all(b > a for a, b in zip(self.thresholds, self.thresholds[1:])),
             f"thresholds {self.thresholds} must be strictly increasing.")
    require(0.0 < self.lr_decay <= 1.0, f"lr_decay must be in (0, 1], got {self.lr_decay}.")
    require(self.max_per_prompt >= 0, "max_per_prompt must be >= 0.")
    require(self.mix_previous_grows >= 0, "mix_previous_grows must be >= 0.")
    require(self.reward_version >= 0,
            f"ImproveConfig.reward_version must be >= 0 (0: the rewards Grow wrote), got "
            f"{self.reward_version}.")
    # The schedule name and its parameters are checked by rest_jax.improve.schedules.from_config
    # (before the workdir is touched), not here: the config imports no library logic.


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation: greedy decoding on D_eval (the "validation" split, which every
  selection uses) and, once per finished phase, on the "test" split (reported only)."""

  num_examples: int = 256  # Validation prompts (the first ones of the split).
  batch_size: int = 128
  max_decode_len: int = 64
  # Reward-hacking monitor: a metric reported next to the reward at every evaluation. "auto":
  # bleu for a chrF reward, chrF for bleu / exact_match (rest_jax.evaluation); "none": off.
  independent_metric: str = "auto"
  # Test prompts evaluated once per finished phase (the first ones of the task's "test" split):
  # None takes num_examples; 0 turns the test evaluation off (as does a task without "test").
  num_test_examples: int | None = None
  # Pass@k and diversity on the test split (rest_jax.diversity): N samples per test prompt at
  # the Grow sampling temperature / top-k / top-p, once per finished phase; 0 turns them off.
  num_test_samples: int = 0
  pass_threshold: float = 1.0  # A test sample counts as correct for pass@k at reward >= this.
  # How far the independent metric may fall while the reward rises before the monitor flags a
  # phase. < 0 ("auto"): MONITOR_NOISE_SIGMAS standard errors of the difference of the two
  # phases' means (each the standard error of the metric's mean over the eval set, the noise a
  # bootstrap over the eval set measures); >= 0: this fixed amount (0 flags any drop).
  monitor_tolerance: float = -1.0

  def __post_init__(self):
    require(self.num_examples >= 1 and self.batch_size >= 1,
             "EvalConfig.num_examples and batch_size must be >= 1.")
    require(math.isfinite(self.monitor_tolerance),
             f"EvalConfig.monitor_tolerance must be a number (< 0: auto), got "
             f"{self.monitor_tolerance}.")
    require(self.num_test_examples is None or self.num_test_examples >= 0,
             f"EvalConfig.num_test_examples must be >= 0 (0 turns the test evaluation off) or "
             f"None (as many as num_examples), got {self.num_test_examples}.")
    require(self.num_test_samples >= 0,
             f"EvalConfig.num_test_samples must be >= 0 (0 turns pass@k / diversity off), got "
             f"{self.num_test_samples}.")
    require(0.0 <= self.pass_threshold <= 1.0,
             f"EvalConfig.pass_threshold must lie in [0, 1] (rewards are normalised), got "
             f"{self.pass_threshold}.")

  @property
  def test_size(self) -> int:
    """How many test prompts to evaluate (0: none)."""
    return self.num_examples if self.num_test_examples is None else self.num_test_examples


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """How the reward named by ``RunConfig.reward`` is built (see rest_jax.rewards.build_reward).

  ``range`` is the reward's declared (lo, hi): raw values are mapped to (v - lo) / (hi - lo),
  which must land in [0, 1]. The remote settings apply to ``reward = "remote:URL"`` only.
  """

  range: tuple[float, float] = (0.0, 1.0)
  timeout_s: float = 30.0  # Per HTTP request.
  max_retries: int = 3  # Retries after the first try, with exponential backoff.
  backoff_s: float = 0.5  # First retry delay; doubles each retry.
  max_concurrency: int = 4  # Sub-batches in flight at once.
  request_batch_size: int = 256  # Hypotheses per HTTP request.
  token_env: str = ""  # Name of an env var holding a bearer token ("" sends none).
  batch_size: int = 256  # Hypotheses per forward pass of a learned reward model.

  def __post_init__(self):
    rng = tuple(self.range)
    require(len(rng) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in rng)
             and rng[0] < rng[1],
             f"RewardConfig.range must be two finite numbers lo < hi, got {self.range}.")
    object.__setattr__(self, "range", (float(rng[0]), float(rng[1])))
    require(self.timeout_s > 0, f"RewardConfig.timeout_s must be > 0, got {self.timeout_s}.")
    require(self.max_retries >= 0, "RewardConfig.max_retries must be >= 0.")
    require(self.backoff_s >= 0, "RewardConfig.backoff_s must be >= 0.")
    require(self.max_concurrency >= 1 and self.request_batch_size >= 1 and self.batch_size >= 1,
             "RewardConfig.max_concurrency, request_batch_size and batch_size must be >= 1.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole ReST experiment: BC on D, then G x (Grow, I x Improve)."""

  task: str = "numbers_de_en"
  model: ModelConfig = ModelConfig()
  reward: str = "chrf"  # A name, "learned:DIR", "remote:URL" or "py:module:function".
  reward_config: RewardConfig = RewardConfig()
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
  # Start from a checkpoint instead of a random init: "hf:/path", "t5x:/path" or "orbax:/path"
  # (see rest_jax.checkpoints.convert); ``model`` must describe the same architecture.
  init_checkpoint: str = ""
  # False skips BC (for an already-supervised start): the start is evaluated and used as BC's.
  run_bc: bool = True
  # "rest" (BC, then G x (Grow, I x Improve)), or after BC the on-policy baselines of
  # rest_jax.online: "online" (GRPO) or "semi_online" (ReST re-Grown every k steps).
  algorithm: str = "rest"
  online: OnlineConfig = OnlineConfig()  # Read by "online" / "semi_online" only.

  def __post_init__(self):
    one_of("RunConfig.algorithm", self.algorithm, ALGORITHMS)
    require(self.algorithm == "rest" or not self.grow.adaptive.enabled,
            f"adaptive sampling (AdaptiveConfig.max_samples = {self.grow.adaptive.max_samples}) "
            f"is for algorithm 'rest', not {self.algorithm!r} (whose groups need N samples per "
            "prompt); set AdaptiveConfig.max_samples = 0.")
    require(self.algorithm == "rest" or not self.improve.reward_version,
            f"ImproveConfig.reward_version is read by algorithm 'rest' only, not "
            f"{self.algorithm!r}; set it to 0.")
    require(self.run_bc or bool(self.init_checkpoint),
             "run_bc=False needs RunConfig.init_checkpoint (a supervised checkpoint to start "
             "from); set it or keep run_bc=True.")
    require(self.num_grow_steps >= 0, "num_grow_steps must be >= 0.")
    require(self.num_improve_steps >= 0, "num_improve_steps must be >= 0.")
    require(0 <= self.seed < 2**31, f"seed must be in [0, 2**31), got {self.seed}.")
    require(self.grow.sampling.max_decode_len <= self.target_len,
             f"grow max_decode_len ({self.grow.sampling.max_decode_len}) exceeds target_len "
             f"({self.target_len}); raise target_len or lower max_decode_len.")

  @property
  def adaptive_threshold(self) -> float:
    """The pass threshold of adaptive Grow (``AdaptiveConfig.threshold``, or the first threshold
    the Improve schedule configures).

    Raises:
      RestJaxError: "auto" with a schedule whose thresholds depend on the Grow rewards.
    """
    a, imp = self.grow.adaptive, self.improve
    if a.threshold >= 0:
      return float(a.threshold)
    if imp.schedule == "fixed":
      return float(imp.thresholds[0])
    if imp.schedule == "linear":
      return float(imp.schedule_params.start)
    require(False, f"AdaptiveConfig.threshold is 'auto' but the {imp.schedule!r} schedule "
            "sets its thresholds from the Grow rewards, unknown while Grow samples; set "
            "AdaptiveConfig.threshold (e.g. 1.0 for a binary reward).")
    return 0.0
