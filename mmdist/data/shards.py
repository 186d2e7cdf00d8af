"""Writing WebDataset shards: the library functions behind ``mmdist shard``.

Inputs: a LLaVA JSON file plus an image root (``llava``), an image folder plus a
CSV/JSONL of captions (``folder``), or the built-in demo dataset (``demo``:
scikit-learn's handwritten digits upscaled to PNG, with captions and
question/answer conversations, and a fixed held-out split by index written as
separate ``eval`` shards that training never sees).

Every shard holds N samples (``{key}.png``/``.jpg`` + ``.txt`` or ``.json``), a
``sizes.json`` beside the shards gives the counts (the reader's epoch planning
uses it), a ``stats.json`` their length statistics (the planner sizes micro-batches
from them: mmdist/data/shard_stats.py), every image is decoded and verified before
it is written, and a summary of what was skipped and why is logged. Existing shards are never
overwritten unless asked (``overwrite``). Tar members are written with fixed
metadata (mtime 0, uid 0), so the same input gives byte-identical shards.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from mmdist.data.reader import IMAGE_EXTS, BadSample, decode_image
from mmdist.data.shard_stats import ShardStats, merge_stats_file

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
        return {
            "out_dir": self.out_dir,
            "shards": len(self.shards),
            "written": self.written,
            "skipped": dict(self.skipped),
        }

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
    """Writes samples ({"__key__": str, ext: bytes}) into ``{prefix}-{index:06d}.tar`` files of N samples each.

    ``tokenizer`` (with its ``tokenizer_name``, e.g. the LLM's hub id) adds text tokens to the length statistics;
    ``length_stats=False`` writes none (a feature cache: its samples hold features, not the images they came from).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        samples_per_shard: int = 1000,
        overwrite: bool = False,
        verify_images: bool = True,
        max_image_pixels: int = 89_478_485,
        tokenizer: Any = None,
        tokenizer_name: str = "",
        length_stats: bool = True,
    ):
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
                f"{self.out_dir} already holds {len(existing)} shard(s) "
                f"named {prefix}-*.tar (e.g. {existing[0].name}); "
                "pass --overwrite (overwrite=True) to replace them, or choose another output folder"
            )
        for path in existing:
            path.unlink()
        self.summary = WriteSummary(str(self.out_dir))
        self.sizes: dict[str, int] = {}
        self.stats: dict[str, ShardStats] = {}
        self.tokenizer, self.tokenizer_name, self.length_stats = tokenizer, tokenizer_name, length_stats
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
        if self.length_stats:
            self.stats[self._name] = ShardStats(self.tokenizer, self.tokenizer_name)

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
            raise ValueError(
                f"sample key {key!r} must not contain '.' or '/' (webdataset splits member names at the first dot)"
            )
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
        if self.length_stats:
            self.stats[self._name].add(sample)
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
                old = {
                    k: v for k, v in json.loads(sizes_path.read_text()).items() if not k.startswith(self.prefix + "-")
                }
            except ValueError:
                old = {}
        sizes_path.write_text(json.dumps({**old, **self.sizes}, indent=1, sort_keys=True))
        if self.length_stats:
            merge_stats_file(self.out_dir, self.prefix, {name: stats.summary() for name, stats in self.stats.items()})
        return self.summary

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    verify_images: bool = True,
    tokenizer: Any = None,
    tokenizer_name: str = "",
) -> WriteSummary:
    """Write an iterable of samples into shards; returns the summary (also printed by the CLI)."""
    with ShardWriter(out_dir, prefix, samples_per_shard, overwrite, verify_images, tokenizer=tokenizer,
                     tokenizer_name=tokenizer_name) as writer:
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


# ---------------------------------------------------------------------------
# sources


def _safe_key(raw: str, index: int) -> str:
    key = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(raw))
    return key or f"sample{index:09d}"


def _image_member(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of an image file; formats other than jpg/png/webp are re-encoded as PNG."""
    ext = path.suffix.lower().lstrip(".")
    data = path.read_bytes()
    if ext == "jpeg":
        ext = "jpg"
    if ext in IMAGE_EXTS:
        return ext, data
    with Image.open(io.BytesIO(data)) as img:
        return "png", png_bytes(img.convert("RGB"))


def _read_images(key: str, paths: list[Path]) -> dict:
    """Image members for ``paths`` ('png' alone, or '0.png',
    '1.png', ... for several), or a skip record saying why not."""
    members: dict = {}
    try:
        for j, path in enumerate(paths):
            ext, data = _image_member(path)
            members[f"{j}.{ext}" if len(paths) > 1 else ext] = data
    except FileNotFoundError as exc:
        return {"__skip__": "missing_image", "__key__": key, "__detail__": str(exc)}
    except Exception as exc:
        return {"__skip__": "corrupt_image", "__key__": key, "__detail__": str(exc)[:200]}
    return members


def llava_samples(json_path: str | os.PathLike, image_root: str | os.PathLike) -> Iterator[dict]:
    """Samples from a LLaVA JSON list ({id, image (path or list), conversations}); images read from image_root."""
    try:
        records = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read LLaVA JSON {json_path}: {exc}") from None
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of samples, got {type(records).__name__}")
    used: set[str] = set()
    for i, rec in enumerate(records):
        key = _safe_key(rec.get("id", i) if isinstance(rec, dict) else i, i)
        if key in used:
            key = f"{key}_{i}"
        used.add(key)
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            yield {"__skip__": "missing_keys", "__key__": key, "__detail__": "no 'conversations' list"}
            continue
        images = rec.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        members = _read_images(key, [Path(image_root) / name for name in images])
        if "__skip__" in members:
            yield members
            continue
        yield {"__key__": key, "json": {"conversations": rec["conversations"]}, **members}


def _read_captions(path: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    image_keys, text_keys = ("image", "file", "filename", "path"), ("caption", "text", "txt")

    def pick(row: dict, keys: Sequence[str], what: str, where: str) -> str:
        for k in keys:
            if k in row and row[k] not in (None, ""):
                return str(row[k])
        raise ValueError(f"{where}: no {what} column (one of {', '.join(keys)})")

    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            for n, row in enumerate(csv.DictReader(fh), start=2):
                rows.append(
                    (pick(row, image_keys, "image", f"{path}:{n}"), pick(row, text_keys, "caption", f"{path}:{n}"))
                )
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                rows.append(
                    (pick(row, image_keys, "image", f"{path}:{n}"), pick(row, text_keys, "caption", f"{path}:{n}"))
                )
    return rows


def folder_samples(image_dir: str | os.PathLike, captions: str | os.PathLike) -> Iterator[dict]:
    """Caption samples from an image folder and a CSV (columns image/file + caption/text) or JSONL file."""
    for i, (name, caption) in enumerate(_read_captions(Path(captions))):
        key = _safe_key(Path(name).stem, i)
        members = _read_images(key, [Path(image_dir) / name])
        if "__skip__" in members:
            yield members
            continue
        yield {"__key__": f"{key}_{i:06d}", **members, "txt": caption}


def demo_split(n: int) -> tuple[list[int], list[int]]:
    """The fixed demo split by index: every DEMO_EVAL_EVERY-th digit is held out (train, eval index lists)."""
    eval_idx = [i for i in range(n) if i % DEMO_EVAL_EVERY == 0]
    train_idx = [i for i in range(n) if i % DEMO_EVAL_EVERY != 0]
    return train_idx, eval_idx


def demo_samples(indices: Sequence[int], image_size: int = 28) -> Iterator[dict]:
    """Digits as PNG (grey on black, upscaled), a caption, and a question/answer conversation."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in indices:
        pixels = (digits.images[i] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
        name = DIGIT_NAMES[int(digits.target[i])]
        yield {
            "__key__": f"digit{i:05d}",
            "png": png_bytes(image),
            "txt": f"a handwritten digit {name}",
            "json": {
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat digit is this?"},
                    {"from": "gpt", "value": name},
                ],
                "label": int(digits.target[i]),
                "index": int(i),
            },
        }


def write_demo_shards(
    out_dir: str | os.PathLike,
    image_size: int = 28,
    samples_per_shard: int = 200,
    overwrite: bool = False,
    limit: Optional[int] = None,
    tokenizer: Any = None,
    tokenizer_name: str = "",
) -> dict[str, WriteSummary]:
    """Write the demo digits as ``out_dir/train`` and ``out_dir/eval`` shards (the eval split is never trained on).

    Returns {"train": summary, "eval": summary}; shard patterns are ``train/train-*.tar`` and ``eval/eval-*.tar``.
    """
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    train_idx, eval_idx = demo_split(n)
    if limit is not None:
        train_idx, eval_idx = train_idx[:limit], eval_idx[: max(1, limit // 4)]
    out = Path(out_dir)
    result = {}
    for split, idx in (("train", train_idx), ("eval", eval_idx)):
        result[split] = write_shards(
            demo_samples(idx, image_size),
            out / split,
            prefix=split,
            samples_per_shard=samples_per_shard,
            overwrite=overwrite,
            tokenizer=tokenizer,
            tokenizer_name=tokenizer_name,
        )
    return result


MIXTURE_KINDS = ("text", "image", "tiled", "three_images")


def mixture_samples(count: int, image_size: int = 16, seed: int = 0) -> Iterator[dict]:
    """A skewed mixture of LLaVA conversations, cycling through :data:`MIXTURE_KINDS`: a text-only turn, one
    small image, one image twice the size (5 rows with ``data.image_tiling`` on a 2x2 grid: the base image and 4
    tiles) and three small images; question and answer lengths vary. For tests and benchmarks of the balancer."""
    import numpy as np

    rng = random.Random(seed)
    words = "the a digit image shows number small large picture of one two three left right top bottom".split()

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randrange(low, high)))

    def image(size: int) -> bytes:
        pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (size, size, 3), dtype=np.uint8)
        return png_bytes(Image.fromarray(pixels))

    for i in range(count):
        kind = MIXTURE_KINDS[i % len(MIXTURE_KINDS)]
        sample: dict = {"__key__": f"mix{i:06d}"}
        n_images = {"text": 0, "image": 1, "tiled": 1, "three_images": 3}[kind]
        for j in range(n_images):
            sample[f"{j}.png"] = image(2 * image_size if kind == "tiled" else image_size)
        question = "<image>\n" * n_images + text(3, 12) + "?"
        sample["json"] = {
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": text(2, 10)}],
            "kind": kind,
        }
        yield sample


def shard_pattern(summary: WriteSummary) -> str:
    """A brace pattern covering the shards a writer produced."""
    if not summary.shards:
        raise ValueError(f"no shards were written under {summary.out_dir}")
    first = Path(summary.shards[0])
    prefix = first.name.rsplit("-", 1)[0]
    return str(first.parent / f"{prefix}-{{000000..{len(summary.shards) - 1:06d}}}.tar")
