"""The composed run config: ``mmdist.config.run`` (RunConfig, YAML loading, overrides), with its leaves beside it.

Import the module you need (``from mmdist.config.run import load_config``). This
package imports nothing of its own, so that a leaf of it (``mmdist.config.qwen1``,
which the model code reads too) loads without composing every component's
settings; the schema names below come from the leaf ``mmdist.settings``.
"""

from mmdist.settings import ConfigError, Problem, explain, from_dict, to_dict

__all__ = ["ConfigError", "Problem", "explain", "from_dict", "to_dict"]
