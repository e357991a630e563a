"""Frozen, validated configuration dataclasses. Gin binds them (in rest_jax/cli, as
``config.RunConfig`` etc.); the library reads them. This package imports no library logic.

  run.py      RunConfig and its parts (mesh, Grow, training, Improve, evaluation, reward)
  losses.py   the hyperparameters of the losses that have their own, and the value network
  tasks.py    file and TFDS prompt tasks
  online.py   the online and semi-online baselines
"""

from rest_jax.config.losses import BvmpoConfig, GoldConfig, OacConfig, RaftPpConfig, ValueConfig
from rest_jax.config.run import (PAPER_THRESHOLDS, AdaptiveConfig, EvalConfig, GrowConfig,
                                 ImproveConfig, MeshConfig, RewardConfig, RunConfig,
                                 SamplingConfig, ScheduleParams, TrainConfig)
from rest_jax.config.online import ALGORITHMS, OnlineConfig
from rest_jax.config.tasks import TASK_KINDS, FileTaskConfig, TfdsTaskConfig
from rest_jax.models.base import ModelConfig

__all__ = ["ALGORITHMS", "PAPER_THRESHOLDS", "TASK_KINDS", "AdaptiveConfig", "BvmpoConfig",
           "EvalConfig", "FileTaskConfig", "GoldConfig", "GrowConfig", "ImproveConfig", "MeshConfig",
           "ModelConfig", "OacConfig", "OnlineConfig",
           "RaftPpConfig", "RewardConfig", "RunConfig", "SamplingConfig", "ScheduleParams",
           "TfdsTaskConfig", "TrainConfig", "ValueConfig"]
