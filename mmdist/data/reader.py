"""Reading shards: list them, shuffle and split them, read tar members, decode them safely.

The first stages of the pipeline, in the order data flows:

1. :func:`list_shards`   expand brace patterns / lists / .txt files into shard paths with sample counts
2. :func:`shuffle_shards` the same seeded order (seed + epoch) on every rank
3. :func:`split_by_node`  each rank gets a disjoint set of shards
4. :func:`split_by_worker` each DataLoader worker of a rank gets a disjoint subset
5. :func:`read_tar`       raw samples ``{"__key__", "__url__", ext: bytes}``; a truncated tar is counted, not fatal
6. :func:`shuffle_samples` seeded shuffle buffer over the raw (undecoded) samples
7. :func:`decode_sample`  only images (jpg/jpeg/png/webp), txt and json are decoded, by hand

Why by hand: webdataset's default decoders unpickle ``.pyd``/``.pickle`` members,
so an untrusted shard could run code. Here every other member is dropped
unread. Splitting is balanced by sample count (not webdataset's strided split)
so uneven shards still give every rank about the same number of samples; the
loader then equalises the batch count exactly.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from mmdist.models.processors import ORIGINAL_SIZE_KEY

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)
JSON_EXTS = ("json",)
FEATURE_EXTS = ("npy", "safetensors")
# Members that deserialise Python objects: never decoded, only counted.
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it goes into."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TooManyBadSamples(RuntimeError):
    """More than data.max_bad_fraction of the samples were bad."""


@dataclass
class Shard:
    """One tar file and the number of samples it holds (None when unknown)."""

    url: str
    size: Optional[int]
    source: str = ""


@dataclass
class BadSampleCounter:
    """Counts bad samples by reason, logs the first few with shard and key, enforces the maximum fraction."""

    max_fraction: float = 1.0
    log_first: int = 20
    min_samples: int = 100
    where: str = ""
    seen: int = 0
    bad: Counter = field(default_factory=Counter)

    def good(self) -> None:
        self.seen += 1

    def add(self, reason: str, shard: str, key: str, detail: str = "", count_as_seen: bool = True) -> None:
        if count_as_seen:
            self.seen += 1
        self.bad[reason] += 1
        if self.bad[reason] <= self.log_first:
            log.warning(
                "skipped bad sample (%s) in shard %s, key %s%s%s",
                reason,
                shard,
                key,
                f": {detail}" if detail else "",
                f" [{self.where}]" if self.where else "",
            )
        self.check()

    def check(self) -> None:
        check_bad_fraction(self.bad, self.seen, self.max_fraction, self.min_samples, self.where)


def check_bad_fraction(bad: dict, seen: int, max_fraction: float, min_samples: int = 100, where: str = "") -> None:
    """Raise TooManyBadSamples when, after ``min_samples``, the bad fraction exceeds ``max_fraction``."""
    total_bad = sum(bad.values())
    if seen >= min_samples and total_bad > max_fraction * seen:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise TooManyBadSamples(
            f"{total_bad} of {seen} samples were bad ({reasons}){f' in {where}' if where else ''}, more than "
            f"data.max_bad_fraction={max_fraction}. Check the shards (the log names shard and key of the first "
            f"ones), rebuild them with `mmdist shard`, or raise data.max_bad_fraction."
        )


# ---------------------------------------------------------------------------
# 1. list shards


def _expand_pattern(pattern: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    if pattern.endswith(".txt") and os.path.isfile(pattern):
        base = os.path.dirname(pattern)
        out = []
        for line in Path(pattern).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.extend(_expand_pattern(line if os.path.isabs(line) or "://" in line else os.path.join(base, line)))
        return out
    return list(expand_urls(pattern))


def _sizes_from_folder(folder: str, cache: dict) -> dict:
    if folder not in cache:
        sizes: dict = {}
        path = os.path.join(folder, "sizes.json")
        if os.path.isfile(path):
            try:
                sizes = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read {path}: {exc}; rewrite it with `mmdist shard` or delete it") from None
        cache[folder] = sizes
    return cache[folder]


def count_samples(url: str) -> int:
    """Count the samples of a shard by reading its member names (used when no sizes.json exists)."""
    from webdataset.tariterators import base_plus_ext

    keys = set()
    try:
        with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if info.isreg():
                    key, _ = base_plus_ext(info.name)
                    if key is not None and not os.path.basename(info.name).startswith("__"):
                        keys.add(key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        log.warning("shard %s could not be read to the end while counting samples: %s", url, exc)
    return len(keys)


def _img2dataset_size(url: str) -> Optional[int]:
    stats = re.sub(r"\.tar$", "_stats.json", url)
    if stats != url and os.path.isfile(stats):
        try:
            data = json.loads(Path(stats).read_text())
            return int(data.get("successes", data.get("count")))
        except (OSError, ValueError, TypeError):
            return None
    return None


def list_shards(patterns: Sequence[str], source: str = "", need_sizes: bool = True) -> list[Shard]:
    """Expand shard patterns into :class:`Shard` s with sample counts.

    Counts come from ``sizes.json`` beside the shards (written by ``mmdist shard``),
    else img2dataset's ``{shard}_stats.json`` (``successes``), else by reading the tar.
    """
    urls: list[str] = []
    for pattern in patterns:
        expanded = _expand_pattern(pattern)
        if not expanded:
            raise FileNotFoundError(f"shard pattern {pattern!r} (source {source or '?'}) matches nothing")
        urls.extend(expanded)
    folder_cache: dict = {}
    shards = []
    for url in urls:
        if not _is_remote(url) and not os.path.isfile(url):
            raise FileNotFoundError(
                f"shard {url} (source {source or patterns[0]}) does not exist; check data.train/data.eval shards"
            )
        size = None
        if need_sizes:
            sizes = _sizes_from_folder(os.path.dirname(url), folder_cache)
            size = sizes.get(os.path.basename(url), sizes.get(url))
            if size is None:
                size = _img2dataset_size(url)
            if size is None:
                log.warning("no sample count for shard %s in sizes.json; counting its members", url)
                size = count_samples(url)
        shards.append(Shard(url=url, size=None if size is None else int(size), source=source or patterns[0]))
    return shards


# ---------------------------------------------------------------------------
# 2-4. shuffle and split shards


def shuffle_shards(shards: Sequence[Shard], seed: int, epoch: int, shuffle: bool = True) -> list[Shard]:
    """The shard order of one epoch: seeded by seed + epoch only, so it is identical on every rank."""
    shards = list(shards)
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(shards)
    return shards


def balanced_split(shards: Sequence[Shard], parts: int) -> list[list[Shard]]:
    """``shards`` in order into ``parts`` lists: each to the
    part with the fewest samples so far (ties: lowest index)."""
    out: list[list[Shard]] = [[] for _ in range(parts)]
    load = [0] * parts
    for shard in shards:
        i = min(range(parts), key=lambda j: (load[j], j))
        out[i].append(shard)
        load[i] += shard.size if shard.size is not None else 1
    return out


def split_by_node(shards: Sequence[Shard], rank: int, world_size: int) -> list[Shard]:
    """The shards of one rank: disjoint across ranks, balanced by sample count."""
    if len(shards) < world_size:
        raise ValueError(
            f"{len(shards)} shard(s) for {world_size} ranks: epoch mode needs at least one shard per rank. "
            f"Write smaller shards (`mmdist shard --samples-per-shard`), or use data.mode=resampled."
        )
    return balanced_split(shards, world_size)[rank]


def split_by_worker(shards: Sequence[Shard], worker: int, num_workers: int) -> list[Shard]:
    """The shards of one DataLoader worker of a rank (may be empty when a rank has fewer shards than workers)."""
    return balanced_split(shards, max(1, num_workers))[worker]


# ---------------------------------------------------------------------------
# 5. read tar files


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _open_shard(url: str):
    """A local file, or webdataset's gopen for URLs (http(s)://, s3:// via pipe:, ...)."""
    if _is_remote(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def read_tar(url: str, counter: Optional[BadSampleCounter] = None) -> Iterator[dict]:
    """Raw samples of one shard, grouped by key (webdataset's rules, so img2dataset shards read as is).

    A truncated or unreadable tar ends the shard: the samples read so far are kept
    and the break is counted as ``truncated_tar``.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    errors: list[Exception] = []

    def handler(exc: Exception) -> bool:
        errors.append(exc)
        return False

    def members() -> Iterator[dict]:
        try:
            with _open_shard(url) as stream:
                for item in tar_file_iterator(stream, handler=handler):
                    item["__url__"] = url
                    yield item
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            errors.append(exc)

    last_key = "?"
    pending = None  # held back one step: after a read error the last grouped sample may be incomplete
    try:
        for sample in group_by_keys(members(), handler=handler):
            if pending is not None:
                last_key = pending["__key__"]
                yield pending
            pending = sample
    except Exception as exc:  # group_by_keys re-raises tar errors from below
        errors.append(exc)
    if pending is not None and not errors:
        yield pending
    if errors and counter is not None:
        counter.add("truncated_tar", url, f"after {last_key}", str(errors[0])[:200], count_as_seen=True)
    elif errors:
        log.warning("shard %s: %s", url, errors[0])


# ---------------------------------------------------------------------------
# 6. sample shuffle buffer


def shuffle_samples(samples: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Seeded shuffle buffer: keeps ``buffer_size`` samples and yields a random one as each new one arrives."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        out, buffer[i] = buffer[i], sample
        yield out
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------
# 7. safe decoding


def _image_index(ext: str) -> Optional[tuple[int, str]]:
    """'jpg' -> (0, 'jpg'); '1.png' -> (1, 'png'); 'image_2.webp' -> (2, ...); None if not an image member."""
    last = ext.rsplit(".", 1)[-1]
    if last not in IMAGE_EXTS:
        return None
    head = ext[: -len(last)].rstrip(".")
    if not head:
        return 0, last
    digits = re.findall(r"\d+", head)
    return (int(digits[-1]) if digits else 0), last


def decode_image(
    data: bytes, max_pixels: int, draft: Optional[Callable[[int, int], Optional[tuple[int, int]]]] = None
) -> Image.Image:
    """Decode one image from bytes, refusing empty, corrupt and oversized ('decompression bomb') images.

    ``draft(width, height)`` (``ImageTransform.draft_size``) may return the smallest size
    the pixels are needed at; a JPEG is then decoded at the smallest DCT scale (1/2,
    1/4, 1/8) that still covers it (PIL's ``Image.draft``), which is several times
    cheaper than a full decode for photos much larger than the vision tower's input.
    """
    if not data:
        raise BadSample("empty_image", "zero-byte image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            width, height = probe.size
            if width * height > max_pixels:
                raise BadSample("decompression_bomb", f"{width}x{height} pixels > data.max_image_pixels={max_pixels}")
            probe.verify()  # checks structure/CRCs without decoding pixels; the object is unusable afterwards
            image = Image.open(io.BytesIO(data))
            wanted = draft(width, height) if draft is not None and image.format == "JPEG" else None
            if wanted is not None:
                image.draft("RGB", wanted)
                image.info[ORIGINAL_SIZE_KEY] = (width, height)  # the transform's geometry uses the file's size
            image.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("decompression_bomb", str(exc)[:200]) from None
    except Exception as exc:  # PIL raises many types for broken files
        raise BadSample("corrupt_image", f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def decode_sample(raw: dict, max_pixels: int, max_text_chars: int) -> dict:
    """Decode the safe members of one raw sample into ``{"key", "shard", "images", "text", "json", "features"}``.

    Images are ordered by the number in their extension (``0.jpg``, ``1.jpg``; a
    plain ``jpg`` is 0). Members of any other type are dropped without being read;
    ``unsafe_members`` lists the pickle-like ones so callers can report them.
    """
    import numpy as np

    key, shard = raw.get("__key__", "?"), raw.get("__url__", "?")
    images: list[tuple[int, str, bytes]] = []
    text = None
    meta = None
    features = None
    unsafe = []
    for ext, value in raw.items():
        if ext.startswith("__"):
            continue
        last = ext.rsplit(".", 1)[-1]
        idx = _image_index(ext)
        if idx is not None:
            images.append((idx[0], ext, value))
        elif last in TEXT_EXTS:
            if len(value) > 4 * max_text_chars:
                raise BadSample("text_too_long", f"{ext} has {len(value)} bytes > 4 x data.max_caption_chars")
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadSample("bad_text_encoding", f"{ext} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if len(text) > max_text_chars:
                raise BadSample(
                    "text_too_long", f"{ext} has {len(text)} characters > data.max_caption_chars={max_text_chars}"
                )
        elif last in JSON_EXTS:
            if len(value) > 8 * max_text_chars:
                raise BadSample("text_too_long", f"{ext} has {len(value)} bytes")
            try:
                meta = json.loads(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadSample("bad_text_encoding", f"{ext} is not UTF-8") from None
            except ValueError as exc:
                raise BadSample("bad_json", f"{ext}: {exc}") from None
        elif last == "npy":
            try:
                features = np.load(io.BytesIO(value), allow_pickle=False)
            except Exception as exc:
                raise BadSample("bad_features", f"{ext}: {exc}") from None
        elif last == "safetensors":
            try:
                from safetensors.numpy import load as st_load

                features = st_load(value)
            except Exception as exc:
                raise BadSample("bad_features", f"{ext}: {exc}") from None
        elif last in UNSAFE_EXTS:
            unsafe.append(ext)
    images.sort(key=lambda item: (item[0], item[1]))
    return {
        "key": key,
        "shard": shard,
        "image_bytes": [data for _, _, data in images],
        "text": text,
        "json": meta,
        "features": features,
        "unsafe_members": unsafe,
    }


def decode_images(
    sample: dict, max_pixels: int, draft: Optional[Callable[[int, int], Optional[tuple[int, int]]]] = None
) -> list[Image.Image]:
    """Decode the image members of a decoded sample (kept separate so a cache reader can skip pixels)."""
    return [decode_image(data, max_pixels, draft) for data in sample["image_bytes"]]
