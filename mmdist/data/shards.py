"""Writing WebDataset shards: ``mmdist shard`` and the library functions behind it.

Inputs: a LLaVA JSON file plus an image root (``llava``), an image folder plus a
CSV/JSONL of captions (``folder``), or the built-in demo dataset (``demo``:
scikit-learn's handwritten digits upscaled to PNG, with captions and
question/answer conversations, and a fixed held-out split by index written as
separate ``eval`` shards that training never sees).

Every shard holds N samples (``{key}.png``/``.jpg`` + ``.txt`` or ``.json``), a
``sizes.json`` beside the shards gives the counts (the reader's epoch planning
uses it), every image is decoded and verified before it is written, and a
summary of what was skipped and why is printed. Existing shards are never
overwritten unless ``--overwrite`` is given. Tar members are written with fixed
metadata (mtime 0, uid 0), so the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from mmdist.data.reader import IMAGE_EXTS, BadSample, decode_image

log = logging.getLogger(__name__)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEMO_EVAL_EVERY = 5  # demo held-out split: every 5th digit by index (fixed, independent of any seed)


class ShardsExist(FileExistsError):
    """The output folder already holds shards and --overwrite was not given."""


@dataclass
class WriteSummary:
    """What a shard writer did: shards and samples written, samples skipped by reason."""

    out_dir: str
    shards: list[str] = field(default_factory=list)
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"out_dir": self.out_dir, "shards": len(self.shards), "written": self.written, "skipped": dict(self.skipped)}

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.written} samples in {len(self.shards)} shard(s) under {self.out_dir}; skipped: {skipped}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples ({"__key__": str, ext: bytes}) into ``{prefix}-{index:06d}.tar`` files of N samples each."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", samples_per_shard: int = 1000, overwrite: bool = False,
                 verify_images: bool = True, max_image_pixels: int = 89_478_485):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.verify_images = verify_images
        self.max_image_pixels = max_image_pixels
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{prefix}-*.tar"))
        if existing and not overwrite:
            raise ShardsExist(
                f"{self.out_dir} already holds {len(existing)} shard(s) named {prefix}-*.tar (e.g. {existing[0].name}); "
                "pass --overwrite (overwrite=True) to replace them, or choose another output folder"
            )
        for path in existing:
            path.unlink()
        self.summary = WriteSummary(str(self.out_dir))
        self.sizes: dict[str, int] = {}
        self._tar: Optional[tarfile.TarFile] = None
        self._name = ""
        self._count = 0
        self._keys: set[str] = set()

    def _open_next(self) -> None:
        self._close_current()
        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._tar = tarfile.open(self.out_dir / (self._name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self.sizes[self._name] = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
            self.summary.shards.append(str(self.out_dir / self._name))
            self._tar = None

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        self.summary.skipped[reason] += 1
        if self.summary.skipped[reason] <= 10:
            log.warning("not written (%s): %s %s", reason, key, detail)

    def write(self, sample: dict) -> bool:
        """Write one sample; a sample with a broken image is skipped (and counted). Returns whether it was written."""
        key = str(sample["__key__"])
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits member names at the first dot)")
        if key in self._keys:
            self.skip("duplicate_key", key)
            return False
        if self.verify_images:
            for ext, value in sample.items():
                if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
                    try:
                        decode_image(value, self.max_image_pixels)
                    except BadSample as exc:
                        self.skip(exc.reason, key, exc.detail)
                        return False
        if self._tar is None or self._count >= self.samples_per_shard:
            self._open_next()
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            if isinstance(value, str):
                value = value.encode("utf-8")
            elif not isinstance(value, bytes):
                value = json.dumps(value).encode("utf-8")
            _add_member(self._tar, f"{key}.{ext}", value)
        self._keys.add(key)
        self._count += 1
        self.sizes[self._name] += 1
        self.summary.written += 1
        return True

    def close(self) -> WriteSummary:
        self._close_current()
        sizes_path = self.out_dir / "sizes.json"
        old = {}
        if sizes_path.is_file():
            try:
                old = {k: v for k, v in json.loads(sizes_path.read_text()).items() if not k.startswith(self.prefix + "-")}
            except ValueError:
                old = {}
        sizes_path.write_text(json.dumps({**old, **self.sizes}, indent=1, sort_keys=True))
        return self.summary

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, prefix: str = "shard", samples_per_shard: int = 1000,
                 overwrite: bool = False, verify_images: bool = True) -> WriteSummary:
    """Write an iterable of samples into shards; returns the summary (also printed by the CLI)."""
    with ShardWriter(out_dir, prefix, samples_per_shard, overwrite, verify_images) as writer:
        for sample in samples:
            if "__skip__" in sample:
                writer.skip(sample["__skip__"], str(sample.get("__key__", "?")), sample.get("__detail__", ""))
                continue
            writer.write(sample)
    return writer.summary


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
