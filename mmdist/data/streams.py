"""Logical streams: the global sample order, read by whichever ranks host each stream.

The global order of a run does not know how many ranks read it. Every epoch the
shards (seeded shuffle, seed + epoch) are dealt into ``L`` logical streams
(balanced by sample count); stream ``l`` reads its shards in order through its own
seeded shuffle buffer, and its parts of successive epochs follow each other.
The epoch's slots are dealt to the streams in proportion to their samples
(:func:`interleave`), so every stream ends with the epoch and every sample is
read once an epoch; global step ``s`` holds slots ``[s G, (s + 1) G)`` of the
epochs laid end to end (a step may straddle two epochs), and each stream fills
its slots of a step with its next usable samples (a bad sample is skipped and
the stream's next one takes its slot). Resampled mode: stream ``l``'s part ``e``
draws ``samples_per_epoch / L`` samples, mixing the sources by weight, from
shards drawn with replacement; its slots go round robin.

:class:`HostedStreams` is the ``IterableDataset`` the DataLoader workers run: it
reads the streams its rank hosts (split over the workers), decodes and
preprocesses their samples, prices each (mmdist/data/cost.py) and yields, for
every step, one item per worker: that worker's samples of the step and where its
streams stand after it. A stream's position is (part, raw samples of the part
used), so a worker restarted anywhere replays a part without decoding up to it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from mmdist.data.reader import BadSampleCounter, Shard, balanced_split, read_tar, shuffle_samples, shuffle_shards
from mmdist.data.stream import ShardStream, _CounterProxy, _indexed

Position = tuple[int, int]  # (part, raw samples of the part used)


def stream_count(configured: int, shards: list[Shard], mode: str) -> int:
    """Logical streams of a run: ``data.streams``, at most one per shard in epoch mode."""
    return max(1, min(configured, len(shards))) if mode == "epoch" else max(1, configured)


def deal_shards(shards: list[Shard], seed: int, epoch: int, streams: int, shuffle: bool) -> list[list[Shard]]:
    """The shards of every stream in ``epoch``: the epoch's seeded shard order dealt by sample count."""
    return balanced_split(shuffle_shards(shards, seed, epoch, shuffle), streams)


def interleave(sizes: list[int]) -> np.ndarray:
    """The stream of every slot of an epoch whose streams hold ``sizes`` samples: each stream's samples spread
    evenly over the epoch (sample k of a stream of n at time (k + 0.5) / n; ties to the lower stream), so every
    stream runs out with the epoch and every sample is read once."""
    sizes = [int(n) for n in sizes]
    if not any(sizes):
        return np.zeros(0, dtype=np.int32)
    times = np.concatenate([(np.arange(n) + 0.5) / n for n in sizes if n])
    ids = np.concatenate([np.full(n, sid, dtype=np.int32) for sid, n in enumerate(sizes) if n])
    return ids[np.lexsort((ids, times))]


class Schedule:
    """Which stream fills each slot of each global step: the epochs' interleaves one after the other."""

    def __init__(self, pipeline: ShardStream, streams: int, global_batch: int, part_samples: int):
        self.pipeline, self.streams, self.global_batch, self.part_samples = (
            pipeline,
            streams,
            global_batch,
            part_samples,
        )
        self._cache: dict[int, np.ndarray] = {}

    def epoch_length(self) -> int:
        if self.pipeline.mode == "resampled":
            return self.streams * self.part_samples
        return sum(s.size or 0 for s in self.pipeline.shards)

    def epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            p = self.pipeline
            if p.mode == "resampled":
                sizes = [self.part_samples] * self.streams
            else:
                sizes = [
                    sum(s.size or 0 for s in part)
                    for part in deal_shards(p.shards, p.seed, epoch, self.streams, p.shuffle)
                ]
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = interleave(sizes)
        return self._cache[epoch]

    def step(self, step: int) -> np.ndarray:
        """The stream of every slot of global step ``step`` (length ``global_batch``)."""
        n = self.epoch_length()
        if n <= 0:
            raise ValueError(
                f"the shards hold no samples ({[s.url for s in self.pipeline.shards][:3]}...): check sizes.json"
            )
        start, end = step * self.global_batch, (step + 1) * self.global_batch
        pieces = []
        for epoch in range(start // n, (end - 1) // n + 1):
            order = self.epoch(epoch)
            pieces.append(order[max(start - epoch * n, 0): min(end - epoch * n, n)])
        return np.concatenate(pieces)


class HostedStreams(IterableDataset):
    """Per step, one item per DataLoader worker: the samples of the hosted streams it reads (see module docstring)."""

    def __init__(self, pipeline: ShardStream, *, streams: int, global_batch: int, cost: Callable[[dict], float]):
        super().__init__()
        self.pipeline = pipeline  # the per-sample steps: decode, preprocess, collate (mmdist/data/stream.py)
        self.streams = streams
        self.global_batch = global_batch
        self.cost = cost
        self.buffer = math.ceil(pipeline.shuffle_buffer / streams) if pipeline.shuffle_buffer > 1 else 0
        self.part_samples = math.ceil((pipeline.samples_per_epoch or 0) / streams)  # resampled mode
        self.schedule = Schedule(pipeline, streams, global_batch, self.part_samples)
        # set by the loader before every DataLoader it makes (and copied into the workers)
        self.hosted: list[int] = []
        self.start_step = 0
        self.positions: dict[int, Position] = {}

    # ------------------------------------------------------------------ one stream's raw samples
    def _rng(self, *parts: Any) -> random.Random:
        return random.Random("-".join(str(p) for p in (self.pipeline.seed, "stream") + parts))

    def part_raw(self, stream: int, part: int, counter: Any) -> Iterator[dict]:
        """The raw samples of ``stream``'s ``part`` (an epoch's share, or a resampled draw), shuffled."""
        p = self.pipeline
        if p.mode == "resampled":
            raw: Iterator[dict] = itertools.islice(self._resampled(stream, part, counter), self.part_samples)
        else:
            shards = deal_shards(p.shards, p.seed, part, self.streams, p.shuffle)[stream]
            raw = (s for shard in shards for s in _indexed(read_tar(shard.url, counter), None, shard.url))
        return shuffle_samples(raw, self.buffer, self._rng("buffer", part, stream))

    def _resampled(self, stream: int, part: int, counter: Any) -> Iterator[dict]:
        sources = self.pipeline.sources
        mix = self._rng("mix", part, stream)

        def draws(index: int) -> Iterator[dict]:
            shards, rng = sources[index][0], self._rng("draw", part, stream, index)
            while True:  # webdataset's ResampledShards, seeded per stream, part and source
                yield from read_tar(rng.choice(shards).url, counter)

        subs = [draws(i) for i in range(len(sources))]
        weights = [w for _, w in sources]
        while True:
            yield next(subs[mix.choices(range(len(subs)), weights=weights)[0] if len(subs) > 1 else 0])

    def raw_from(self, stream: int, position: Position, counter: BadSampleCounter) -> Iterator[tuple[dict, Position]]:
        """``stream``'s raw samples after ``position``, each with
        the position after it; earlier ones replayed unread."""
        start_part, skip = position
        proxy = _CounterProxy(BadSampleCounter(1.0, 0) if skip else counter)  # a replay counts nothing twice
        empty = 0
        for part in itertools.count(start_part):
            used = 0
            for raw in self.part_raw(stream, part, proxy):
                used += 1
                if part == start_part and used <= skip:
                    continue
                proxy.counter = counter
                yield raw, (part, used)
            proxy.counter = counter
            empty = empty + 1 if used == 0 else 0
            if empty >= 2:
                raise RuntimeError(f"logical stream {stream} read no samples in two parts in a row (shards: "
                                   f"{[s.url for s in self.pipeline.shards][:5]}...); check the shards and sizes.json")

    def usable_from(
        self, stream: int, position: Position, counter: BadSampleCounter
    ) -> Iterator[tuple[dict, Position]]:
        """Decoded, preprocessed and priced samples of ``stream`` (bad ones counted and skipped)."""
        p = self.pipeline
        patience = 10_000
        since_good = 0
        for raw, after in self.raw_from(stream, position, counter):
            sample = p.process(raw, counter)
            if sample is None:
                since_good += 1
                if since_good > patience:
                    raise RuntimeError(f"logical stream {stream}: none of the last {since_good} samples could be used "
                                       f"(bad: {dict(counter.bad)}); check the shards")
                continue
            since_good = 0
            sample["__cost__"] = float(self.cost(sample))
            yield sample, after

    # ------------------------------------------------------------------ the worker's items
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.hosted[worker::workers]
        counter = BadSampleCounter(
            self.pipeline.max_bad_fraction, self.pipeline.log_bad, where=f"worker {worker} streams {mine}"
        )
        readers = {sid: self.usable_from(sid, self.positions.get(sid, (0, 0)), counter) for sid in mine}
        positions = {sid: self.positions.get(sid, (0, 0)) for sid in mine}
        for step in itertools.count(self.start_step):
            order = self.schedule.step(step)
            samples = []
            for sid in mine:
                for slot in np.flatnonzero(order == sid).tolist():
                    sample, positions[sid] = next(readers[sid])
                    samples.append((slot, sid, sample))
            yield {"step": step, "worker": worker, "samples": samples, "positions": dict(positions),
                   "seen": counter.seen, "bad": dict(counter.bad)}
