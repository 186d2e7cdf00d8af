"""Model core: backbones (LLM, vision, text), connectors, the stage-1 align model and the stage-2 fused VLM. No DeepSpeed here.

The public names are imported lazily so that reading a config (which imports the
settings classes in this package) does not load transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "mmdist.models.build",
    "ModelConfig": "mmdist.models.settings",
    "null_gather": "mmdist.models.gather",
    "AlignModel": "mmdist.models.align",
    "FusedVLM": "mmdist.models.fused",
    "Processors": "mmdist.models.processors",
    "ImageTransform": "mmdist.models.processors",
    "param_table": "mmdist.models.freeze",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmdist.models' has no attribute {name!r}")
