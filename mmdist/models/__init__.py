"""Model core: backbones (LLM, vision, text), connectors, the stage-1 align model and the stage-2 fused VLM. No DeepSpeed here.

The public names are imported lazily so that reading a config (which imports the
settings classes in this package) does not load transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

# Load the config package first: its run config imports the settings classes of
# this package, so importing e.g. mmdist.models.llm first would otherwise cycle.
import mmdist.config  # noqa: F401

_EXPORTS = {
    "build_model": "mmdist.models.build",
    "load_stage1": "mmdist.models.build",
    "null_gather": "mmdist.models.gather",
    "AlignModel": "mmdist.models.align",
    "FusedVLM": "mmdist.models.fused",
    "Processors": "mmdist.models.processors",
    "ImageTransform": "mmdist.models.processors",
    "param_table": "mmdist.models.freeze",
    "save_export": "mmdist.models.manifest",
    "read_export": "mmdist.models.manifest",
    "write_export": "mmdist.models.manifest",
    "load_from_export": "mmdist.models.build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmdist.models' has no attribute {name!r}")
