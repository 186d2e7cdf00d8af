"""Fingerprints of model weights, so a manifest says exactly what an export was made from.

Hashing whole multi-GB weight files at start-up would cost minutes, so a
file-based fingerprint covers each weight file's name, size, first and last
MiB. A model built from ``init_config`` is identified by the config and seed.
A hub id is fingerprinted through its snapshot in the local Hugging Face cache
when there is one (no download), else by the id alone (prefix ``hub:``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5")
MIB = 1 << 20


def _file_digest(h: hashlib._Hash, path: str) -> None:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        if size > 2 * MIB:
            f.seek(size - MIB)
            h.update(f.read(MIB))


def path_fingerprint(path: str, only: str | None = None) -> str:
    """sha256 over a weight file or a folder's weight files (name, size, first and last MiB)."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        _file_digest(h, path)
    elif os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES) and (only is None or n == only))
        for name in names:
            _file_digest(h, os.path.join(path, name))
        if not names:
            h.update(f"dir:{os.path.abspath(path)}".encode())
    else:
        snapshot = _cached_snapshot(path)
        if snapshot is not None:
            return path_fingerprint(snapshot, only)
        h.update(f"hub:{path}".encode())
        return "hub:" + h.hexdigest()[:32]
    return "sha256:" + h.hexdigest()[:32]


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a hub id already in the Hugging Face cache (no download), or None."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, offline, or not a repo id: fall back to the id itself
        return None


def config_fingerprint(config: dict, seed: int) -> str:
    """sha256 of an init_config and its seed (a randomly initialised model)."""
    blob = json.dumps({"config": config, "seed": seed}, sort_keys=True, default=str)
    return "init:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def tensor_fingerprint(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names, shapes and bytes (small modules only)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:32]
