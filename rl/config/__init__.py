"""The one typed schema for a run. Recipes (YAML) fill it; `key=value` overrides patch it.

Every option is documented where it is declared: what it does, where it comes from, why the
default. Unknown keys and bad values stop the launch before any work (see `ConfigError`).

- run.py: a run's sections and `RunConfig`;
- eval.py: the `eval` section and the papers' named evaluation protocols;
- prompts.py: the prompt spec `data` and `eval` share;
- algorithm.py: the algorithm's own section, typed by its class;
- loading.py: recipe + overrides -> a validated RunConfig (plug-ins imported first);
- errors.py: `ConfigError` and how validation errors read.
"""
from rl.config.errors import ConfigError
from rl.config.eval import BENCHMARKS, EVAL_PROTOCOLS, PROTOCOL_KEYS, EvalConfig
from rl.config.loading import load_config, parse_overrides, recipe_path
from rl.config.prompts import PromptSpec
from rl.config.run import (
    CheckpointConfig, DataConfig, DiffusionSamplerConfig, LearnerConfig, LoraConfig, ModelConfig, RayConfig,
    RewardConfig, RewardSpec, RolloutConfig, RunConfig, SFTConfig, SyncConfig, TrackingConfig, TrainConfig,
)

__all__ = [
    "BENCHMARKS", "EVAL_PROTOCOLS", "PROTOCOL_KEYS", "CheckpointConfig", "ConfigError", "DataConfig",
    "DiffusionSamplerConfig", "EvalConfig", "LearnerConfig", "LoraConfig", "ModelConfig", "PromptSpec", "RayConfig",
    "RewardConfig", "RewardSpec", "RolloutConfig", "RunConfig", "SFTConfig", "SyncConfig", "TrackingConfig",
    "TrainConfig", "load_config", "parse_overrides", "recipe_path",
]
