"""The epoch plan: which samples every worker of every rank reads, for a fresh epoch or the rest of one.

``plan_epoch`` splits an epoch's shards by rank, then by worker, with an equal batch
budget on every rank (see mmdist/data/loader.py). ``plan_remaining`` plans what is left
of an epoch after a resume on another world size: the samples no saved rank handed
out, from the merged consumption record (``Consumed``: per shard URL a bool mask over
the tar's samples, stored as a bitmap by ``encode_consumed``). Both are pure functions
of their arguments, so every rank and worker computes the same plan without talking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mmdist.data.reader import Shard, shuffle_shards, split_by_node, split_by_worker


@dataclass
class WorkerPlan:
    """What one worker of one rank reads in one epoch."""

    shards: list[Shard]
    budget: int  # batches this worker yields
    stride: Optional[tuple[int, int]] = None  # (modulus, slot): keep raw sample j when j % modulus == slot
    keep: Optional[dict[str, frozenset[int]]] = None  # continuation plan: per shard url, the sample indices read


Consumed = dict[str, np.ndarray]  # per shard url: bool mask over the samples in tar order, True = handed out this epoch


def _proportional_split(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder; ties to lower index)."""
    wsum = sum(weights)
    if wsum == 0:
        return [0] * len(weights)
    exact = [total * w / wsum for w in weights]
    parts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def plan_epoch(shards: list[Shard], seed: int, epoch: int, rank: int, world_size: int, num_workers: int,
               batch_size: int, shuffle: bool) -> tuple[list[WorkerPlan], int]:
    """The shards and batch budget of every worker of ``rank`` for ``epoch``; also the per-rank budget."""
    total = sum(s.size or 0 for s in shards)
    budget = math.ceil(total / (world_size * batch_size))
    order = shuffle_shards(shards, seed, epoch, shuffle)
    workers = max(1, num_workers)
    if len(order) < world_size:
        # Too few shards to give each rank its own: every worker of every rank reads all shards and keeps
        # every (world x workers)-th sample. Costs extra reading, so meant for small (eval) sets.
        slots = world_size * workers
        strides = [(slots, rank * workers + w) for w in range(workers)]
        sizes = [total // slots + (1 if slot < total % slots else 0) for _, slot in strides]
        budgets = _proportional_split(budget, sizes)
        return [WorkerPlan(list(order), b, st) for b, st in zip(budgets, strides)], budget
    mine = split_by_node(order, rank, world_size)
    per_worker = [split_by_worker(mine, w, workers) for w in range(workers)]
    sizes = [sum(s.size or 0 for s in ws) for ws in per_worker]
    if sum(sizes) == 0:
        raise ValueError(f"rank {rank} got shards with no samples ({[s.url for s in mine]}); check sizes.json")
    budgets = _proportional_split(budget, sizes)
    return [WorkerPlan(ws, b) for ws, b in zip(per_worker, budgets)], budget


def plan_remaining(shards: list[Shard], consumed: Consumed, seed: int, epoch: int, rank: int, world_size: int,
                   num_workers: int, batch_size: int, shuffle: bool) -> tuple[list[WorkerPlan], int]:
    """The rest of an epoch after a resume on another world size: what ``plan_epoch`` gives when part is consumed.

    The samples of the epoch not in ``consumed`` (which merges every saved rank's record), in the
    epoch's shard order, are cut into ``world_size`` contiguous runs of equal length (+-1), so
    every rank gets the same budget ``ceil(remaining / (world_size x batch_size))``. A rank's k-th
    batch of samples goes to worker ``k % workers`` (the DataLoader's round-robin). Only the
    last batch of a rank can be short; its worker wraps around to its own samples (as
    ``plan_epoch``'s workers do), so at most ``batch_size`` samples per rank repeat and none is left out.
    """
    workers = max(1, num_workers)
    order = shuffle_shards(shards, seed, epoch, shuffle)
    shard_ids, indices = [], []
    for sid, shard in enumerate(order):
        left = np.ones(shard.size or 0, dtype=bool)
        done = consumed.get(shard.url)
        if done is not None:
            n = min(len(done), len(left))
            left[:n] &= ~done[:n]
        ix = np.flatnonzero(left)
        shard_ids.append(np.full(len(ix), sid, dtype=np.int64))
        indices.append(ix)
    all_sids = np.concatenate(shard_ids) if shard_ids else np.zeros(0, dtype=np.int64)
    all_ix = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    total = len(all_ix)
    budget = math.ceil(total / (world_size * batch_size))
    quotas = _proportional_split(total, [1] * world_size)
    start = sum(quotas[:rank])
    mine = np.arange(start, start + quotas[rank])
    budgets = [budget // workers + (1 if w < budget % workers else 0) for w in range(workers)]
    owner = (np.arange(len(mine)) // batch_size) % workers  # the worker that reads each of this rank's samples
    plans = []
    for w in range(workers):
        chosen = mine[owner == w]
        if len(chosen) == 0 and budgets[w]:  # its only batch is the empty last one: padding from this rank (or any)
            chosen = (mine if len(mine) else np.arange(total))[:batch_size]
        keep: dict[str, frozenset[int]] = {}
        for sid in np.unique(all_sids[chosen]):
            keep[order[sid].url] = frozenset(all_ix[chosen][all_sids[chosen] == sid].tolist())
        plans.append(WorkerPlan([shard for shard in order if shard.url in keep], budgets[w], keep=keep))
    return plans, budget


def to_mask(indices: set[int]) -> np.ndarray:
    mask = np.zeros(max(indices) + 1 if indices else 0, dtype=bool)
    mask[list(indices)] = True
    return mask


def encode_consumed(consumed: Consumed) -> dict[str, bytes]:
    """Per shard url a bitmap (bit i set: sample i consumed); 125 KB per million samples."""
    return {url: np.packbits(mask).tobytes() for url, mask in consumed.items() if mask.any()}


def decode_consumed(encoded: dict[str, bytes]) -> Consumed:
    return {url: np.unpackbits(np.frombuffer(b, dtype=np.uint8)).astype(bool) for url, b in encoded.items()}


def merge_consumed(*records: Consumed) -> Consumed:
    """The union of consumption records (every saved rank's, say)."""
    out: Consumed = {}
    for record in records:
        for url, mask in record.items():
            have = out.get(url, np.zeros(0, dtype=bool))
            merged = np.zeros(max(len(have), len(mask)), dtype=bool)
            merged[: len(have)] |= have
            merged[: len(mask)] |= mask
            out[url] = merged
    return out
