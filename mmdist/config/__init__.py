"""The composed run config (RunConfig, YAML loading, overrides); the schema names are re-exported from mmdist.settings."""

from mmdist.config.run import ModelConfig, RunConfig, dump_config, load_config, parse_overrides
from mmdist.settings import ConfigError, Problem, explain, from_dict, to_dict

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
