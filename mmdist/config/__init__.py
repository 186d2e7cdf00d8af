"""The composed run config (RunConfig, YAML loading, overrides); the schema names are re-exported from mmdist.settings.

The names of mmdist.config.run are resolved on first use, so that a leaf of
this package (mmdist.config.qwen1, which the model code reads too) can be
imported without composing every component's settings.
"""

from typing import Any

from mmdist.settings import ConfigError, Problem, explain, from_dict, to_dict

_FROM_RUN = ("ModelConfig", "RunConfig", "dump_config", "load_config", "parse_overrides")

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


def __getattr__(name: str) -> Any:
    if name in _FROM_RUN:
        from mmdist.config import run

        return getattr(run, name)
    raise AttributeError(f"module 'mmdist.config' has no attribute {name!r}")
