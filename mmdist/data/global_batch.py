"""The global batch: every optimizer step trains on the same samples however many ranks read them.

``data.order: global`` (the training default). The samples of global step ``s``
are a function of the data settings, ``data.seed``, ``train.global_batch_size``
and ``s`` alone (mmdist/data/streams.py): not of the world size, the micro-batch /
accumulation split or the data workers. Per step, on every rank:

1. the DataLoader workers read the logical streams this rank hosts (stream ``l``
   on rank ``l % world_size``), decode, preprocess and price their samples;
2. the ranks all-gather the (slot, cost, length) of the step's samples and each
   computes the same split (mmdist/data/balance.py): ``world x accumulation``
   micro-batches of equal predicted cost, a sample kept on the rank that read it
   where balance allows;
3. the samples that change rank travel in one all-to-all (mmdist/data/exchange.py);
4. the rank collates its micro-batches and hands them out in order.

Without a process group of ``world_size`` ranks (one process, or a test that
builds every rank's loader in one process) the loader reads every stream itself
and keeps its share: the same split, the same batches.

The position is global too: the steps handed out and where every stream stands
(part, raw samples used), so a checkpoint resumes on any number of ranks, any
micro-batch and any worker count, and continues with exactly the batches the
uninterrupted run would have trained on (``load_elastic_state`` merges the
streams of every saved rank). An iteration runs to the end of an epoch (``len()``
micro-batches from an epoch's start); the next one goes on from the same workers.
``close()`` stops the workers (a run's end); a later iteration starts new ones at the position.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils.data import DataLoader

from mmdist.data.balance import loads_of, split_global_batch
from mmdist.data.cost import imbalance
from mmdist.data.exchange import Exchange
from mmdist.data.reader import check_bad_fraction
from mmdist.data.streams import HostedStreams, Position
from mmdist.data.workers import forking_workers

log = logging.getLogger(__name__)
STATE_VERSION = 3


def _identity(item: dict) -> dict:
    return item


def _next_step(items: Iterator[dict], workers: int) -> list[dict]:
    """The next item of each of the ``workers`` data workers (one step's samples each)."""
    try:
        return [next(items) for _ in range(workers)]
    except BaseException as exc:
        # The traceback's frames (a worker's error re-raised by torch, an interrupt) hold the DataLoader iterator,
        # so its workers would live as long as the error is kept: drop their locals (the traceback prints the same).
        del items
        traceback.clear_frames(exc.__traceback__)
        raise


class GlobalBatchLoader:
    """This rank's micro-batches of every global step, in order; ``state_dict()`` / ``load_state_dict()`` /
    ``load_elastic_state()`` move the position between any world sizes (see the module docstring)."""

    def __init__(self, dataset: HostedStreams, *, rank: int, world_size: int, accumulation: int, micro_batch: int,
                 exchange: Optional[Exchange], num_workers: int, prefetch_factor: int,
                 max_bad_fraction: float, split: str, balance: bool, group_by_length: bool, epoch_samples: int):
        self.dataset = dataset
        self.rank, self.world_size, self.accumulation, self.micro_batch = rank, world_size, accumulation, micro_batch
        self.exchange = exchange
        self.num_workers = num_workers
        self.auto_workers = False  # set by build_loader; the worker count never changes the batches here
        self.prefetch_factor = prefetch_factor
        self.max_bad_fraction = max_bad_fraction
        self.split = split
        self.balance, self.group_by_length = balance, group_by_length
        self.steps_per_epoch = max(1, math.ceil(epoch_samples / dataset.global_batch))
        streams = range(dataset.streams)
        self.hosted = [sid for sid in streams if sid % world_size == rank] if exchange is not None else list(streams)
        self.step = 0  # global steps whose micro-batches this rank has all handed out
        self.micro_done = 0  # micro-batches of the next step already handed out
        self.positions: dict[int, Position] = {}  # every stream this rank knows, at the start of step ``self.step``
        self.worker_counts: dict[int, tuple[int, dict]] = {}
        self.last_keys: list[str] = []
        self.last_report: dict = {}
        self._stream: Optional[Iterator[dict]] = None  # the endless micro-batch generator iterations continue

    # -------------------------------------------------------------- sizes
    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation

    @property
    def batches_per_epoch(self) -> int:
        return len(self)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        """The micro-batches to the end of the current epoch (``len()`` of them from an epoch's start); the next
        iteration continues with the next epoch from the same workers."""
        if self._stream is None:
            self._stream = self._micro_batches()
        end = (self.epoch + 1) * self.steps_per_epoch
        for batch in self._stream:
            yield batch
            if self.micro_done == 0 and self.step >= end:
                return

    def close(self) -> None:
        """Stop the data workers now; an iteration after this starts them again at the position handed out.

        The trainer calls it when a run ends, on an error too. Without it the workers stop only when the
        loader is garbage collected, and torch then waits 5 s on every worker."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _micro_batches(self) -> Iterator[dict]:
        d = self.dataset
        d.hosted, d.start_step = list(self.hosted), self.step
        d.positions = {sid: self.positions.get(sid, (0, 0)) for sid in self.hosted}
        skip = self.micro_done
        kwargs: dict = {}
        if self.num_workers > 0:
            kwargs = {"persistent_workers": False, "prefetch_factor": self.prefetch_factor}
        loader = DataLoader(d, batch_size=None, num_workers=self.num_workers, collate_fn=_identity, **kwargs)
        pin = torch.cuda.is_available()  # pinned host memory makes the trainer's copies to the GPU asynchronous
        with forking_workers():  # the workers start here
            items = iter(loader)
        workers = max(1, self.num_workers)
        try:
            while True:
                parts = _next_step(items, workers)  # the DataLoader takes the workers in turn: one step each
                step = parts[0]["step"]
                if any(p["step"] != step for p in parts):
                    raise RuntimeError(f"data workers out of step: {[p['step'] for p in parts]}")
                for p in parts:
                    self.worker_counts[p["worker"]] = (p["seen"], p["bad"])
                self._check_bad()
                started = time.perf_counter()
                hosted = sorted(((slot, sid, s) for p in parts for slot, sid, s in p["samples"]),
                                key=lambda t: t[0])
                micro, report = self._distribute(hosted)
                report["data_exchange_s"] = time.perf_counter() - started
                positions = {sid: pos for p in parts for sid, pos in p["positions"].items()}
                for m, samples in enumerate(micro):
                    if m < skip:
                        continue
                    batch = self.dataset.pipeline._collate(samples)
                    if pin:
                        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                 for k, v in batch.items()}
                    self.last_keys = [s["key"] for s in samples]
                    self.micro_done = m + 1
                    if m + 1 == self.accumulation:  # the step is handed out: the position moves past it
                        self.step, self.micro_done = step + 1, 0
                        self.positions.update(positions)
                        self.last_report = report
                    yield batch
                skip = 0
        finally:
            # The DataLoader has no public shutdown (``_shutdown_workers`` is private): torch stops an iterator's
            # workers when the iterator is freed. Here that is at once, on dropping its one reference (close());
            # left to a later collection of this generator's cycle, torch's queues are closed first and every
            # worker's join waits out its 5 s timeout.
            del items

    def _distribute(self, hosted: list[tuple[int, int, dict]]) -> tuple[list[list[dict]], dict]:
        """This rank's micro-batches of one step from the samples it read, and the step's balance report."""
        mine_meta = [
            (slot, s["__cost__"], len(s["input_ids"]) if "input_ids" in s else None, sid) for slot, sid, s in hosted
        ]
        gathered = [mine_meta] if self.exchange is None else self.exchange.all_gather(mine_meta)
        table = sorted(item for meta in gathered for item in meta)
        slots = [t[0] for t in table]
        if len(set(slots)) != len(slots) or len(slots) != self.dataset.global_batch:
            raise RuntimeError(
                f"the ranks read {len(slots)} samples ({len(set(slots))} distinct) for a global batch of "
                f"{self.dataset.global_batch}: their stream positions disagree (a checkpoint mixed?)"
            )
        costs = [t[1] for t in table]
        hosts = [sid % self.world_size for *_, sid in table]  # the rank that hosts the stream (here, or simulated)
        pipeline = self.dataset.pipeline
        if any(t[2] is None for t in table):  # image-caption pairs: the images, not the captions, take the memory
            lengths, budget, packed = [1] * len(table), self.micro_batch, True
        else:
            lengths, budget, packed = [t[2] for t in table], self.micro_batch * pipeline.max_len, pipeline.pack
        assignment = split_global_batch(
            costs,
            self.world_size,
            self.accumulation,
            hosts=hosts,
            by_cost=self.balance,
            lengths=lengths,
            group_by_length=self.group_by_length,
            budget=budget,
            packed=packed,
        )
        where = dict(zip(slots, assignment))
        if self.exchange is None:
            mine = [(slot, s) for slot, _, s in hosted if where[slot][0] == self.rank]
            moved = 0
        else:
            outgoing: list[list[tuple[int, dict]]] = [[] for _ in range(self.world_size)]
            for slot, _, s in hosted:
                outgoing[where[slot][0]].append((slot, s))
            moved = sum(len(out) for r, out in enumerate(outgoing) if r != self.rank)
            kept = outgoing[self.rank]
            outgoing[self.rank] = []
            received = self.exchange.all_to_all(outgoing)
            mine = kept + [item for part in received for item in part]
        mine.sort(key=lambda t: t[0])
        micro: list[list[dict]] = [[] for _ in range(self.accumulation)]
        for slot, s in mine:
            micro[where[slot][1]].append(s)
        rank_loads, micro_loads = loads_of(assignment, costs, self.world_size, self.accumulation)
        report = {"cost_imbalance": imbalance(rank_loads), "micro_cost_imbalance": imbalance(micro_loads),
                  "rank_cost": rank_loads[self.rank], "samples_moved": moved}
        return micro, report

    def step_report(self) -> dict:
        """The balance of the last step handed out: per-rank cost max/mean (``cost_imbalance``), the same over every
        micro-batch, this rank's cost, samples this rank sent away, seconds spent splitting and exchanging."""
        return dict(self.last_report)

    def _check_bad(self) -> None:
        seen = sum(c[0] for c in self.worker_counts.values())
        bad: Counter = Counter()
        for _, b in self.worker_counts.values():
            bad.update(b)
        check_bad_fraction(bad, seen, self.max_bad_fraction, where=f"{self.split} split, rank {self.rank}")

    def bad_counts(self) -> dict[str, int]:
        """Bad samples skipped so far by this rank's workers, by reason."""
        bad: Counter = Counter()
        for _, b in self.worker_counts.values():
            bad.update(b)
        return {k: v for k, v in bad.items() if v}

    # -------------------------------------------------------------- resume
    def _identity(self) -> dict:
        d, p = self.dataset, self.dataset.pipeline
        urls = hashlib.sha1("\n".join(s.url for s in p.shards).encode()).hexdigest()[:16]
        return {"order": "global", "split": self.split, "seed": p.seed, "mode": p.mode, "streams": d.streams,
                "global_batch": d.global_batch, "shards": urls, "shuffle_buffer": p.shuffle_buffer,
                "samples_per_epoch": p.samples_per_epoch if p.mode == "resampled" else None}

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "step": self.step,
            "micro": self.micro_done,
            "rank": self.rank,
            "world_size": self.world_size,
            "accumulation": self.accumulation,
            "epoch": self.epoch,
            "positions": {str(sid): list(self.positions.get(sid, (0, 0))) for sid in self.hosted},
        }

    def _check_identity(self, states: list[dict]) -> None:
        mine = self._identity()
        for state in states:
            if state.get("order") != "global":
                raise ValueError(
                    "the saved data position is per rank (data.order=per_rank, or an mmdist from before the "
                    "global order): resume with data.order=per_rank, or start the data afresh"
                )
            for key, value in mine.items():
                if state.get(key) != value:
                    raise ValueError(
                        f"the data position was saved with {key}={state.get(key)!r} but this run has "
                        f"{key}={value!r}: the global order would change. Resume with the same setting, or "
                        "start the data afresh (drop the loader state)"
                    )

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (this rank's, same world size) stopped."""
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError(
                f"loader state of {state.get('world_size')} ranks given to a run of {self.world_size}: use "
                "load_elastic_state with every saved rank's state"
            )
        self.load_elastic_state([state], own=True)

    def load_elastic_state(self, states: list[dict], own: bool = False) -> None:
        """Continue from the loader states of every rank of a checkpoint (written by any number of ranks)."""
        if not states or any(s is None for s in states):
            raise ValueError("a saved rank has no data loader state")
        self._check_identity(states)
        steps = {(int(s["step"]), int(s.get("micro", 0))) for s in states}
        if len(steps) != 1:
            raise ValueError(
                f"the saved ranks stopped at different steps {sorted(steps)}; the checkpoint is inconsistent"
            )
        step, micro = steps.pop()
        positions: dict[int, Position] = {}
        for state in states:
            for key, pos in state.get("positions", {}).items():
                pos = (int(pos[0]), int(pos[1]))
                if positions.setdefault(int(key), pos) != pos:
                    raise ValueError(
                        f"two saved ranks disagree on where stream {key} stands; the checkpoint is inconsistent"
                    )
        missing = sorted(set(range(self.dataset.streams)) - set(positions)) if not own else \
            sorted(set(self.hosted) - set(positions))
        if missing and step > 0:
            raise ValueError(
                f"the saved loader states leave the position of stream(s) {missing[:8]} unknown: pass every "
                "saved rank's state"
            )
        same_split = int(states[0].get("accumulation", -1)) == self.accumulation and own
        if micro and not same_split:
            log.warning(
                "the checkpoint was written %d micro-batch(es) into step %d with another split; step %d is read "
                "again from its start",
                micro,
                step + 1,
                step + 1,
            )
            micro = 0
        self.close()  # the workers read from the old position
        self.step, self.micro_done, self.positions = step, micro, positions
