"""One optimizer step, and the state the loop carries from one to the next.

Kept apart from the loop (``mmdist.training.loop``) so the benchmarks time the very
function training runs, and tests drive it on a bare engine. What a batch counts
comes from the model (``batch_counts``, mmdist.models.contract), not from the
batch's key names. A micro-batch whose loss is NaN/inf on any rank is dropped on
every rank before the backward pass and the next batch takes its place. Running
out of device memory raises :class:`StepOutOfMemoryError`, which says at which step
and micro-batch (the loop adds what to change).

With ``MMDIST_STEP_PHASES=1`` in the environment (read once, at import) the step
times its phases (``phases``, a :class:`PhaseTimer`): data wait, host-to-device copy,
forward, backward, optimizer, host syncs; on a GPU each phase ends with a
synchronize, so the breakdown is exact but the step slower. Off, it costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from mmdist import distributed as dist
from mmdist.data.collate import to_device
from mmdist.models.contract import BatchCounts, TrainableModel
from mmdist.oom import memory_summary

__all__ = ["Batches", "NonFiniteLossError", "PhaseTimer", "StepOutOfMemoryError", "TrainState", "float_dtype", "phases",
           "train_step"]


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row: the run cannot continue meaningfully."""


class StepOutOfMemoryError(RuntimeError):
    """The device ran out of memory during a step: which step and micro-batch, and the device's memory then."""

    def __init__(self, step: int, micro_batch: int, accumulation: int, phase: str, memory: str):
        self.step, self.micro_batch, self.accumulation, self.phase, self.memory = (
            step,
            micro_batch,
            accumulation,
            phase,
            memory,
        )
        super().__init__(
            f"out of memory at step {step}, micro-batch {micro_batch} of {accumulation}, in the {phase}: {memory}"
        )


@dataclass
class PhaseTimer:
    """Wall-clock seconds per named phase of the steps (``take()`` returns and clears them); a no-op when off."""

    enabled: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    device: Any = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None and torch.device(self.device).type == "cuda":
                torch.cuda.synchronize(self.device)  # the phase's kernels belong to it, not to the next one
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


#: The trainer's phase timer (on with MMDIST_STEP_PHASES=1); benchmarks/gpu_system.py reads its breakdown.
phases = PhaseTimer(enabled=os.environ.get("MMDIST_STEP_PHASES", "") == "1")


@dataclass
class TrainState:
    """What the loop carries from one optimizer step to the next; :meth:`state_dict` is checkpointed.

    ``nonfinite_in_row`` counts the skipped micro-batches since the last completed
    step; it is not saved, since checkpoints are written only after a step completes.
    """

    step: int = 0
    samples: int = 0  # global samples seen (a packed row counts the samples in it)
    tokens: int = 0  # global tokens processed (prompt, image and answer tokens)
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0

    def state_dict(self) -> dict:
        """The checkpoint's client-state keys (``step`` is written by CheckpointManager.save as well)."""
        return {
            "step": self.step,
            "samples": self.samples,
            "tokens": self.tokens,
            "nonfinite_total": self.nonfinite_total,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Older checkpoints lack ``tokens`` (and the oldest ``samples``/``nonfinite_total``): those restart at 0."""
        self.step = int(state["step"])
        self.samples = int(state.get("samples", 0))
        self.tokens = int(state.get("tokens", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_row = 0


def train_step(
    engine: Any,
    micro_batches: Iterator[dict],
    state: TrainState,
    *,
    max_nonfinite_steps: int,
    fingerprint: bool = False,
    on_skip: Optional[Callable[[TrainState, float], None]] = None,
) -> dict:
    """One optimizer step: ``engine.gradient_accumulation_steps()`` finite micro-batches, each forward, backward, step.

    ``engine`` is a DeepSpeed engine around a :class:`~mmdist.models.contract.TrainableModel`:
    it accumulates gradients over the micro-batches and updates the weights at the last
    one. Floating-point inputs are cast to the engine's bf16/fp16. A micro-batch whose
    loss is NaN/inf on any rank is dropped on every rank before backward (all ranks must
    skip the same batch, or ZeRO would hang): ``state`` counts it, ``on_skip(state, loss)``
    is told, and the next batch of ``micro_batches`` takes its place. The
    ``max_nonfinite_steps``-th skip in a row raises :class:`NonFiniteLossError`.

    Where the model's batches count ``loss_terms`` (stage 2: the answer tokens its loss
    averages over) the step trains on the mean over every term of the step: its
    micro-batches are drawn first, their terms summed over every rank (one all-reduce),
    and each micro-batch's loss is weighted by its share, so the update is the same
    however the global batch is cut into micro-batches and ranks (a run resumed on
    another number of GPUs, ``train.fit_micro_batch``), and the ``loss`` returned is that
    mean too. A micro-batch that replaces a skipped one keeps the step's count.

    ``state`` advances by one step and the step's samples and tokens. Returned, over
    every rank: the mean ``loss`` and model metrics, ``step_samples``, ``step_tokens``,
    ``step_supervised_tokens`` and ``step_image_tokens``, ``grad_norm`` when the engine
    reports one, the seconds ranks waited for each other (``allreduce_wait_s``, mean over
    ranks, and ``allreduce_wait_max_s``; :meth:`_StepStats.reduce` says how), and with
    ``fingerprint`` a hash of every rank's batches (skipped ones included) as ``data``.
    """
    accumulation = engine.gradient_accumulation_steps()
    half = float_dtype(engine)
    model: TrainableModel = engine.module
    stats = _StepStats()

    phases.device = engine.device

    def draw() -> tuple[dict, BatchCounts]:
        try:
            with phases.phase("data_wait"):
                batch = next(micro_batches)
        except StopIteration:
            raise RuntimeError(
                f"the micro-batches ran out after {stats.micro} of the {accumulation} of step {state.step + 1} "
                f"({state.nonfinite_in_row} skipped as non-finite): give train_step an endless iterator"
            ) from None
        return batch, model.batch_counts(batch)

    drawn = [draw()]
    weight = None  # per loss term, so that the engine's mean over micro-batches and ranks is the mean over every term
    if drawn[0][1].loss_terms is not None:
        drawn += [draw() for _ in range(accumulation - 1)]
        with phases.phase("host_sync"):
            terms = dist.all_reduce([sum(counts.loss_terms or 0 for _, counts in drawn)], engine.device)[0]
        weight = accumulation * dist.world_size() / max(terms, 1)
    while stats.micro < accumulation:
        batch, counts = drawn.pop(0) if drawn else draw()
        if fingerprint:
            stats.fingerprints.append(_fingerprint(batch))
        where = "host-to-device copy"
        try:
            with phases.phase("to_device"):
                batch = to_device(batch, engine.device, half)
            where = "forward"
            with phases.phase("forward"):
                out = engine(batch)
            loss = out["loss"]
            where = "non-finite check"
            with phases.phase("host_sync"):
                finite = stats.timed_wait(_finite_everywhere, loss, engine.device)
            if finite:
                where = "backward"
                with phases.phase("backward"):
                    engine.backward(loss if weight is None else loss * out["num_tokens"] * weight)
                where = "optimizer step"
                with phases.phase("optimizer"):
                    engine.step()
        except torch.OutOfMemoryError as exc:  # the memory figures are those at the failure
            raise StepOutOfMemoryError(
                state.step + 1, stats.micro + 1, accumulation, where, memory_summary(engine.device)
            ) from exc
        if not finite:
            # dropped before backward on every rank: no gradient, no optimizer update
            state.nonfinite_in_row += 1
            state.nonfinite_total += 1
            if on_skip is not None:
                on_skip(state, float(loss.detach()))
            if state.nonfinite_in_row >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{state.nonfinite_in_row} non-finite losses in a row "
                    f"at step {state.step + 1} (train.max_nonfinite_steps="
                    f"{max_nonfinite_steps}): lower train.lr, check the data (empty answers, bad images) or use "
                    "engine.precision=bf16/fp32"
                )
            continue
        with phases.phase("host_sync"):
            stats.add(loss, counts, out, weighted=weight is not None)

    state.step += 1
    state.nonfinite_in_row = 0
    with phases.phase("host_sync"):
        record = stats.reduce(engine.device)
    state.samples += record["step_samples"]
    state.tokens += record["step_tokens"]
    grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if fingerprint:
        record["data"] = _gathered_fingerprint(stats.fingerprints)
    if phases.enabled:
        record.update({f"phase_{name}_s": seconds for name, seconds in phases.take().items()})
    return record


class _StepStats:
    """What the micro-batches of one optimizer step add up to; summed over ranks when the step ends."""

    def __init__(self) -> None:
        self.micro, self.loss, self.samples, self.tokens = 0, 0.0, 0, 0
        self.wait = 0.0  # seconds this rank waited for the others at the step's sync points (see reduce)
        self.term_loss, self.terms = 0.0, 0  # loss x terms and terms, of micro-batches weighted by their loss terms
        self.supervised, self.image_tokens, self.images, self.positions = 0, 0, 0, 0
        self.metrics: dict[str, float] = {}
        self.fingerprints: list[str] = []

    def add(self, loss: torch.Tensor, counts: BatchCounts, out: dict, weighted: bool = False) -> None:
        metrics = out.get("metrics") or {}
        # one read from the device for the loss, its term count and the metrics (one sync on a GPU, not one each)
        scalars = [loss.detach()] + ([out["num_tokens"]] if weighted else []) + list(metrics.values())
        values = torch.stack([torch.as_tensor(v, device=loss.device).float().reshape(()) for v in scalars]).tolist()
        self.micro += 1
        self.loss += values[0]
        if weighted:
            self.term_loss += values[0] * int(values[1])
            self.terms += int(values[1])
        self.samples += counts.samples
        self.tokens += counts.tokens
        self.supervised += counts.supervised_tokens
        self.image_tokens += counts.image_tokens
        self.images += counts.images
        self.positions += counts.positions or counts.tokens
        for key, value in zip(metrics, values[2 if weighted else 1:]):
            self.metrics[key] = self.metrics.get(key, 0.0) + value

    def timed_wait(self, collective: Callable, *args: Any) -> Any:
        """Run ``collective`` after the device's queued work, adding its time to :attr:`wait` (several ranks only)."""
        if dist.world_size() == 1:
            return collective(*args)
        if torch.device(args[-1]).type == "cuda":
            torch.cuda.synchronize(args[-1])  # the forward's kernels are this rank's work, not waiting
        started = time.perf_counter()
        try:
            return collective(*args)
        finally:
            self.wait += time.perf_counter() - started

    def reduce(self, device: Any) -> dict:
        """The loss (the mean over every loss term where micro-batches are weighted, else over micro-batches) and
        the mean model metrics over every rank's micro-batches, global samples and tokens.

        Also the time ranks waited for each other: each rank times the step's collectives that do no work of
        their own, the non-finite check after every forward and a barrier here after the optimizer step, so a
        rank that finished its share early shows the time it waited for the slowest (``allreduce_wait_s``: the
        mean over ranks, ``allreduce_wait_max_s``: the rank that waited longest). Waits inside DeepSpeed's own
        gradient reduction are not separated from its transfer time and are not counted."""
        self.timed_wait(dist.all_reduce, [0.0], device)
        keys = sorted(self.metrics)  # the same model on every rank reports the same keys
        total = dist.all_reduce(
            [
                self.loss,
                self.micro,
                self.samples,
                self.tokens,
                self.supervised,
                self.image_tokens,
                self.term_loss,
                self.terms,
                self.images,
                self.wait,
                self.positions,
            ]
            + [self.metrics[k] for k in keys],
            device,
        )
        longest = dist.all_reduce([self.wait], device, op="max")[0]
        count = max(total[1], 1)
        loss = total[6] / total[7] if total[7] > 0 else total[0] / count
        out = {
            "loss": loss,
            "step_samples": int(total[2]),
            "step_tokens": int(total[3]),
            "step_supervised_tokens": int(total[4]),
            "step_image_tokens": int(total[5]),
            "step_images": int(total[8]),
            "step_positions": int(total[10]),
            "allreduce_wait_s": total[9] / dist.world_size(),
            "allreduce_wait_max_s": longest,
        }
        out.update({k: v / count for k, v in zip(keys, total[11:])})
        return out


def float_dtype(engine: Any) -> Optional[torch.dtype]:
    """The dtype floating-point inputs are cast to: the engine's half precision, or None (left as they are)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else None


def _fingerprint(batch: dict) -> str:
    digest = hashlib.sha1()
    for key in sorted(batch):
        value = batch[key]
        if hasattr(value, "detach"):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _gathered_fingerprint(fingerprints: list[str]) -> str:
    """One hash of the step's batches on every rank (rank order), identical on all ranks."""
    local = "|".join(fingerprints)
    if dist.world_size() > 1:
        local = "/".join(dist.all_gather_object(local))
    return hashlib.sha1(local.encode()).hexdigest()[:16]


def _finite_everywhere(loss: torch.Tensor, device: Any) -> bool:
    """True when the loss is finite on every rank (all ranks must skip the same batch, or ZeRO would hang)."""
    local = 1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0
    return dist.all_reduce([local], device, op="min")[0] > 0


class Batches:
    """Endless iteration over a loader: a finished pass starts the next epoch (the loader tracks which)."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.iterator: Optional[Iterator[dict]] = None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        for _ in range(2):
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
        raise RuntimeError(
            "the training loader yields no batches: check data.train (every shard empty or filtered out?)"
        )
