"""Collation: preprocessed samples become one batch (the tensors of docs/design.md).

* :func:`collate_fuse`: pad to the longest sequence (``attention_mask`` 1/0,
  ``labels`` -100 on padding, ``position_ids`` 0..n-1), or, with ``pack=True``,
  several samples per row: rows are filled to at most ``max_len`` and balanced so
  the longest row (the padded width) is as short as possible; ``position_ids``
  restart at 0 for every sample and ``sequence_ids`` number the samples of a row
  (-1 on padding) so the model builds a block-diagonal mask.
* :func:`collate_align`: images stacked, captions padded, ``caption_group`` marks equal captions.
* :func:`group_by_length`: reorders a pool of samples into batches of similar length.
* :func:`to_device`: a batch on the device the model runs on.

A batch always holds the same number of samples (micro batch), packed or not, so
the number of batches per epoch is known in advance and equal on every rank.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Optional

import torch

from mmdist.data.preprocess import IGNORE_INDEX


def _assign(lengths: Sequence[int], order: list[int], k: int, max_len: int) -> Optional[list[list[int]]]:
    """Longest first, each to the least-filled row with room (LPT); None if some sample does not fit."""
    rows: list[list[int]] = [[] for _ in range(k)]
    fill = [0] * k
    for i in order:
        candidates = [r for r in range(k) if fill[r] + lengths[i] <= max_len]
        if not candidates:
            return None
        r = min(candidates, key=lambda r: (fill[r], r))
        rows[r].append(i)
        fill[r] += lengths[i]
    return rows


def _rebalance(rows: list[list[int]], lengths: Sequence[int], max_len: int, rounds: int = 200) -> list[list[int]]:
    """Lower the fullest row by moving or swapping one sample with the emptiest row while that helps."""
    for _ in range(rounds):
        fill = [sum(lengths[i] for i in row) for row in rows]
        hi = max(range(len(rows)), key=lambda r: (fill[r], -r))
        lo = min(range(len(rows)), key=lambda r: (fill[r], r))
        gap = fill[hi] - fill[lo]
        best = None  # (new max of the two rows, item from hi, item from lo or None)
        for a in rows[hi]:
            if 0 < lengths[a] < gap and fill[lo] + lengths[a] <= max_len:
                cand = (max(fill[hi] - lengths[a], fill[lo] + lengths[a]), a, None)
                best = min(best, cand, key=lambda c: c[0]) if best else cand
            for b in rows[lo]:
                d = lengths[a] - lengths[b]
                if 0 < d < gap:
                    cand = (max(fill[hi] - d, fill[lo] + d), a, b)
                    best = min(best, cand, key=lambda c: c[0]) if best else cand
        if best is None or best[0] >= fill[hi]:
            break
        _, a, b = best
        rows[hi].remove(a)
        rows[lo].append(a)
        if b is not None:
            rows[lo].remove(b)
            rows[hi].append(b)
    return rows


def pack_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Assign samples (by length) to rows of at most ``max_len`` tokens; returns sample indices per row.

    The padded width of a packed batch is its fullest row, so rows should be both
    few and even: for k = ceil(total / max_len) and the next two row counts, samples
    go longest first to the least-filled row (LPT), then single moves/swaps level the
    rows; the layout with the fewest padded positions wins. Within a row, samples
    keep their original order.
    """
    if not lengths:
        return []
    if max(lengths) > max_len:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit max_len={max_len} (truncate first)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    k = max(1, -(-sum(lengths) // max_len))
    best: Optional[tuple[int, list[list[int]]]] = None
    tried = 0
    while tried < 3 and k <= len(lengths):
        rows = _assign(lengths, order, k, max_len)
        if rows is not None:
            rows = _rebalance([row for row in rows if row], lengths, max_len)
            cost = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
            if best is None or cost < best[0]:
                best = (cost, rows)
            tried += 1
        k += 1
    if best is None:  # cannot happen: one sample per row always fits
        best = (0, [[i] for i in range(len(lengths))])
    return [sorted(row) for row in best[1]]


def collate_fuse(samples: Sequence[dict], pad_token_id: int, pack: bool = False, max_len: int = 0) -> dict:
    """Stage-2 batch: input_ids, attention_mask, position_ids, labels (+ sequence_ids when packing), images."""
    if pack:
        rows = pack_rows([len(s["input_ids"]) for s in samples], max_len)
    else:
        rows = [[i] for i in range(len(samples))]
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n_rows, width), dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    sequence_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    pixel_values: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        start = 0
        for j, i in enumerate(row):
            sample = samples[i]
            n = len(sample["input_ids"])
            input_ids[r, start : start + n] = torch.tensor(sample["input_ids"], dtype=torch.long)
            labels[r, start : start + n] = torch.tensor(sample["labels"], dtype=torch.long)
            attention[r, start : start + n] = 1
            positions[r, start : start + n] = torch.arange(n)
            sequence_ids[r, start : start + n] = j
            start += n
            # images in order of appearance, row-major (the model fills placeholders in this order)
            pixel_values.extend(sample.get("pixel_values", []))
            if "image_features" in sample:
                features.extend(list(sample["image_features"]))
    batch = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions, "labels": labels}
    if pack:
        batch["sequence_ids"] = sequence_ids
    if pixel_values:
        batch["pixel_values"] = torch.stack(pixel_values)
    if features:
        batch["image_features"] = torch.stack(features)
    return batch


def collate_align(samples: Sequence[dict], pad_token_id: int) -> dict:
    """Stage-1 batch: one image per sample, captions padded to the longest, equal captions grouped."""
    width = max(len(s["text_input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s["text_input_ids"])
        ids[r, :n] = torch.tensor(s["text_input_ids"], dtype=torch.long)
        mask[r, :n] = 1
    groups: dict[str, int] = {}
    caption_group = torch.tensor([groups.setdefault(s["caption"], len(groups)) for s in samples], dtype=torch.long)
    batch = {"text_input_ids": ids, "text_attention_mask": mask, "caption_group": caption_group}
    if "image_features" in samples[0]:
        batch["image_features"] = torch.stack([s["image_features"] for s in samples])
    else:
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
    return batch


def sample_length(sample: dict) -> int:
    return len(sample.get("input_ids", sample.get("text_input_ids", ())))


def group_by_length(pool: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Cut a pool into batches of samples of similar length; the batch order is shuffled (seeded)."""
    ordered = sorted(range(len(pool)), key=lambda i: (sample_length(pool[i]), i))
    batches = [[pool[i] for i in ordered[k : k + batch_size]] for k in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def to_device(batch: dict, device: Any, dtype: Optional[torch.dtype] = None) -> dict:
    """The batch's tensors on ``device``, floating-point ones cast to ``dtype`` (None: kept); other values as they are.

    What the trainer's step, its evaluation and ``mmdist eval`` do to every batch before the forward."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and dtype is not None:
                value = value.to(dtype)
        out[key] = value
    return out
