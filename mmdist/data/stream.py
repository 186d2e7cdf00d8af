"""One rank's stream of samples, as a torch ``IterableDataset``: each worker reads its planned shards in order.

Split from the loader (mmdist/data/loader.py) because it is what runs inside
the DataLoader's worker processes: it reads, shuffles, decodes and preprocesses
its samples, counts bad ones, and tags every batch with the worker's position
and the (shard, index) of each sample so that the loader can resume and re-plan.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmdist.data.collate import collate_align, collate_fuse, group_by_length
from mmdist.data.plan import (
    Consumed,
    WorkerPlan,
    plan_epoch,
    plan_remaining,
)
from mmdist.data.preprocess import Preprocessor
from mmdist.data.reader import (
    BadSample,
    BadSampleCounter,
    Shard,
    decode_sample,
    read_tar,
    shuffle_samples,
)
from mmdist.data.settings import DataConfig
from mmdist.stages import Batch

log = logging.getLogger(__name__)


class _CounterProxy:
    """Lets read_tar report into whichever counter is current (a throwaway one while replaying for resume)."""

    def __init__(self, counter: BadSampleCounter):
        self.counter = counter

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.counter.add(*args, **kwargs)


class ShardStream(IterableDataset):
    """One rank's stream of batches; each DataLoader worker produces its own share (see module docstring)."""

    def __init__(
        self,
        data: DataConfig,
        *,
        sources: list[tuple[list[Shard], float]],
        preprocess: Preprocessor,
        rank: int,
        world_size: int,
        batch_size: int,
        mode: str,
        shuffle: bool,
        pack: bool,
        pad_token_id: int,
        text_features: bool = False,
    ):
        """``data`` gives every pipeline setting; the arguments are what the split, stage and rank decide.

        ``mode`` is ``data.mode`` for training and ``epoch`` for evaluation, ``shuffle``
        is on for training only, ``pack`` only where ``data.packing`` applies (stage 2).
        """
        super().__init__()
        self.sources = sources
        self.shards = [s for shards, _ in sources for s in shards]
        self.preprocess = preprocess
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, data.num_workers)
        self.batch_size = batch_size
        self.mode = mode
        self.shuffle = shuffle
        self.seed = data.seed
        self.shuffle_buffer = data.shuffle_buffer if shuffle else 0
        self.samples_per_epoch = data.samples_per_epoch
        self.pack, self.group, self.group_batches = pack, data.group_by_length and shuffle, data.length_group_batches
        self.max_len, self.pad_token_id = data.max_len, pad_token_id
        self.max_bad_fraction, self.log_bad = data.max_bad_fraction, data.log_bad_samples
        self.max_image_pixels, self.max_text_chars = data.max_image_pixels, data.max_caption_chars
        self.text_features = text_features  # stage 1 from a cache with pooled caption features (mmdist/data/cache.py)
        # set by the loader before an iteration (and copied into workers)
        self.start_epoch = 0
        self.resume: dict[int, dict] = {}
        self.worker_map: list[int] = list(range(self.num_workers))
        self._iterations = 0
        # an epoch continued on another world size (StreamingLoader.load_elastic_state): the samples already
        # consumed in epoch ``base_epoch`` by every rank before; that epoch follows plan_remaining
        self.consumed_base: Consumed = {}
        self.base_epoch: Optional[int] = None
        self._plan_cache: Optional[tuple[tuple, tuple[list[WorkerPlan], int]]] = None
        # resampled mode continued on another world size: (epoch, global samples drawn before, the epoch's total)
        self.resampled_from: Optional[tuple[int, int, int]] = None

    # ------------------------------------------------------------------ plan
    def batches_per_rank(self, epoch: int) -> int:
        if self.mode == "resampled":
            if self.resampled_from is not None and self.resampled_from[0] == epoch:
                _, done, total = self.resampled_from
                return max(0, total - done) // (self.world_size * self.batch_size)
            return max(1, self.samples_per_epoch // (self.world_size * self.batch_size))
        return self._plan(epoch)[1]

    def _plan(self, epoch: int) -> tuple[list[WorkerPlan], int]:
        if epoch != self.base_epoch:
            return plan_epoch(
                self.shards,
                self.seed,
                epoch,
                self.rank,
                self.world_size,
                self.num_workers,
                self.batch_size,
                self.shuffle,
            )
        key = (epoch, self.world_size, self.num_workers)
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (
                key,
                plan_remaining(
                    self.shards,
                    self.consumed_base,
                    self.seed,
                    epoch,
                    self.rank,
                    self.world_size,
                    self.num_workers,
                    self.batch_size,
                    self.shuffle,
                ),
            )
        return self._plan_cache[1]

    def worker_plan(self, epoch: int, worker: int) -> WorkerPlan:
        if self.mode == "resampled":
            total = self.batches_per_rank(epoch)
            return WorkerPlan([], total // self.num_workers + (1 if worker < total % self.num_workers else 0))
        return self._plan(epoch)[0][worker]

    # ------------------------------------------------------------------ raw stream
    def _rng(self, *parts: Any) -> random.Random:
        return random.Random("-".join(str(p) for p in (self.seed, self.rank) + parts))

    def raw_samples(self, epoch: int, worker: int, plan: WorkerPlan, counter: _CounterProxy) -> Iterator[dict]:
        """Endless stream of raw samples for one worker (wraps around its shards; resampled: draws shards)."""
        if self.mode == "resampled":
            yield from self._resampled_raw(epoch, worker, counter)
            return
        for pass_ in itertools.count():
            rng = self._rng("samples", epoch, worker, pass_)
            order = list(plan.shards)
            if pass_ > 0 and self.shuffle:
                rng.shuffle(order)
            produced = 0
            chained = (
                sample for shard in order for sample in _indexed(read_tar(shard.url, counter), plan.keep, shard.url)
            )
            if plan.stride is not None:
                modulus, slot = plan.stride
                chained = (sample for j, sample in enumerate(chained) if j % modulus == slot)
            for sample in shuffle_samples(chained, self.shuffle_buffer, rng):
                produced += 1
                yield sample
            if produced == 0:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: no readable samples in shards {[s.url for s in order]}"
                )

    def _resampled_raw(self, epoch: int, worker: int, counter: _CounterProxy) -> Iterator[dict]:
        if self.resampled_from is not None and self.resampled_from[0] == epoch:
            epoch = f"{epoch}-from-{self.resampled_from[1]}"  # a continuation on another world size: new streams
        rng = self._rng("resampled", epoch, worker)
        weights = [w for _, w in self.sources]

        def source_stream(index: int) -> Iterator[dict]:
            shards = self.sources[index][0]
            srng = self._rng("resampled-shards", epoch, worker, index)
            while True:  # webdataset's ResampledShards, seeded per worker and source
                yield from read_tar(srng.choice(shards).url, counter)

        streams = [
            shuffle_samples(source_stream(i), self.shuffle_buffer, self._rng("buffer", epoch, worker, i))
            for i in range(len(self.sources))
        ]
        while True:
            index = rng.choices(range(len(streams)), weights=weights)[0] if len(streams) > 1 else 0
            yield next(streams[index])

    # ------------------------------------------------------------------ batches
    def _collate(self, samples: list[dict]) -> dict:
        if self.preprocess.stage.batch is Batch.CAPTIONS:
            batch = collate_align(samples, self.pad_token_id)
            if self.text_features:
                batch["text_features"] = torch.stack([s["text_features"] for s in samples])
            return batch
        return collate_fuse(samples, self.pad_token_id, pack=self.pack, max_len=self.max_len)

    def process(self, raw: dict, counter: BadSampleCounter) -> Optional[dict]:
        """decode -> preprocess one raw sample; a bad one is counted (by reason, with shard and key) and gives None."""
        try:
            sample = decode_sample(raw, self.max_image_pixels, self.max_text_chars)
            if sample["unsafe_members"]:
                log.debug(
                    "ignored pickle-like members %s of %s (never unpickled)", sample["unsafe_members"], sample["key"]
                )
            out = self.preprocess(sample)
            if self.text_features:
                out["text_features"] = _cached_text_features(sample)
            out["__pos__"] = (raw.get("__url__", "?"), raw.get("__index__", -1))
        except BadSample as exc:
            counter.add(exc.reason, raw.get("__url__", "?"), raw.get("__key__", "?"), exc.detail)
            return None
        counter.good()
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        first = self._iterations == 0
        epoch = self.start_epoch + self._iterations
        self._iterations += 1
        worker = self.worker_map[physical] if first else physical
        resume = self.resume.get(worker) if first else None
        yield from self.worker_batches(epoch, worker, resume)

    def worker_batches(self, epoch: int, worker: int, resume: Optional[dict] = None) -> Iterator[dict]:
        plan = self.worker_plan(epoch, worker)
        budget = plan.budget
        where = f"rank {self.rank} worker {worker} epoch {epoch}"
        counter = BadSampleCounter(self.max_bad_fraction, self.log_bad, where=where)
        if budget == 0:
            return
        resume = resume or {}
        pool_start = int(resume.get("pool_start", 0))
        emitted = int(resume.get("pool_emitted_start", 0))
        skip_in_pool = int(resume.get("emitted", emitted)) - emitted
        counter.seen = int(resume.get("pool_seen", 0))
        counter.bad.update(resume.get("pool_bad", {}))
        proxy = _CounterProxy(BadSampleCounter(1.0, 0) if pool_start else counter)
        raw_iter = self.raw_samples(epoch, worker, plan, proxy)
        for _ in range(pool_start):  # replay without decoding
            next(raw_iter)
        proxy.counter = counter
        raw_pos = pool_start
        pool_size = self.group_batches if self.group else 1
        # with data.max_bad_fraction=1 nothing else stops a worker whose samples are all bad from looping forever
        planned = sum(s.size or 0 for s in plan.shards) if plan.shards else 0
        patience = 2 * planned + 100 if self.mode == "epoch" else 10_000
        since_good = 0
        while emitted < budget:
            pool_emitted_start, pool_seen, pool_bad = emitted, counter.seen, dict(counter.bad)
            start = raw_pos
            n_batches = min(pool_size, budget - emitted)
            good: list[dict] = []
            while len(good) < n_batches * self.batch_size:
                raw = next(raw_iter)
                raw_pos += 1
                out = self.process(raw, counter)
                if out is not None:
                    good.append(out)
                    since_good = 0
                else:
                    since_good += 1
                    if since_good > patience:
                        raise RuntimeError(
                            f"rank {self.rank} worker {worker}: none of the last {since_good} samples could be used "
                            f"(bad: {dict(counter.bad)}; shards {[s.url for s in plan.shards][:5]}); check the shards"
                        )
            if self.group:
                batches = group_by_length(good, self.batch_size, self._rng("group", epoch, worker, start))
            else:
                batches = [good[i : i + self.batch_size] for i in range(0, len(good), self.batch_size)]
            for j, samples in enumerate(batches):
                emitted_now = pool_emitted_start + j + 1
                if j < skip_in_pool:
                    continue
                batch = self._collate(samples)
                last = j == len(batches) - 1
                state = {
                    "pool_start": raw_pos if last else start,
                    "pool_emitted_start": emitted_now if last else pool_emitted_start,
                    "emitted": emitted_now,
                    "pool_seen": counter.seen if last else pool_seen,
                    "pool_bad": dict(counter.bad) if last else pool_bad,
                }
                batch["_meta"] = {
                    "worker": worker,
                    "epoch": epoch,
                    "state": state,
                    "seen": counter.seen,
                    "bad": dict(counter.bad),
                    "keys": [s["key"] for s in samples],
                    "positions": [s.get("__pos__") for s in samples],
                }
                yield batch
            skip_in_pool = 0
            emitted = pool_emitted_start + len(batches)


def _indexed(samples: Iterator[dict], keep: Optional[dict[str, frozenset[int]]], url: str) -> Iterator[dict]:
    """Number the samples of one shard (``__index__``, their order in the tar); a continuation plan keeps some."""
    wanted = None if keep is None else keep.get(url, frozenset())
    for index, sample in enumerate(samples):
        if wanted is None or index in wanted:
            sample["__index__"] = index
            yield sample


def _cached_text_features(sample: dict) -> torch.Tensor:
    """The pooled caption vector [H] (fp32) stored by ``build_feature_cache`` beside the image features."""
    feats = sample["features"]
    if not isinstance(feats, dict) or "text_features" not in feats:
        raise BadSample(
            "missing_keys", "feature cache sample without text_features (its cache_key.json says it has them)"
        )
    return torch.from_numpy(np.asarray(feats["text_features"], dtype=np.float32))
