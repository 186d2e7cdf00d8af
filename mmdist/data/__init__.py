"""Streaming data: WebDataset reader, safe decoding, shard tools, preprocessing, collation/packing, feature cache.

``from mmdist.data import build_loader`` works, but is resolved lazily so that
importing the settings (``mmdist.data.settings``, done by every config command)
does not import torch or webdataset.
"""

from typing import Any

__all__ = ["build_loader"]


def __getattr__(name: str) -> Any:
    if name == "build_loader":
        from mmdist.data.loader import build_loader

        return build_loader
    raise AttributeError(f"module 'mmdist.data' has no attribute {name!r}")
