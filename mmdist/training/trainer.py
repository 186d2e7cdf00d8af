"""The one training loop, for both stages, and the ``mmdist train`` command.

A stage changes the config (which model is built, what trains, which data is
read, what is loaded), never the loop. The shape is torchtitan's:

* :class:`TrainState` is what the loop carries from one optimizer step to the
  next (step, samples, tokens, non-finite counters); its ``state_dict()`` goes
  into every checkpoint beside the RNG states and the loader's position.
* :func:`train_step` is one optimizer step over the engine's gradient
  accumulation micro-batches: forward, skip non-finite losses, backward, step.
  The benchmarks time this same function.
* :func:`train` reads like the job: join the process group
  (``mmdist.training.dist``) and write the resolved config; build the engine
  (model partitioned on load under ZeRO-3) and the loaders; resume from the run
  directory's latest checkpoint, if any; step until the budget
  (``train.max_steps`` / ``train.max_samples``) is spent, logging, evaluating
  and checkpointing; save the last checkpoint, export the trainable weights,
  release the engine (``EngineBundle.close``) and leave the group.

Preemption and hangs (docs/operations.md): SIGUSR1/SIGTERM only set a flag
(``mmdist.training.preemption``); after every optimizer step all ranks agree on
it (one all-reduce), so they stop after the same step, checkpoint, and
``mmdist train`` exits with ``PREEMPTED_EXIT`` (75) for the Slurm scripts to
requeue. A watchdog thread (``mmdist.training.watchdog``) is beaten after every
step; long phases (building the engine, resuming, the first step, evaluation,
saving) run under its longer phase limit.

A micro-batch whose loss is NaN/inf on any rank is dropped on every rank before
the backward pass: it adds no gradient and causes no optimizer update, and the
step is filled by the next batch. After ``train.max_nonfinite_steps`` of them in
a row the run stops with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as tdist

from mmdist.atomic import write_text_atomic
from mmdist.config import ConfigError, RunConfig, dump_config
from mmdist.export import export_trainable
from mmdist.hardware import default_device, peak_flops
from mmdist.models.freeze import param_table
from mmdist.precision import precision_lines, resolve_precision
from mmdist.training import dist, preemption
from mmdist.training.checkpoint import CheckpointError, CheckpointManager, capture_rng, restore_rng
from mmdist.training.engine import EngineBundle, build_engine, fit_micro_batch
from mmdist.training.metrics import MetricsLogger, Throughput, flop_count
from mmdist.training.watchdog import Watchdog

__all__ = ["NonFiniteLossError", "TrainState", "cli_main", "train", "train_step"]


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row: the run cannot continue meaningfully."""


def default_loader_builder(cfg: Any, processors: Any, split: str, rank: int, world_size: int) -> Iterable:
    from mmdist.data import build_loader

    return build_loader(cfg, processors, split, rank, world_size)


def compute_dtype(cfg: RunConfig) -> str:
    """The dtype most of a step's FLOPs run in (the peak MFU is measured against).

    A bf16/fp16 engine casts everything; an fp32 engine leaves the frozen backbones in
    their own dtype, and they carry almost all the FLOPs (the LLM in stage 2, the
    vision encoder in stage 1).
    """
    if cfg.engine.precision != "fp32":
        return cfg.engine.precision
    return cfg.model.llm.dtype if cfg.stage == "fuse" else cfg.model.vision.dtype


# ---------------------------------------------------------------------------
# one optimizer step


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
        return {"step": self.step, "samples": self.samples, "tokens": self.tokens, "nonfinite_total": self.nonfinite_total}

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

    ``engine`` is a DeepSpeed engine: it accumulates gradients over the micro-batches
    and updates the weights at the last one. Floating-point inputs are cast to the
    engine's bf16/fp16. A micro-batch whose loss is NaN/inf on any rank is dropped on
    every rank before backward (all ranks must skip the same batch, or ZeRO would
    hang): ``state`` counts it, ``on_skip(state, loss)`` is told, and the next batch
    of ``micro_batches`` takes its place. The ``max_nonfinite_steps``-th skip in a
    row raises :class:`NonFiniteLossError`.

    A model with ``loss_terms(batch)`` (stage 2: the answer tokens its loss averages
    over) is trained on the mean over every answer token of the step: the step's
    micro-batches are drawn first, their terms summed over every rank (one
    all-reduce), and each micro-batch's loss is weighted by its share, so the update
    is the same however the global batch is cut into micro-batches and ranks (a run
    resumed on another number of GPUs, ``train.fit_micro_batch``), and the ``loss``
    returned is that mean too. A micro-batch that replaces a skipped one keeps the
    step's count.

    ``state`` advances by one step and the step's samples and tokens. Returned, over
    every rank: the mean ``loss`` and model metrics, ``step_samples`` and
    ``step_tokens``, ``grad_norm`` when the engine reports one, and with
    ``fingerprint`` a hash of every rank's batches (skipped ones included) as ``data``.
    """
    accumulation = engine.gradient_accumulation_steps()
    float_dtype = _float_dtype(engine)
    module = getattr(engine, "module", None)
    stats = _StepStats(int(getattr(module, "num_image_tokens", 0) or 0))

    def draw() -> dict:
        try:
            return next(micro_batches)
        except StopIteration:
            raise RuntimeError(
                f"the micro-batches ran out after {stats.micro} of the {accumulation} of step {state.step + 1} "
                f"({state.nonfinite_in_row} skipped as non-finite): give train_step an endless iterator"
            ) from None

    drawn: list[dict] = []
    weight = None  # per loss term, so that the engine's mean over micro-batches and ranks is the mean over every term
    if callable(getattr(module, "loss_terms", None)):
        drawn = [draw() for _ in range(accumulation)]
        terms = _all_reduce([sum(module.loss_terms(b) for b in drawn)], engine.device)[0]
        weight = accumulation * _data_parallel_size() / max(terms, 1)
    while stats.micro < accumulation:
        batch = drawn.pop(0) if drawn else draw()
        if fingerprint:
            stats.fingerprints.append(_fingerprint(batch))
        batch = _to_device(batch, engine.device, float_dtype)
        out = engine(batch)
        loss = out["loss"]
        if not _finite_everywhere(loss, engine.device):
            # dropped before backward on every rank: no gradient, no optimizer update
            state.nonfinite_in_row += 1
            state.nonfinite_total += 1
            if on_skip is not None:
                on_skip(state, float(loss.detach()))
            if state.nonfinite_in_row >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{state.nonfinite_in_row} non-finite losses in a row at step {state.step + 1} (train.max_nonfinite_steps="
                    f"{max_nonfinite_steps}): lower train.lr, check the data (empty answers, bad images) or use "
                    "engine.precision=bf16/fp32"
                )
            continue
        engine.backward(loss if weight is None else loss * out["num_tokens"] * weight)
        engine.step()
        stats.add(loss, batch, out, weighted=weight is not None)

    state.step += 1
    state.nonfinite_in_row = 0
    record = stats.reduce(engine.device)
    state.samples += record["step_samples"]
    state.tokens += record["step_tokens"]
    grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if fingerprint:
        record["data"] = _gathered_fingerprint(stats.fingerprints, engine.device)
    return record


class _StepStats:
    """What the micro-batches of one optimizer step add up to; summed over ranks when the step ends."""

    def __init__(self, tokens_per_image: int = 0) -> None:
        self.micro, self.loss, self.samples, self.tokens = 0, 0.0, 0, 0
        self.term_loss, self.terms = 0.0, 0  # loss x terms and terms, of micro-batches weighted by their loss terms
        self.supervised, self.image_tokens, self.tokens_per_image = 0, 0, tokens_per_image
        self.metrics: dict[str, float] = {}
        self.fingerprints: list[str] = []

    def add(self, loss: Any, batch: dict, out: dict, weighted: bool = False) -> None:
        self.micro += 1
        self.loss += float(loss.detach())
        if weighted:
            self.term_loss += float(loss.detach()) * int(out["num_tokens"])
            self.terms += int(out["num_tokens"])
        self.samples += _batch_size(batch)
        self.tokens += _batch_tokens(batch, out)
        self.supervised += _supervised_tokens(batch, out)
        self.image_tokens += _batch_images(batch) * self.tokens_per_image
        for key, value in (out.get("metrics") or {}).items():
            self.metrics[key] = self.metrics.get(key, 0.0) + float(value)

    def reduce(self, device: Any) -> dict:
        """The loss (the mean over every loss term where micro-batches are weighted, else over micro-batches) and
        the mean model metrics over every rank's micro-batches, global samples and tokens."""
        keys = sorted(self.metrics)  # the same model on every rank reports the same keys
        total = _all_reduce([self.loss, self.micro, self.samples, self.tokens, self.supervised, self.image_tokens,
                             self.term_loss, self.terms] + [self.metrics[k] for k in keys], device)
        count = max(total[1], 1)
        loss = total[6] / total[7] if total[7] > 0 else total[0] / count
        out = {"loss": loss, "step_samples": int(total[2]), "step_tokens": int(total[3]),
               "step_supervised_tokens": int(total[4]), "step_image_tokens": int(total[5])}
        out.update({k: v / count for k, v in zip(keys, total[8:])})
        return out


def _data_parallel_size() -> int:
    """Ranks whose gradients the engine averages (every rank: mmdist runs data parallel only)."""
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def _float_dtype(engine: Any) -> Optional[torch.dtype]:
    """The dtype floating-point inputs are cast to: the engine's half precision, or None (left as they are)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else None


def _to_device(batch: dict, device: Any, float_dtype: Any) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and float_dtype is not None:
                value = value.to(float_dtype)
        out[key] = value
    return out


def _batch_size(batch: dict) -> int:
    """Samples in a batch; a packed row holds several (sequence_ids count them)."""
    seq = batch.get("sequence_ids")
    if seq is not None and hasattr(seq, "amax") and seq.numel():
        return int((seq.amax(dim=1) + 1).clamp(min=0).sum())
    for key in ("input_ids", "text_input_ids", "pixel_values", "image_features"):
        value = batch.get(key)
        if value is not None and hasattr(value, "shape"):
            return int(value.shape[0])
    for value in batch.values():  # any other batch layout: the leading dimension of its first tensor
        if hasattr(value, "shape") and len(value.shape) > 0:
            return int(value.shape[0])
    return 0


def _batch_tokens(batch: dict, out: dict) -> int:
    """Tokens the model processed (prompt, image and answer tokens: what the FLOPs are spent on)."""
    for key in ("attention_mask", "text_attention_mask"):
        if batch.get(key) is not None:
            return int(batch[key].sum())
    if "num_tokens" in out:
        return int(out["num_tokens"])
    return _batch_size(batch)


def _supervised_tokens(batch: dict, out: dict) -> int:
    """Positions where stage 2 runs the LM head: the model's ``num_tokens`` (after the shift), else ``labels != -100``."""
    if "num_tokens" in out:
        return int(out["num_tokens"])
    labels = batch.get("labels")
    return int(labels.ne(-100).sum()) if labels is not None and hasattr(labels, "ne") else 0


def _batch_images(batch: dict) -> int:
    """Images in a batch (pixels or cached features): each fills the model's ``num_image_tokens`` positions."""
    for key in ("pixel_values", "image_features"):
        value = batch.get(key)
        if value is not None and hasattr(value, "shape") and len(value.shape) > 0:
            return int(value.shape[0])
    return 0


def _fingerprint(batch: dict) -> str:
    digest = hashlib.sha1()
    for key in sorted(batch):
        value = batch[key]
        if hasattr(value, "detach"):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _gathered_fingerprint(fingerprints: list[str], device: Any) -> str:
    """One hash of the step's batches on every rank (rank order), identical on all ranks."""
    local = "|".join(fingerprints)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, local)
        local = "/".join(gathered)
    return hashlib.sha1(local.encode()).hexdigest()[:16]


def _all_reduce(values: list[float], device: Any, op: str = "sum") -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(tensor, op={"sum": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN, "max": tdist.ReduceOp.MAX}[op])
    return tensor.tolist()


def _finite_everywhere(loss: Any, device: Any) -> bool:
    """True when the loss is finite on every rank (all ranks must skip the same batch, or ZeRO would hang)."""
    local = 1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0
    return _all_reduce([local], device, op="min")[0] > 0


class _Batches:
    """Endless iteration over a loader: a finished pass starts the next epoch (the loader tracks which)."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.iterator: Optional[Iterator[dict]] = None

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict:
        for _ in range(2):
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
        raise RuntimeError("the training loader yields no batches: check data.train (every shard empty or filtered out?)")


# ---------------------------------------------------------------------------
# the loop


def train(
    cfg: Any,
    *,
    model_builder: Optional[Callable] = None,
    loader_builder: Optional[Callable] = None,
    stop_after: Optional[int] = None,
) -> dict:
    """Train one stage as ``cfg`` says; returns a summary (steps, losses, paths).

    ``model_builder(cfg, gather)`` and ``loader_builder(cfg, processors, split,
    rank, world_size)`` default to ``mmdist.models.build_model`` and
    ``mmdist.data.build_loader``; tests pass small ones. ``stop_after`` ends the
    run after that many optimizer steps of the configured schedule (with a
    checkpoint), as a job hitting its time limit would.

    SIGUSR1/SIGTERM during the run end it the same way after the current step on
    every rank (the summary says ``preempted``); no final evaluation or export.
    """
    # DeepSpeed 0.19 calls collectives torch 2.13 has renamed; one warning per call would flood the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    with contextlib.ExitStack() as teardown:  # undone in reverse order, also on an error
        # 1. setup: the process group, the run directory, the engine, the data
        env = dist.init(backend=cfg.engine.backend)
        teardown.callback(dist.shutdown)
        flag = preemption.install()  # from here on SIGUSR1/SIGTERM only set a flag
        teardown.callback(flag.uninstall)
        dog = Watchdog.from_config(cfg.watchdog, rank=env.rank, run_dir=cfg.run_dir).start()
        teardown.callback(dog.stop)
        cfg, precision = _resolve_precision(cfg)  # `auto` -> concrete dtypes, before anything is built
        cfg, fitted = fit_micro_batch(cfg, env.world_size)  # the global batch stays on any number of ranks
        if fitted and env.rank == 0:
            print(fitted, flush=True)
        _write_run_dir(cfg, env.rank, precision)
        with dog.phase("building the engine"):
            bundle = build_engine(cfg, world_size=env.world_size, model_builder=model_builder)
        teardown.callback(bundle.close)  # before dist.shutdown: DeepSpeed's groups, the shm buffer
        run = _setup(cfg, env, bundle, loader_builder or default_loader_builder)
        run.precision = precision
        run.watchdog = dog

        # 2. resume, then the logs (they drop records a resumed run will write again)
        with dog.phase("resuming"):
            state = _resume(run)
        _open_logs(run, state)
        teardown.callback(run.logger.close)  # the bar and the metrics file are closed on an error too

        # 3. the loop
        end_step = run.total_steps if stop_after is None else min(run.total_steps, stop_after)
        batches = _Batches(run.loader)
        started = time.perf_counter()
        bundle.engine.train()
        first_step = state.step + 1
        while state.step < end_step:
            try:
                with dog.phase("the first step") if state.step + 1 == first_step else contextlib.nullcontext():
                    record = train_step(bundle.engine, batches, state, max_nonfinite_steps=cfg.train.max_nonfinite_steps,
                                        fingerprint=cfg.log.data_fingerprint, on_skip=run.log_skip)
            except NonFiniteLossError as exc:
                exc.add_note(f"the last checkpoint is in {run.checkpoints.root}")
                raise
            dog.beat(state.step)
            _log_step(run, state, record, end_step)
            # every rank, every step, unconditionally: the answer is a collective
            if preemption.stop_agreed(flag, bundle.engine.device):
                _stop_on_signal(run, state, flag)
                break
            if _due(cfg.train.eval_every, state.step) and state.step < run.total_steps:
                _evaluate_and_log(run, state.step)
            if _due(cfg.checkpoint.save_every, state.step):
                _save(run, state)

        # 4. the end: a final checkpoint, the last evaluation, the export, the summary
        return _finish(run, state, time.perf_counter() - started)


@dataclass
class _Run:
    """What setup builds and every later phase of :func:`train` uses."""

    cfg: Any
    rank: int
    world_size: int
    bundle: EngineBundle
    loader: Iterable
    loader_builder: Callable
    checkpoints: CheckpointManager
    logger: Optional[MetricsLogger] = None
    throughput: Optional[Throughput] = None
    eval_loader: Optional[Iterable] = None  # built at the first evaluation
    metrics_loader: Optional[Iterable] = None  # train.eval_metrics: unpacked held-out batches, built at the first evaluation
    resumed_from: Optional[Path] = None
    last_checkpoint: Optional[Path] = None
    watchdog: Optional[Watchdog] = None
    preempted: bool = False
    logger_note: Optional[str] = None  # said once the logger exists (resume happens before it)
    last_eval: Optional[dict] = None
    history: list[dict] = field(default_factory=list)
    precision: list = field(default_factory=list)  # [(key, hardware.Resolved)] from resolve_precision

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def total_steps(self) -> int:
        return self.bundle.total_steps

    def log_skip(self, state: TrainState, loss: float) -> None:
        """A non-finite micro-batch was dropped (train_step's ``on_skip``)."""
        self.logger.print(f"[mmdist] step {state.step + 1}: non-finite loss ({loss}) on some rank; batch skipped ({state.nonfinite_in_row} in a row)")
        self.logger.log(state.step, {"nonfinite_loss": 1, "nonfinite_in_row": state.nonfinite_in_row, "nonfinite_total": state.nonfinite_total})


def _resolve_precision(cfg: Any) -> tuple[Any, list]:
    """``cfg`` with concrete dtypes for this node's device (mmdist.precision); rank 0's answer on every rank.

    Ranks must agree: where the CPU's flags cannot be read a matmul probe decides, and two probes may not.
    """
    device = default_device()
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        box: list[Any] = [None]
        if tdist.get_rank() == 0:
            try:
                box = [resolve_precision(cfg, device)]
            except ConfigError as exc:
                box = [exc]
        tdist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]
    return resolve_precision(cfg, device)


def _write_run_dir(cfg: Any, rank: int, precision: Sequence = ()) -> None:
    """The resolved config (concrete dtypes) as config.yaml, with why each precision was chosen as comments."""
    if rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        path = dump_config(cfg, Path(cfg.run_dir) / "config.yaml")
        if precision:
            notes = "".join(f"# {line}\n" for line in precision_lines(list(precision)))
            write_text_atomic(path, f"# precision resolved at start-up:\n{notes}" + path.read_text())


def _setup(cfg: Any, env: Any, bundle: EngineBundle, loader_builder: Callable) -> _Run:
    """The training loader, the checkpoint folder (stale temporaries removed), this rank's seeds."""
    loader = loader_builder(cfg, getattr(bundle.model, "processors", None), "train", env.rank, env.world_size)
    checkpoints = CheckpointManager(Path(cfg.run_dir) / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    checkpoints.clean_stale()
    seed = cfg.train.seed + env.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return _Run(cfg, env.rank, env.world_size, bundle, loader, loader_builder, checkpoints)


def _resume(run: _Run) -> TrainState:
    """The state of ``checkpoint.resume`` (engine, loop counters, data position, RNG), or a fresh one."""
    state = TrainState()
    run.resumed_from = _agreed_resume(run.checkpoints.resolve_resume(run.cfg.checkpoint.resume))
    if run.resumed_from is not None:
        client = run.checkpoints.load(run.bundle.engine, run.resumed_from)
        state.load_state_dict(client)
        elastic = client.get("saved_world_size") is not None  # written by another number of ranks
        if client.get("loader") is not None and hasattr(run.loader, "load_state_dict"):
            try:
                if elastic and hasattr(run.loader, "load_elastic_state"):  # the WebDataset loader merges every saved rank's
                    run.loader.load_elastic_state([c.get("loader") for c in client["client_states"]])
                else:
                    run.loader.load_state_dict(client["loader"])
            except ValueError as exc:
                if not elastic:
                    raise
                raise CheckpointError(
                    f"{run.resumed_from}: the trainable state moves from {client['saved_world_size']} to {run.world_size} "
                    f"rank(s), but the data position does not: {exc}"
                ) from exc
        if not elastic:  # another world size keeps the fresh per-rank seeds: RNG streams are per rank
            restore_rng(client["rng"])
            if client.get("optimizer_groups_changed"):
                run.logger_note = ("[mmdist] the checkpoint's optimizer groups differ from this run's (names: "
                                   f"{client.get('optimizer_groups') or 'from before they were recorded'}): weights and "
                                   "Adam moments loaded by parameter name from its consolidated copy")
        else:
            run.logger_note = (f"[mmdist] resumed on {run.world_size} rank(s) from a checkpoint of "
                               f"{client['saved_world_size']}: trainable state from its consolidated copy"
                               + ("; data: the rest of the epoch, merged from every saved rank's record"
                                  if hasattr(run.loader, "load_elastic_state") else ""))
    return state


def _agreed_resume(mine: Optional[Path]) -> Optional[Path]:
    """The checkpoint to resume, the same on every rank, or a CheckpointError on every rank (collective).

    Each rank reads ``latest`` from its own view of the run folder; a node whose
    view differs (the folder on node-local storage, not shared) would start fresh
    or load another checkpoint while the others resume, and the job would hang or diverge.
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return mine
    import socket

    views: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(views, (str(mine) if mine is not None else None, socket.gethostname()))
    if len({path for path, _ in views}) > 1:
        seen = "; ".join(f"rank {r} on {host}: {path or 'no checkpoint'}" for r, (path, host) in enumerate(views))
        raise CheckpointError(
            f"the ranks disagree on the checkpoint to resume ({seen}): the run folder is not shared by every node "
            "(node-local storage?). Put run_dir on a filesystem that every node mounts at the same path"
        )
    return mine


def _open_logs(run: _Run, state: TrainState) -> None:
    """The metrics logger and throughput meter from the resumed step; the run's description in the log."""
    cfg, bundle = run.cfg, run.bundle
    run.logger = logger = MetricsLogger(run.run_dir, cfg.log, enabled=run.rank == 0, total_steps=run.total_steps,
                                        initial_step=state.step, run_name=cfg.name)
    if run.resumed_from is not None:
        logger.print(f"[mmdist] resumed from {run.resumed_from} at step {state.step} ({state.samples} samples seen)")
        if run.logger_note:
            logger.print(run.logger_note)
    if cfg.log.param_table:
        logger.print(param_table(bundle.model))
    for line in precision_lines(run.precision):
        logger.print(f"[mmdist] precision {line}")
    logger.print(
        f"[mmdist] stage={cfg.stage} world={run.world_size} steps={run.total_steps} global_batch={cfg.train.global_batch_size} "
        f"micro={cfg.train.micro_batch_size} accumulation={bundle.ds_config['gradient_accumulation_steps']} "
        f"zero={cfg.engine.zero_stage} precision={cfg.engine.precision}"
    )
    for name, numel, lr in bundle.info["optimizer_groups"]:
        logger.print(f"[mmdist] optimizer group {name}: {numel:,} parameters, lr {lr:.3g}")
    if cfg.log.peak_flops:
        peak, source = float(cfg.log.peak_flops), "log.peak_flops"
    elif run.rank == 0:  # only rank 0 reports MFU
        peak, source = peak_flops(bundle.engine.device, compute_dtype(cfg))
    else:
        peak, source = 0.0, ""
    if peak:
        logger.print(f"[mmdist] MFU against {peak / 1e12:.3g} TFLOP/s per device x {run.world_size} ({source})")
    flops = flop_count(bundle.model, cfg.stage, vision_runs=not cfg.data.feature_cache)
    run.throughput = Throughput(flops, peak * run.world_size, run.total_steps, start_step=state.step)


def _log_step(run: _Run, state: TrainState, record: dict, end_step: int) -> None:
    """The step's record (train_step's metrics, lr, counters, throughput) to the bar, the history and the log."""
    cfg, scheduler = run.cfg, run.bundle.scheduler
    lr = scheduler.get_last_lr()[0] if scheduler is not None else cfg.train.lr
    record.update(lr=lr, samples=state.samples, nonfinite_total=state.nonfinite_total)
    record.update(run.throughput.update(state.step, record.pop("step_samples"), record.pop("step_tokens"),
                                        record.pop("step_supervised_tokens", 0), record.pop("step_image_tokens", 0)))
    run.history.append({"step": state.step, "loss": record["loss"], "lr": lr, **({"data": record["data"]} if "data" in record else {})})
    run.logger.progress(state.step, record)
    if state.step % max(cfg.log.log_every, 1) == 0 or state.step == end_step or cfg.log.data_fingerprint:
        run.logger.log(state.step, record)


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def _evaluate(run: _Run) -> Optional[dict]:
    """Mean loss over the first ``train.eval_batches`` held-out batches of every rank; None without ``data.eval``."""
    if not run.cfg.data.eval:
        return None
    if run.eval_loader is None:
        run.eval_loader = run.loader_builder(run.cfg, getattr(run.bundle.model, "processors", None), "eval", run.rank, run.world_size)
    engine = run.bundle.engine
    float_dtype = _float_dtype(engine)
    engine.eval()
    total, count, batches = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in run.eval_loader:
            if batches >= run.cfg.train.eval_batches:
                break
            loss = engine(_to_device(batch, engine.device, float_dtype))["loss"].float()
            if torch.isfinite(loss):
                total, count = total + float(loss), count + 1
            batches += 1
    engine.train()
    total, count = _all_reduce([total, count], engine.device)
    result = {"loss": total / count if count else float("nan"), "batches": batches}
    if run.cfg.train.eval_metrics:
        result.update(_evaluate_metrics(run))
    return result


def _evaluate_metrics(run: _Run) -> dict:
    """Retrieval R@k (align) or answer accuracy (fuse) on data.eval, on every rank (mmdist/evaluation.py); the answers go to eval/."""
    from mmdist import evaluation

    cfg, engine = run.cfg, run.bundle.engine
    model = getattr(engine, "module", engine)
    if run.metrics_loader is None:
        metrics_cfg = evaluation.eval_config(cfg)
        run.metrics_loader = run.loader_builder(metrics_cfg, getattr(model, "processors", None), "eval", run.rank, run.world_size)
    step = run.history[-1]["step"] if run.history else 0
    float_dtype = _float_dtype(engine)
    engine.eval()
    try:
        metrics = evaluation.evaluate_model(
            model, cfg, run.metrics_loader, max_samples=cfg.train.eval_max_samples,
            prepare=lambda batch: _to_device(batch, engine.device, float_dtype), synced_gpus=cfg.engine.zero_stage == 3,
            jsonl_path=run.run_dir / "eval" / f"answers_step{step:06d}.jsonl")
    finally:
        engine.train()
    metrics.pop("records", None)
    run.logger.print(f"[mmdist] step {step}: eval {evaluation.summary_line(cfg.stage, metrics)}")
    return metrics


def _phase(run: _Run, name: str) -> Any:
    """The watchdog's longer limit around a long phase (nothing when the run has no watchdog)."""
    return run.watchdog.phase(name) if run.watchdog is not None else contextlib.nullcontext()


def _evaluate_and_log(run: _Run, step: int) -> None:
    with _phase(run, "evaluation"):
        run.last_eval = _evaluate(run)
    if run.last_eval is not None:
        run.logger.log(step, run.last_eval, prefix="eval")
        run.logger.print(f"[mmdist] step {step}: eval loss {run.last_eval['loss']:.4f}")


def _save(run: _Run, state: TrainState) -> None:
    """A checkpoint of this step: the engine, the loop state, this rank's RNG and data position (collective)."""
    client = dict(
        state.state_dict(),
        world_size=run.world_size,
        rng=capture_rng(),
        loader=run.loader.state_dict() if hasattr(run.loader, "state_dict") else None,
    )
    with _phase(run, "saving a checkpoint"):
        run.last_checkpoint = run.checkpoints.save(run.bundle.engine, state.step, client)
    run.logger.print(f"[mmdist] checkpoint {run.last_checkpoint}")


def _stop_on_signal(run: _Run, state: TrainState, flag: preemption.PreemptionFlag) -> None:
    """Some rank got SIGUSR1/SIGTERM and every rank agreed: checkpoint this step, leave the marker for Slurm."""
    if run.last_checkpoint is None or run.last_checkpoint.name != CheckpointManager.tag(state.step):
        _save(run, state)
    preemption.record_stop(run.run_dir, step=state.step, checkpoint=run.last_checkpoint,
                           signal_name=flag.signal_name or "on another rank", rank=run.rank)
    run.preempted = True
    run.logger.print(f"[mmdist] stopped on a signal after step {state.step} with checkpoint {run.last_checkpoint}; "
                     f"exit code {preemption.PREEMPTED_EXIT}: start the same command again to resume")


def _finish(run: _Run, state: TrainState, seconds: float) -> dict:
    """A final checkpoint unless this step has one; once the budget is spent, the last evaluation and the export."""
    cfg = run.cfg
    finished = state.step >= run.total_steps and not run.preempted
    resumed = run.resumed_from
    resumed_step = int(resumed.name.split("_")[-1]) if resumed is not None and resumed.name.startswith("step_") else None
    if state.step > 0 and state.step != resumed_step and (run.last_checkpoint is None or not run.last_checkpoint.name.endswith(f"{state.step:06d}")):
        _save(run, state)
    elif run.last_checkpoint is None and resumed is not None:
        run.last_checkpoint = resumed  # nothing new since the resume: the loaded checkpoint is the last one
    if finished:
        with _phase(run, "evaluation"):
            run.last_eval = _evaluate(run) or run.last_eval
        if run.last_eval is not None:
            run.logger.log(state.step, run.last_eval, prefix="eval")
        if cfg.checkpoint.export:
            with _phase(run, "export"):
                export_dir = export_trainable(run.bundle.model, run.bundle.read_gather, run.run_dir / "export",
                                              fp32_master=cfg.engine.precision != "fp32")
            if export_dir is not None:
                run.logger.print(f"[mmdist] exported trainable weights to {export_dir}")
    return {
        "step": state.step,
        "finished": finished,
        "preempted": run.preempted,
        "samples": state.samples,
        "tokens": state.tokens,
        "nonfinite_total": state.nonfinite_total,
        "history": run.history,
        "eval": run.last_eval,
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
        "export": str(run.run_dir / "export") if finished and cfg.checkpoint.export else None,
        "run_dir": str(run.run_dir),
        "rank": run.rank,
        "resumed_from": str(resumed) if resumed else None,
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------
# mmdist train


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``mmdist train --config FILE [key.path=value ...]`` (a trailing ``--local_rank=N`` is accepted)."""
    from mmdist.config import ConfigError, load_config
    from mmdist.training.launch_env import strip_local_rank

    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="mmdist train", description="Train one stage (align or fuse) from a config.")
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/fuse.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 engine.zero_stage=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    summary = train(cfg)
    if summary.get("preempted"):
        return preemption.PREEMPTED_EXIT  # checkpointed: slurm/_launch.sh requeues, a rerun resumes
    if summary.get("rank", 0) == 0:  # not os.environ: dist.shutdown() has restored it by now
        loss = summary["history"][-1]["loss"] if summary["history"] else math.nan
        print(f"[mmdist] done: step {summary['step']}, last loss {loss:.4f}, run dir {summary['run_dir']}")
    return 0
