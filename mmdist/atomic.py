"""Atomic file writes: write a temporary file beside the target, flush it to disk, rename it over.

Run folders hold files that a crash must never leave half-written (the resolved config, the
``latest`` checkpoint pointer, export manifests, the demo's state, metrics rewritten at resume):
a reader sees either the old file or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically; returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
