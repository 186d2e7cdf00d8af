"""What config validation needs to know of a Qwen1 checkpoint without loading it: is it one, and its longest sequence.

Beyond the checkpoint's ``seq_length`` Qwen1 switches on dynamic NTK rotary
scaling and log-n attention scaling, which the native Qwen2 path
(mmdist/models/qwen1.py) does not reproduce, so the run config refuses longer
``data.max_len``. Validation never reaches the network: a local folder, the
local Hugging Face cache, or the published configs listed here. Imports nothing
of mmdist and no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

QWEN1_MODEL_TYPE = "qwen"


def checkpoint_file(name_or_path: str, filename: str, local_only: bool = False) -> Optional[str]:
    """Local path of ``filename`` in a folder or hub repository, or None when it is not there.

    ``local_only``: a hub id is looked up in the local Hugging Face cache only (no network).
    """
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    if os.path.exists(name_or_path):  # a file (e.g. a GGUF): not a Qwen1 folder
        return None
    if local_only:
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(name_or_path, filename)
        except ValueError:  # not a valid repo id (e.g. 'smollm2', 'mmdist:tiny-bytes')
            return None
        return found if isinstance(found, str) else None
    from transformers.utils import cached_file

    try:
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None


# config.json of the Qwen1 releases mmdist's recipes name (as published on the hub), so that `mmdist plan` and
# the max_len check know their shapes without the network. Later Qwen1 releases (e.g. Qwen-7B v1.1) raised
# seq_length to 8192; Qwen-14B's is 2048.
QWEN1_KNOWN_CONFIGS: dict[str, dict] = {
    "qwen/qwen-14b": {
        "model_type": "qwen",
        "architectures": ["QWenLMHeadModel"],
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "intermediate_size": 27392,
        "kv_channels": 128,
        "vocab_size": 152064,
        "seq_length": 2048,
        "max_position_embeddings": 8192,
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "no_bias": True,
        "tie_word_embeddings": False,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
    },
}
QWEN1_KNOWN_CONFIGS["qwen/qwen-14b-chat"] = dict(QWEN1_KNOWN_CONFIGS["qwen/qwen-14b"])


def known_qwen1_config(name: str) -> Optional[dict]:
    """The published config.json of a Qwen1 hub id mmdist knows (case-insensitive), else None."""
    raw = QWEN1_KNOWN_CONFIGS.get(name.lower().rstrip("/")) if name else None
    return dict(raw) if raw is not None else None


def read_qwen1_config(name_or_path: str, local_only: bool = False) -> Optional[dict]:
    """The raw ``config.json`` of ``name_or_path`` if it is a Qwen1 checkpoint (model_type 'qwen'), else None.

    ``local_only``: read a hub id's config from the local cache only, never the network.
    """
    path = checkpoint_file(name_or_path, "config.json", local_only=local_only)
    if path is None:
        return None
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) and raw.get("model_type") == QWEN1_MODEL_TYPE else None


def is_qwen1_checkpoint(name_or_path: str) -> bool:
    """True when ``name_or_path`` (local folder or hub id) holds a Qwen1 checkpoint."""
    return read_qwen1_config(name_or_path) is not None


def first_of(raw: dict, keys: tuple[str, ...], where: str) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    raise ValueError(f"{where}: Qwen1 config has none of {' / '.join(keys)}")


def qwen1_max_positions(name_or_path: str) -> Optional[int]:
    """The longest sequence the native path reproduces exactly (the checkpoint's seq_length); None if not Qwen1.

    Never touches the network (it runs at config validation): a local folder, else a hub id's config.json in the
    local Hugging Face cache, else the published config of a hub id mmdist knows (QWEN1_KNOWN_CONFIGS); an
    uncached unknown hub id is not checked here.
    """
    raw = read_qwen1_config(name_or_path, local_only=True)
    if raw is None and not os.path.exists(name_or_path or ""):
        raw = known_qwen1_config(name_or_path)
    if raw is None:
        return None
    return int(first_of(raw, ("seq_length", "max_position_embeddings", "n_positions"), name_or_path))


def qwen1_max_len_problem(name_or_path: str, max_len: int) -> Optional[str]:
    """Why ``max_len`` cannot be used with this Qwen1 checkpoint, or None when it can (or it is not Qwen1)."""
    limit = qwen1_max_positions(name_or_path)
    if limit is None or max_len <= limit:
        return None
    return (
        f"{max_len} is longer than the Qwen1 checkpoint's seq_length {limit} ({name_or_path}). Beyond seq_length "
        "Qwen1 switches on dynamic NTK rotary scaling and log-n attention scaling, which the native Qwen2 "
        f"architecture does not reproduce; set data.max_len <= {limit}"
    )
