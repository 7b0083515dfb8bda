"""The run config: typed pydantic models (``models``: the run and its run-level sections; ``sections``:
policy, sampler, rewards, prompts), strict loading with ``--set`` overrides
(``loading``), and one-line errors that name the key (``errors``). ``python -m fastcps.config --schema``
prints the JSON Schema (``configs/schema.json``)."""

from fastcps.config.errors import ConfigError
from fastcps.config.loading import from_dict, load_config, save_config, to_dict, validate_tree
from fastcps.config.models import (
    CheckpointConfig,
    DistributedConfig,
    EvalConfig,
    LogConfig,
    MemoryReserveConfig,
    RunConfig,
    TrainConfig,
    schema_json,
)
from fastcps.config.sections import LoraConfig, PolicyConfig, PromptConfig, RewardConfig, SamplerConfig

__all__ = [
    "ConfigError",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
    "validate_tree",
    "CheckpointConfig",
    "DistributedConfig",
    "EvalConfig",
    "LogConfig",
    "LoraConfig",
    "MemoryReserveConfig",
    "PolicyConfig",
    "PromptConfig",
    "RewardConfig",
    "RunConfig",
    "SamplerConfig",
    "TrainConfig",
    "schema_json",
]
