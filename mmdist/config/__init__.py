"""Typed settings for mmdist: the schema machinery and the composed run config."""

from mmdist.config.run import ModelConfig, RunConfig, dump_config, load_config, parse_overrides
from mmdist.config.schema import ConfigError, Problem, explain, from_dict, to_dict

__all__ = [
    "ConfigError",
    "ModelConfig",
    "Problem",
    "RunConfig",
    "dump_config",
    "explain",
    "from_dict",
    "load_config",
    "parse_overrides",
    "to_dict",
]
