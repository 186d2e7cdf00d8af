"""A GGUF LLM converted once: its dequantised weights, config and tokenizer kept as a plain Hugging Face folder.

transformers reads a GGUF by parsing its metadata (the tokenizer's whole
vocabulary and merges) once for the config, once for the weights and once for
the tokenizer, then dequantises every tensor: for SmolLM2-135M that is ~15 s on
an idle 2-core CPU, paid by every process that loads it (a demo loads it twice,
the tests many times). The converted folder loads in about a second with the
same values (dequantisation is exact in fp32, the folder keeps fp32).

The folder sits under ``MMDIST_GGUF_CACHE`` (default ``~/.cache/mmdist/gguf``;
``off`` disables the cache), named by the file's name, size and a hash of its
first and last MiB, so a changed file is converted again. A conversion is
written to a temporary folder and renamed when complete: a crash or a second
process converting at the same time never leaves a half folder in use, and a file lock lets one
process convert while the others (the other ranks of a job) wait and then read its folder. An
unwritable cache is not an error: the GGUF is then read directly, without a cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from mmdist import console

logger = logging.getLogger(__name__)

CACHE_ENV = "MMDIST_GGUF_CACHE"
FORMAT = 1  # bump when the folder's layout changes
_DONE = "mmdist-gguf-conversion.txt"


def cache_root() -> Optional[Path]:
    """The cache folder, or None when ``MMDIST_GGUF_CACHE`` is ``off``/``0``."""
    configured = os.environ.get(CACHE_ENV, "")
    if configured.lower() in ("off", "0", "false", "no"):
        return None
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmdist" / "gguf"


def cache_key(path: str | os.PathLike) -> str:
    """``<name>-<size>-<hash>``: a changed file (size, header, tensor tail) gets another folder."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{FORMAT}:{size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return f"{path.stem}-{size}-{digest.hexdigest()[:16]}"


def convert(folder: str, gguf: str, target: Path) -> tuple[Any, Any]:
    """Dequantise ``folder/gguf`` into an HF folder at ``target`` (fp32 weights, config, tokenizer); returns both."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with console.quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # save_pretrained refuses a model loaded from a GGUF ("quantized with gguf"); its dequantised fp32 weights
    # are plain tensors, so the folder is written from the parts: config (without the GGUF marker) and weights.
    from safetensors.torch import save_model

    target.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    type(model.config).from_dict(config).save_pretrained(target)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)
    save_model(model, str(target / "model.safetensors"))  # tied weights once
    tokenizer.save_pretrained(target)
    (target / _DONE).write_text(f"format {FORMAT}\nsource {os.path.join(folder, gguf)}\n")
    return model, tokenizer


def converted_folder(folder: str, gguf: str) -> Optional[str]:
    """The converted HF folder of ``folder/gguf`` (converting it on first use), or None where no cache can be kept."""
    root = cache_root()
    path = gguf if os.path.isabs(gguf) else os.path.join(folder, gguf)
    if root is None or not os.path.isfile(path):
        return None
    target = root / cache_key(path)
    if (target / _DONE).is_file():
        return str(target)
    tmp = root / f".tmp-{target.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _conversion_lock(root / f".lock-{target.name}"):
            if (target / _DONE).is_file():  # another process (e.g. another rank of this job) converted it meanwhile
                return str(target)
            shutil.rmtree(tmp, ignore_errors=True)
            logger.info(
                "converting %s once into %s (later loads read the converted folder; %s=off to disable)",
                path,
                target,
                CACHE_ENV,
            )
            convert(os.path.dirname(path), os.path.basename(path), tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # a process without the lock (a file system without flock) finished first: use its folder
                if not (target / _DONE).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning(
            "GGUF cache off for %s: %s could not be written (%s); reading the GGUF directly", path, root, exc
        )
        return None
    return str(target)


@contextlib.contextmanager
def _conversion_lock(path: Path) -> Iterator[None]:
    """One converting process per cache entry: the ranks of a job start together, and without this each would
    convert the same GGUF (the rename keeps the result whole either way; the lock saves the work). Where the
    file system has no ``flock`` the conversion runs unlocked (the rename still keeps the folder whole)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
