"""The streaming loader: ``build_loader(cfg, processors, split, rank, world_size)``.

Stages, in the order data flows (each a named function in mmdist/data):

    list_shards -> shuffle_shards (seed + epoch, same on every rank) -> split_by_node
    -> split_by_worker -> read_tar -> shuffle_samples (raw bytes) -> decode_sample
    -> Preprocessor (template, image tokens, truncation) -> collate_fuse / collate_align

Equal batches on every rank: an epoch has a fixed per-rank budget of
``ceil(total samples / (world_size x micro_batch))`` batches (from sizes.json
counts), split across a rank's workers in proportion to their samples. A worker
that runs out wraps around to its own shards again (a new sample order); one with
more samples than its budget stops early. So no rank waits forever on a
collective, and with evenly sized shards every sample is seen exactly once. Resampled
mode draws shards with replacement (weighted by source) for ``samples_per_epoch``.

Resume: each batch carries its worker's position (raw samples drawn, batches
emitted, the start of the current length-grouping pool, bad-sample counts); the
loader keeps the position of the last batch *handed out* (not prefetched ones).
Every random choice is seeded by (seed, epoch, rank, worker, pass), so a
restored worker replays its raw stream without decoding up to the saved
position and continues exactly where it stopped; workers are re-mapped so the
DataLoader's round-robin continues in the same order.

Another world size (epoch mode): shards are split by rank and shuffles seeded by
rank, so a per-rank position cannot move. Every sample therefore carries its
(shard url, index in the tar), the loader records which ones it handed out this
epoch, and ``load_elastic_state`` merges every saved rank's record and re-plans
the rest of the epoch for the new ranks (``plan_remaining``): the unconsumed
samples, cut into equal runs per rank, each read once (only a short last batch
per rank repeats a few). Resampled mode has no positions (draws are with
replacement): the epoch goes on for the global samples it has left, from new
streams seeded also by where the continuation began, so the continuation is
the same every time it is run and repeats no saved rank's draws.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmdist import hardware
from mmdist.data.cache import open_feature_cache
from mmdist.data.collate import pad_id_of
from mmdist.data.cost import cost_model
from mmdist.data.exchange import Exchange
from mmdist.data.global_batch import GlobalBatchLoader
from mmdist.data.plan import (
    Consumed,
    decode_consumed,
    encode_consumed,
    merge_consumed,
    plan_epoch,
    to_mask,
)
from mmdist.data.preprocess import make_preprocessor
from mmdist.data.reader import (
    Shard,
    check_bad_fraction,
    list_shards,
)
from mmdist.data.selfcheck import self_check
from mmdist.data.settings import DataConfig
from mmdist.data.stream import ShardStream
from mmdist.data.streams import HostedStreams, stream_count
from mmdist.data.workers import forking_workers
from mmdist.stages import Batch

if TYPE_CHECKING:
    from mmdist.config.run import RunConfig

log = logging.getLogger(__name__)
STATE_VERSION = 2


def _identity(batch: Any) -> Any:
    return batch


class StreamingLoader:
    """Iterable over one epoch of batches per ``iter()``, with ``len()``, ``state_dict()`` and ``load_state_dict()``."""

    def __init__(self, dataset: ShardStream, num_workers: int, persistent_workers: bool, prefetch_factor: int,
                 max_bad_fraction: float, split: str):
        self.dataset = dataset
        self.num_workers = num_workers
        self.auto_workers = False  # build_loader: data.num_workers was null (auto), a checkpoint's count wins on resume
        self.persistent_setting = persistent_workers
        self.persistent = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.max_bad_fraction = max_bad_fraction
        self.split = split
        self.epoch = 0
        self.batches_done = 0
        self.worker_state: dict[int, dict] = {}
        self.worker_counts: dict[int, tuple[int, dict]] = {}
        self.last_keys: list[str] = []
        # samples handed out this epoch by this rank (shard url ->
        # indices in the tar), for a resume on another world size
        self.consumed: dict[str, set[int]] = {}
        self._loader: Optional[DataLoader] = None
        self._iteration: Optional[weakref.ref] = None  # the iteration in progress, if any
        self._resume_pending = False
        self._in_epoch = False

    # -------------------------------------------------------------- sizes
    def __len__(self) -> int:
        return self.dataset.batches_per_rank(self.epoch)

    @property
    def batches_per_epoch(self) -> int:
        return len(self)

    # -------------------------------------------------------------- iteration
    def _make_loader(self) -> DataLoader:
        kwargs: dict = {}
        if self.num_workers > 0:
            kwargs = {"persistent_workers": self.persistent, "prefetch_factor": self.prefetch_factor}
        # pinned host memory makes the trainer's non_blocking copies to the GPU asynchronous
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def _prepare_epoch(self) -> None:
        if self._in_epoch and not self._resume_pending:
            self.epoch += 1  # the previous iteration was abandoned part-way: that epoch is over
        resuming = self._resume_pending
        if not resuming:
            self.batches_done = 0
            self.worker_state = {}
            self.worker_counts = {}
            self.consumed = {}
        self._in_epoch = True
        workers = max(1, self.num_workers)
        if resuming and self.worker_state:
            # continue the round-robin where it stopped: next worker first (fewest batches, then lowest id)
            emitted = {w: self.worker_state.get(w, {}).get("emitted", 0) for w in range(workers)}
            worker_map = sorted(range(workers), key=lambda w: (emitted[w], w))
        else:
            worker_map = list(range(workers))
        if self.persistent and self._loader is not None and not resuming:
            return  # persistent workers count epochs themselves, in lockstep with this loader
        self.dataset.start_epoch = self.epoch
        self.dataset._iterations = 0
        self.dataset.resume = dict(self.worker_state) if resuming else {}
        self.dataset.worker_map = worker_map
        self._loader = self._make_loader()
        self._resume_pending = False

    def __iter__(self) -> Iterator[dict]:
        iteration = self._epoch_batches()
        self._iteration = weakref.ref(iteration)  # for close(); a strong one would tie the loader in a cycle
        return iteration

    def close(self) -> None:
        """Stop the data workers now (the trainer calls it when a run ends, on an error too); an iteration after
        this starts the next epoch, as after an abandoned one. Without it the workers stop when the loader is
        garbage collected, and torch then waits 5 s on every worker."""
        iteration = self._iteration() if self._iteration is not None else None
        if iteration is not None:
            iteration.close()  # its frame held the DataLoader's iterator: freed now, torch stops the workers
        self._iteration = None
        self._loader = None  # persistent workers: the DataLoader holds their iterator

    def _epoch_batches(self) -> Iterator[dict]:
        self._prepare_epoch()
        batches = None
        try:
            with forking_workers():  # the workers start here (persistent ones: at the first epoch)
                batches = iter(self._loader)
            for batch in batches:
                meta = batch.pop("_meta")
                self.worker_state[meta["worker"]] = meta["state"]
                self.worker_counts[meta["worker"]] = (meta["seen"], meta["bad"])
                self.last_keys = meta["keys"]
                for url, index in meta["positions"]:
                    if index >= 0:
                        self.consumed.setdefault(url, set()).add(index)
                self.batches_done += 1
                self._check_bad()
                yield batch
        except BaseException as exc:  # a worker's error re-raised: torch's frames in it hold the workers
            batches = None  # and so does this frame's reference to the DataLoader's iterator, kept by the traceback
            traceback.clear_frames(exc.__traceback__)
            raise
        self.epoch += 1
        self._in_epoch = False
        self.batches_done = 0
        self.worker_state = {}  # bad-sample counts stay readable until the next epoch starts
        self.consumed = {}

    def _check_bad(self) -> None:
        seen = sum(c[0] for c in self.worker_counts.values())
        bad: Counter = Counter()
        for _, b in self.worker_counts.values():
            bad.update(b)
        check_bad_fraction(bad, seen, self.max_bad_fraction, where=f"{self.split} split, rank {self.dataset.rank}")

    def bad_counts(self) -> dict[str, int]:
        """Bad samples skipped so far this epoch on this rank, by reason."""
        bad: Counter = Counter()
        for _, b in self.worker_counts.values():
            bad.update(b)
        return {k: v for k, v in bad.items() if v}

    # -------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        d = self.dataset
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "batches_in_epoch": len(self),
            "rank": d.rank,
            "world_size": d.world_size,
            "num_workers": d.num_workers,
            "seed": d.seed,
            "mode": d.mode,
            "batch_size": d.batch_size,
            "workers": {str(w): dict(s) for w, s in self.worker_state.items()},
            # epoch mode, version 2: what this rank consumed of the epoch (with what the ranks before a resume on
            # another world size consumed), so the whole epoch's position can move to another world size
            "consumed": encode_consumed(self._consumed_in_epoch()) if d.mode == "epoch" else {},
            "base": encode_consumed(d.consumed_base) if d.base_epoch == self.epoch else {},
            "resampled_from": list(d.resampled_from)
            if d.resampled_from and d.resampled_from[0] == self.epoch
            else None,
        }

    def _consumed_in_epoch(self) -> Consumed:
        d = self.dataset
        own = {url: to_mask(ix) for url, ix in self.consumed.items()}
        return merge_consumed(d.consumed_base, own) if d.base_epoch == self.epoch else own

    def load_state_dict(self, state: dict) -> None:
        d = self.dataset
        saved_workers = state.get("num_workers")
        if self.auto_workers and isinstance(saved_workers, int) and saved_workers != d.num_workers:
            # The sample order depends on the worker count: an auto count follows the checkpoint, so a job
            # resumed on a machine with other CPUs reads on exactly where it stopped.
            print(f"[mmdist] data.num_workers: auto -> {saved_workers}, as the checkpoint was written with", flush=True)
            d.num_workers = max(1, saved_workers)
            self.num_workers = saved_workers
            self.persistent = self.persistent_setting and saved_workers > 0
            d.worker_map = list(range(d.num_workers))
        for key, mine in (
            ("world_size", d.world_size),
            ("num_workers", d.num_workers),
            ("seed", d.seed),
            ("mode", d.mode),
            ("batch_size", d.batch_size),
        ):
            if state.get(key, mine if key == "batch_size" else None) != mine:  # a state without batch_size predates it
                raise ValueError(
                    f"data loader state was saved with {key}={state.get(key)!r} "
                    f"but this run has {key}={mine!r}; the data "
                    "split would change. Resume with the same setting, "
                    "or start the data from a new epoch (drop the loader state)."
                )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state.get("batches_done", 0))
        self.worker_state = {int(w): dict(s) for w, s in state.get("workers", {}).items()}
        self.worker_counts = {}
        own = decode_consumed(state.get("consumed", {}))
        base = decode_consumed(state.get("base", {}))
        d.consumed_base, d.base_epoch = (base, self.epoch) if base else ({}, None)
        d._plan_cache = None
        d.resampled_from = tuple(int(x) for x in state["resampled_from"]) if state.get("resampled_from") else None
        # only what this rank handed out since the continuation began is its own
        self.consumed = {url: set(np.flatnonzero(mask).tolist()) - set(np.flatnonzero(base.get(url, [])).tolist())
                         for url, mask in own.items()}
        self._resume_pending = True
        self._in_epoch = False

    def load_elastic_state(self, states: list[dict]) -> None:
        """Continue from the loader states of every rank of a checkpoint written by another number of ranks.

        Epoch mode: the epoch in progress goes on with exactly its samples that no saved rank had
        handed out (:func:`plan_remaining`), split evenly over this world; later epochs are planned
        for this world as usual. Resampled mode: draws are with replacement, so there is no
        position to carry over: the epoch goes on for the global samples it has left (so it ends
        at the optimizer step an uninterrupted run's would), drawn from streams seeded by (seed,
        epoch, samples drawn before, rank, worker): the same on every rerun of the resume, and
        none a saved rank has drawn from. A state without a consumed record (saved before
        version 2) raises ``ValueError``.
        """
        d = self.dataset
        if not states or any(s is None for s in states):
            raise ValueError("a saved rank has no data loader state")
        for key, mine in (("seed", d.seed), ("mode", d.mode), ("split", self.split)):
            theirs = {s.get(key) for s in states}
            if theirs != {mine}:
                raise ValueError(
                    f"data loader states were saved with {key}={sorted(map(str, theirs))} but this run has "
                    f"{key}={mine!r}; resume with the same setting, or start the data afresh (drop the loader state)"
                )
        epochs = {int(s["epoch"]) for s in states}
        if len(epochs) != 1:
            raise ValueError(
                f"the saved ranks stopped in different epochs {sorted(epochs)}; the checkpoint is inconsistent"
            )
        epoch = epochs.pop()
        self.batches_done = 0
        self.worker_state = {}
        self.worker_counts = {}
        self.consumed = {}
        d.consumed_base, d.base_epoch, d._plan_cache = {}, None, None
        d.resampled_from = None
        self._resume_pending = False
        self._in_epoch = False
        self._loader = None
        finished = all(s.get("batches_done", 0) >= s.get("batches_in_epoch", math.inf) for s in states)
        if d.mode == "resampled":
            self.epoch = epoch
            self._continue_resampled(states, epoch)
            return
        if any(int(s.get("version", 1)) < 2 for s in states):
            raise ValueError(
                "the data loader state predates the global data position (loader state version 1 records per-rank "
                "positions only); resume it once on the world size that wrote it"
            )
        if finished:  # every saved rank had handed out its whole epoch (its last batch was the checkpoint's)
            self.epoch = epoch + 1
            return
        consumed = merge_consumed(*(decode_consumed(s.get("consumed", {})) for s in states))
        unknown = sorted(set(consumed) - {shard.url for shard in d.shards})
        if unknown:  # moved or renamed shards: every sample would be read again
            raise ValueError(
                f"the saved data position names {len(unknown)} shard(s) this run does not read (e.g. {unknown[:3]}); "
                "the position is keyed by shard URL: give data.train the same shard paths as the saved run"
            )
        self.epoch = epoch
        if consumed:
            d.consumed_base, d.base_epoch = consumed, epoch
            if d.batches_per_rank(epoch) == 0:  # nothing of the epoch is left
                d.consumed_base, d.base_epoch, d._plan_cache = {}, None, None
                self.epoch = epoch + 1

    def _continue_resampled(self, states: list[dict], epoch: int) -> None:
        """Resampled epoch ``epoch`` goes on here for the global samples the saved ranks had not drawn."""
        d = self.dataset
        sizes = [int(s.get("batch_size", d.batch_size)) for s in states]
        earlier = states[0].get("resampled_from")  # the saved ranks were themselves a continuation of this epoch
        if earlier and int(earlier[0]) == epoch:
            before, total = int(earlier[1]), int(earlier[2])
        else:
            # states without batches_in_epoch
            per_rank = [max(1, d.samples_per_epoch // (len(states) * b)) for b in sizes]
            before, total = 0, sum(int(s.get("batches_in_epoch", n)) * b for s, n, b in zip(states, per_rank, sizes))
        done = before + sum(int(s.get("batches_done", 0)) * b for s, b in zip(states, sizes))
        if done == 0:  # nothing drawn yet: the epoch starts here as on any world size
            return
        d.resampled_from = (epoch, done, total)
        if d.batches_per_rank(epoch) == 0:  # less than one batch per rank left: the next epoch
            d.resampled_from = None
            self.epoch = epoch + 1


# ---------------------------------------------------------------------------
# building


def _sources(cfg: RunConfig, split: str, mode: str) -> list[tuple[list[Shard], float]]:
    source_cfgs = cfg.data.train if split == "train" else cfg.data.eval
    if not source_cfgs:
        raise ValueError(f"data.{split} has no sources; give shard patterns under data.{split}")
    out = []
    for src in source_cfgs:
        name = src.name or src.shards[0]
        out.append((list_shards(src.shards, source=name, need_sizes=mode == "epoch"), float(src.weight)))
    if mode == "epoch" and len({w for _, w in out}) > 1:
        log.warning(
            "data.%s: source weights are ignored in epoch mode (every "
            "sample once); use data.mode=resampled to mix by weight",
            split,
        )
    return out


def build_loader(cfg: RunConfig, processors: Any, split: str = "train", rank: int = 0, world_size: int = 1, *,
                 feature_key: Optional[dict] = None) -> StreamingLoader:
    """The loader of ``split`` ('train' or 'eval') for one rank (see the module docstring).

    With ``data.feature_cache`` set, batches carry ``image_features`` read from the
    cache instead of ``pixel_values`` (and, in stage 1 with a frozen text encoder and
    a cache that holds them, ``text_features``); the cache's key must match this run's
    (``feature_key`` overrides the encoder part, default ``processors.identity``).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = cfg.data
    mode = data.mode if split == "train" else "epoch"
    use_features = bool(data.feature_cache)
    text_features = False
    if use_features:
        sources, text_features = open_feature_cache(cfg, processors, split, feature_key)
    else:
        sources = _sources(cfg, split, mode)
    preprocess = make_preprocessor(cfg, processors, use_features=use_features)
    captions = cfg.stage.batch is Batch.CAPTIONS  # captions: the text encoder's tokens; else the LLM's
    tokenizer = processors.text_tokenizer if captions else processors.tokenizer
    if tokenizer is None:
        raise ValueError(f"stage {cfg.stage} needs processors.{'text_tokenizer' if captions else 'tokenizer'}")
    train = split == "train"
    data = replace(data, num_workers=resolve_num_workers(data.num_workers, announce=rank == 0 and train))
    dataset = ShardStream(
        data,
        sources=sources,
        preprocess=preprocess,
        rank=rank,
        world_size=world_size,
        batch_size=cfg.train.micro_batch_size,
        mode=mode,
        shuffle=train,
        pack=data.packing and cfg.stage.packs,
        pad_token_id=pad_id_of(tokenizer),
        text_features=text_features,
    )
    if train and data.order == "global":
        self_check(dataset, processors, data.self_check_samples)
        return _global_loader(cfg, data, dataset, processors.num_image_tokens, rank, world_size)
    if mode == "epoch":
        dataset.batches_per_rank(0)  # fails early (fewer shards than ranks, empty shards)
    self_check(dataset, processors, data.self_check_samples)
    loader = StreamingLoader(
        dataset, data.num_workers, data.persistent_workers, data.prefetch_factor, data.max_bad_fraction, split
    )
    loader.auto_workers = cfg.data.num_workers is None
    return loader


def _global_loader(cfg: RunConfig, data: DataConfig, pipeline: ShardStream, num_image_tokens: int, rank: int,
                   world_size: int) -> GlobalBatchLoader:
    """data.order=global: this rank's micro-batches of the world-size-independent global batches (global_batch.py)."""
    batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if batch % (micro * world_size):
        raise ValueError(
            f"train.global_batch_size={batch} is not micro_batch_size={micro} x accumulation x {world_size} "
            "rank(s); set train.fit_micro_batch or a global batch that the world size divides"
        )
    streams = stream_count(data.streams, pipeline.shards, pipeline.mode)
    if streams < data.streams and rank == 0:
        log.info("data.streams=%d: %d shard(s), so %d logical streams", data.streams, len(pipeline.shards), streams)
    cost = cost_model(data.image_row_cost, num_image_tokens)
    dataset = HostedStreams(pipeline, streams=streams, global_batch=batch, cost=cost)
    epoch_samples = (
        data.samples_per_epoch if pipeline.mode == "resampled" else sum(s.size or 0 for s in pipeline.shards)
    )
    return GlobalBatchLoader(
        dataset,
        rank=rank,
        world_size=world_size,
        accumulation=batch // (micro * world_size),
        micro_batch=micro,
        exchange=Exchange.for_world(world_size),
        num_workers=data.num_workers,
        prefetch_factor=data.prefetch_factor,
        max_bad_fraction=data.max_bad_fraction,
        split="train",
        balance=data.balance,
        group_by_length=data.group_by_length,
        epoch_samples=epoch_samples or batch,
    )


MAX_AUTO_WORKERS = 8


def resolve_num_workers(configured: Optional[int], announce: bool = False) -> int:
    """``data.num_workers``, or for null (auto) the CPUs this
    rank owns minus one for the training process, at most 8."""
    if configured is not None:
        return configured

    cpus, why = hardware.cpus_for_this_rank()
    workers = max(0, min(MAX_AUTO_WORKERS, cpus - 1))
    if announce:
        print(
            f"[mmdist] data.num_workers: auto -> {workers} ({cpus} CPU(s) "
            f"for this rank: {why}; one stays with training)",
            flush=True,
        )
    return workers


__all__ = ["build_loader", "StreamingLoader", "ShardStream", "plan_epoch", "self_check"]
