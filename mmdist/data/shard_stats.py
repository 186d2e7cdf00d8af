"""Length statistics of shards: what the planner needs to size packed micro-batches, written beside the shards.

``mmdist shard`` (:class:`mmdist.data.shards.ShardWriter`) records, for every shard it
writes, a compact summary of its samples in ``stats.json`` beside ``sizes.json``::

    {"train-000000.tar": {
        "samples": 1000,
        "text_chars": {"mean": 412.3, "p50": 301, "p90": 880, "p99": 1630, "max": 2411},
        "by_images": {"0": {...}, "1": {"samples": 870, "captions": 0, "messages": 4.1,
                               "chars_mean": 402.7, "words_mean": 71.2,
                               "chars_q": [11 percentiles: p0, p10, ..., p100],
                               "answers": 2.05, "answer_chars_mean": 251.3,  # assistant turns: the loss's text
                               "tokens_mean": 98.1, "tokens_q": [...],       # tokens: only with a tokenizer
                               "answer_tokens_mean": 60.4}},
        "image_sizes": {"640x480": 412, "480x640": 77, ...},                  # width x height, to about 6%
        "text_sample": ["\\nWhat is in the picture?", "A cat on a sofa.", ...],   # <= 2000 characters
        "tokenizer": "Qwen/Qwen-14B"}}                                        # only with a tokenizer

Text is counted as the preprocessor will read it (mmdist/data/preprocess.py, format
``auto``): a ``json`` member with a ``conversations`` list is a conversation (every
turn's text), else the ``txt`` member is a caption; the data's ``<image>`` marks are
left out (images are counted on their own). The answers (a conversation's gpt/assistant
turns, a caption) are also counted apart: they are the tokens the loss is taken on,
and the LM head runs at those only (mmdist.models.fused), so they size its logits.
The writer rarely has the LLM's tokenizer, so it records characters and words;
``text_sample`` keeps the first samples' texts so the planner can measure this data's
characters per token with the run's tokenizer (mmdist.plan.lengths). Given a tokenizer
(``mmdist shard --tokenizer``), the writer records tokens as well (each turn encoded
without special tokens, as the preprocessor encodes them), and the planner uses them
when the run's tokenizer has the same name.

Samples are grouped by their number of images, so a mixture keeps the link between
the two (long text-only samples, short captioned images). Tiles are not recorded:
they depend on the run's ``data.image_tiling`` and the tower's input size; the
planner derives them from ``image_sizes`` with the run's settings. Shards written
before these statistics existed have no entry: :func:`read_shard_stats` gives None
for them and the planner falls back (mmdist.plan.lengths says how).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

__all__ = ["QUANTILES", "STATS_FILE", "SampleLength", "ShardStats", "merge_stats_file", "quantiles", "read_shard_stats",
           "sample_length"]

STATS_FILE = "stats.json"
QUANTILES = tuple(range(0, 101, 10))  # the percentiles of the text-length summaries: p0, p10, ..., p100
TEXT_SAMPLE_CHARS = 2000  # characters of text kept per shard for measuring characters per token
IMAGE_MARK = "<image>"
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ASSISTANT_ROLES = ("gpt", "assistant")  # the turns the preprocessor supervises (mmdist.data.preprocess.ROLE_MAP)


class SampleLength:
    """One sample's length as the writer sees it: text pieces as the preprocessor encodes them, images and sizes."""

    __slots__ = ("caption", "messages", "pieces", "image_sizes", "answers", "answer_pieces")

    def __init__(self, caption: bool, messages: int, pieces: list[str], image_sizes: list[tuple[int, int]],
                 answers: int = 0, answer_pieces: Sequence[str] = ()):
        self.caption = caption
        self.messages = messages
        self.pieces = pieces  # text between image marks, per turn: what the preprocessor tokenizes
        self.image_sizes = image_sizes  # (width, height) per image
        self.answers = answers  # assistant turns (a caption is one)
        self.answer_pieces = list(answer_pieces)  # their text, the part of ``pieces`` the loss is taken on

    @property
    def answer_chars(self) -> int:
        return sum(len(p) for p in self.answer_pieces)

    @property
    def chars(self) -> int:
        return sum(len(p) for p in self.pieces)

    @property
    def words(self) -> int:
        return sum(len(p.split()) for p in self.pieces)


def _as_text(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _as_json(value: Any) -> Any:
    if isinstance(value, (bytes, str)):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _image_size(data: Any) -> Optional[tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return int(img.width), int(img.height)
    except Exception:  # the writer's own check reports broken images; a size is only a statistic
        return None


def sample_length(sample: dict) -> SampleLength:
    """The length of a writer's sample ({"__key__", ext: bytes | str | dict}), counted as the preprocessor reads it."""
    sizes = []
    for ext, value in sorted(sample.items()):
        if ext.rsplit(".", 1)[-1].lower() in _IMAGE_EXTS:
            size = _image_size(value)
            if size is not None:
                sizes.append(size)
    meta = _as_json(sample.get("json"))
    turns = meta.get("conversations") if isinstance(meta, dict) else None
    if isinstance(turns, list) and turns:
        pieces, answers, answer_pieces = [], 0, []
        for turn in turns:
            text = _as_text(turn.get("value", "")) if isinstance(turn, dict) else ""
            split = [p for p in (text or "").split(IMAGE_MARK) if p]
            pieces += split
            if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ASSISTANT_ROLES:
                answers += 1
                answer_pieces += split
        return SampleLength(False, len(turns), pieces, sizes, answers, answer_pieces)
    caption = (_as_text(sample.get("txt")) or "").replace(IMAGE_MARK, "").strip()
    return SampleLength(True, 2, [caption] if caption else [], sizes, 1, [caption] if caption else [])


def quantiles(values: Sequence[float], points: Sequence[int] = QUANTILES) -> list[float]:
    """Linear-interpolated percentiles of ``values`` (empty: zeros), rounded to 0.1."""
    ordered = sorted(values)
    if not ordered:
        return [0.0 for _ in points]
    out = []
    for p in points:
        x = p / 100 * (len(ordered) - 1)
        lo = int(x)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(round(ordered[lo] + (ordered[hi] - ordered[lo]) * (x - lo), 1))
    return out


class ShardStats:
    """Accumulates one shard's samples and summarises them (the entry of ``stats.json``)."""

    def __init__(self, tokenizer: Any = None, tokenizer_name: str = ""):
        self.tokenizer = tokenizer
        self.tokenizer_name = tokenizer_name
        self.lengths: list[SampleLength] = []
        self.tokens: list[int] = []
        self.answer_tokens: list[int] = []

    def add(self, sample: dict) -> None:
        length = sample_length(sample)
        self.lengths.append(length)
        if self.tokenizer is not None:
            count = lambda pieces: sum(len(self.tokenizer.encode(p, add_special_tokens=False)) for p in pieces)  # noqa: E731
            self.tokens.append(count(length.pieces))
            self.answer_tokens.append(count(length.answer_pieces))

    def summary(self) -> dict:
        groups: dict[int, list[int]] = {}
        for i, length in enumerate(self.lengths):
            groups.setdefault(len(length.image_sizes), []).append(i)
        by_images = {}
        for count, members in sorted(groups.items()):
            chars = [self.lengths[i].chars for i in members]
            group = {"samples": len(members), "captions": sum(self.lengths[i].caption for i in members),
                     "messages": round(sum(self.lengths[i].messages for i in members) / len(members), 3),
                     "chars_mean": round(sum(chars) / len(chars), 2),
                     "words_mean": round(sum(self.lengths[i].words for i in members) / len(members), 2),
                     "chars_q": quantiles(chars),
                     "answers": round(sum(self.lengths[i].answers for i in members) / len(members), 3),
                     "answer_chars_mean": round(sum(self.lengths[i].answer_chars for i in members) / len(members), 2)}
            if self.tokens:
                tokens = [self.tokens[i] for i in members]
                group.update(tokens_mean=round(sum(tokens) / len(tokens), 2), tokens_q=quantiles(tokens),
                             answer_tokens_mean=round(sum(self.answer_tokens[i] for i in members) / len(members), 2))
            by_images[str(count)] = group
        sizes: Counter = Counter()
        for length in self.lengths:
            for w, h in length.image_sizes:
                sizes[f"{_rounded(w)}x{_rounded(h)}"] += 1
        chars = [length.chars for length in self.lengths]
        p50, p90, p99 = quantiles(chars, (50, 90, 99))
        text_sample: list[str] = []
        kept = 0
        for length in self.lengths:
            if kept >= TEXT_SAMPLE_CHARS:
                break
            for piece in length.pieces:
                text_sample.append(piece[: TEXT_SAMPLE_CHARS - kept])
                kept += len(text_sample[-1])
        out = {"samples": len(self.lengths),
               "text_chars": {"mean": round(sum(chars) / max(1, len(chars)), 2), "p50": p50, "p90": p90, "p99": p99,
                              "max": max(chars, default=0)},
               "by_images": by_images, "image_sizes": dict(sorted(sizes.items())), "text_sample": text_sample}
        if self.tokens:
            out["tokenizer"] = self.tokenizer_name
        return out


def _rounded(pixels: int) -> int:
    """``pixels`` to about 1/16 of its power of two (336 -> 336, 643 -> 640, 1000 -> 992): the tiling grid changes on
    a coarser scale, and a shard's sizes stay a short list."""
    step = max(1, 1 << max(0, int(pixels).bit_length() - 5))
    return max(1, int(round(pixels / step)) * step)


def merge_stats_file(folder: str | os.PathLike, prefix: str, entries: dict[str, dict]) -> None:
    """Write ``entries`` (shard file name -> summary) into ``folder/stats.json``, keeping other prefixes' entries."""
    path = Path(folder) / STATS_FILE
    old: dict = {}
    if path.is_file():
        try:
            old = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith(prefix + "-")}
        except ValueError:
            old = {}
    path.write_text(json.dumps({**old, **entries}, sort_keys=True, separators=(",", ":")))


def read_shard_stats(urls: Sequence[str]) -> dict[str, Optional[dict]]:
    """Each shard's entry of ``stats.json`` beside it, or None (no file, no entry: shards written before the
    statistics existed, or by another tool). An unreadable file is logged and read as none."""
    cache: dict[str, dict] = {}
    out: dict[str, Optional[dict]] = {}
    for url in urls:
        folder = os.path.dirname(url)
        if folder not in cache:
            cache[folder] = {}
            path = os.path.join(folder, STATS_FILE)
            if os.path.isfile(path):
                try:
                    cache[folder] = json.loads(Path(path).read_text())
                except (OSError, ValueError) as exc:
                    log.warning("cannot read %s (%s): its shards are planned without statistics; rewrite it with "
                                "`mmdist shard`", path, exc)
        entry = cache[folder].get(os.path.basename(url))
        out[url] = entry if isinstance(entry, dict) and "by_images" in entry else None
    return out
