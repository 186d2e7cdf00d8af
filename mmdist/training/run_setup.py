"""Everything before the first step: the run folder with its config, the run's parts, and the resume.

Split from the loop (``mmdist.training.loop``) so that reads as the job does; the
pieces here set up what a run *is* (the config of the resolve step,
mmdist.training.resolve, written into ``config.yaml`` with the worker count; which
checkpoint every rank resumes from) rather than what it does each step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import shutil
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mmdist import distributed as dist
from mmdist.atomic import write_text_atomic
from mmdist.config.run import RunConfig, dump_config
from mmdist.launch_env import DistEnv
from mmdist.precision import precision_lines
from mmdist.settings import ConfigError, Problem
from mmdist.training.checkpoint import CheckpointError, CheckpointManager, restore_rng
from mmdist.training.engine import EngineBundle
from mmdist.training.metrics import BalanceSummary, MetricsLogger, Throughput
from mmdist.training.step import TrainState
from mmdist.training.watchdog import Watchdog

__all__ = ["Run", "check_run_dir", "compute_dtype", "default_loader_builder", "resume", "setup", "write_run_dir"]

PROBE_BYTES = 1 << 20  # what each rank writes (and removes) to show the run folder takes data
# A checkpoint holds each trainable parameter's weight (<= 4 bytes), DeepSpeed's fp32 master and two Adam moments
# (12) and the consolidated copy of those three (12, mmdist.training.trainable_state): Adam's state, not a fit.
CHECKPOINT_BYTES_PER_TRAINABLE = 4 + 12 + 12


def default_loader_builder(cfg: RunConfig, processors: Any, split: str, rank: int, world_size: int) -> Iterable:
    from mmdist.data.loader import build_loader

    return build_loader(cfg, processors, split, rank, world_size)


def compute_dtype(cfg: RunConfig) -> str:
    """The dtype most of a step's FLOPs run in (the peak MFU is measured against).

    A bf16/fp16 engine casts everything; an fp32 engine leaves the frozen backbones in
    their own dtype, and they carry almost all the FLOPs (the LLM in stage 2, the
    vision encoder in stage 1).
    """
    if cfg.engine.precision != "fp32":
        return cfg.engine.precision
    return getattr(cfg.model, cfg.stage.heavy_part).dtype


@dataclass
class Run:
    """What setup builds and every later phase of :func:`mmdist.training.loop.train` uses."""

    cfg: RunConfig
    rank: int
    world_size: int
    bundle: EngineBundle
    loader: Iterable
    loader_builder: Callable
    checkpoints: CheckpointManager
    logger: Optional[MetricsLogger] = None
    throughput: Optional[Throughput] = None
    eval_loader: Optional[Iterable] = None  # built at the first evaluation
    # train.eval_metrics: unpacked held-out batches, built at the first evaluation
    metrics_loader: Optional[Iterable] = None
    resumed_from: Optional[Path] = None
    last_checkpoint: Optional[Path] = None
    watchdog: Optional[Watchdog] = None
    preempted: bool = False
    logger_note: Optional[str] = None  # said once the logger exists (resume happens before it)
    last_eval: Optional[dict] = None
    history: list[dict] = field(default_factory=list)
    precision: list = field(default_factory=list)  # [(key, hardware.Resolved)] from resolve_precision
    balance: BalanceSummary = field(default_factory=lambda: BalanceSummary())

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def total_steps(self) -> int:
        return self.bundle.total_steps

    def close_loaders(self) -> None:
        """Stop the data workers of every loader the run built, at its end and on an error (see the loaders'
        ``close()``: left to garbage collection, torch waits 5 s on every worker); loaders without one are left."""
        for loader in (self.loader, self.eval_loader, self.metrics_loader):
            if hasattr(loader, "close"):
                loader.close()

    def log_skip(self, state: TrainState, loss: float) -> None:
        """A non-finite micro-batch was dropped (train_step's ``on_skip``)."""
        self.logger.print(
            f"[mmdist] step {state.step + 1}: non-finite loss ({loss}) "
            f"on some rank; batch skipped ({state.nonfinite_in_row} in a row)"
        )
        self.logger.log(
            state.step,
            {"nonfinite_loss": 1, "nonfinite_in_row": state.nonfinite_in_row, "nonfinite_total": state.nonfinite_total},
        )


def write_run_dir(cfg: RunConfig, rank: int, precision: Sequence = (), notes: Sequence[str] = ()) -> None:
    """The resolved config as config.yaml: concrete dtypes and ZeRO stage (why each was chosen, as comments) and
    data workers; ``notes`` are further start-up decisions (the ``auto`` ZeRO stage's reason).

    ``data.num_workers: null`` (auto) is written as the count this rank's CPUs give
    (mmdist.data.loader.resolve_num_workers). Only the file holds it: the run's
    loader still sees auto, so a resume follows the count its checkpoint was written with.
    """
    if rank != 0:
        return
    from mmdist.data.loader import resolve_num_workers

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    notes = [*(["precision resolved at start-up:", *precision_lines(list(precision))] if precision else []), *notes]
    written = cfg
    if cfg.data.num_workers is None:
        workers = resolve_num_workers(None)
        written = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
        notes.append(f"data.num_workers = {workers} (auto): the CPUs of rank 0 less one for training, at most 8")
    path = dump_config(written, Path(cfg.run_dir) / "config.yaml")
    if notes:
        write_text_atomic(path, "".join(f"# {line}\n" for line in notes) + path.read_text())


def check_run_dir(cfg: RunConfig, rank: int, sized_by_config: bool = True) -> None:
    """Refuse, before any work, a run folder that some rank cannot write or whose disk cannot hold a checkpoint.

    Every rank writes (and removes) a small file in ``run_dir/checkpoints`` (each rank
    saves its part of a checkpoint there), then all agree (collective): a read-only
    folder or a full disk raises the same :class:`ConfigError` (key ``run_dir``) everywhere.
    ``sized_by_config``: the config's model section describes the model that trains, so a checkpoint's size is
    estimated from it; False (a model from a caller's builder) runs the write probe only.
    """
    folder = Path(cfg.run_dir) / "checkpoints"
    problem = _storage_problem(folder, rank, _checkpoint_bytes(cfg) if sized_by_config else None)
    found = [problem] if dist.world_size() == 1 else [f"rank {r}: {p}" for r, p in
                                                       enumerate(dist.all_gather_object(problem)) if p]
    if any(found):
        raise ConfigError([Problem("run_dir", "; ".join(p for p in found if p))])


def _checkpoint_bytes(cfg: RunConfig) -> Optional[int]:
    """About how large one checkpoint of this model is (from the planner's parameter counts); None if unknown."""
    try:
        from mmdist.plan import model_shapes

        trainable = sum(m.params for m in model_shapes(cfg) if m.trainable)
    except Exception:  # a model the planner cannot size: the write probe still runs
        return None
    return trainable * CHECKPOINT_BYTES_PER_TRAINABLE


def _storage_problem(folder: Path, rank: int, need: Optional[int]) -> Optional[str]:
    """Why ``folder`` cannot take this rank's checkpoint files, or None."""
    probe = folder / f".write-probe-rank{rank:05d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(bytes(PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        why = errno.errorcode.get(exc.errno or 0, "?")
        return (f"{folder} cannot be written ([Errno {exc.errno} {why}] {exc.strerror or exc}): make it writable, "
                "free space, or set run_dir to a folder on another file system; nothing was started")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(folder).free
    if need is not None and free < need:
        return (f"{free / 2**20:,.1f} MiB free on the file system of {folder}, and one checkpoint of this model needs "
                f"about {need / 2**20:,.1f} MiB (trainable parameters x {CHECKPOINT_BYTES_PER_TRAINABLE} bytes): free "
                "space or set run_dir elsewhere; nothing was started")
    return None


def setup(cfg: RunConfig, env: DistEnv, bundle: EngineBundle, loader_builder: Callable) -> Run:
    """The training loader, the checkpoint folder (stale temporaries removed), this rank's seeds."""
    loader = loader_builder(cfg, bundle.model.processors, "train", env.rank, env.world_size)
    checkpoints = CheckpointManager(Path(cfg.run_dir) / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    checkpoints.clean_stale()
    seed = cfg.train.seed + env.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return Run(cfg, env.rank, env.world_size, bundle, loader, loader_builder, checkpoints)


def resume(run: Run) -> TrainState:
    """The state of ``checkpoint.resume`` (engine, loop counters, data position, RNG), or a fresh one."""
    state = TrainState()
    run.resumed_from = _agreed_resume(run.checkpoints.resolve_resume(run.cfg.checkpoint.resume))
    if run.resumed_from is None:
        return state
    damaged = "\n".join(run.checkpoints.resume_notes)  # damaged checkpoints passed over: said first
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
    if damaged:
        run.logger_note = damaged + (f"\n{run.logger_note}" if run.logger_note else "")
    return state


def _agreed_resume(mine: Optional[Path]) -> Optional[Path]:
    """The checkpoint to resume, the same on every rank, or a CheckpointError on every rank (collective).

    Each rank reads ``latest`` from its own view of the run folder; a node whose
    view differs (the folder on node-local storage, not shared) would start fresh
    or load another checkpoint while the others resume, and the job would hang or diverge.
    """
    if dist.world_size() == 1:
        return mine
    views = dist.all_gather_object((str(mine) if mine is not None else None, socket.gethostname()))
    if len({path for path, _ in views}) > 1:
        seen = "; ".join(f"rank {r} on {host}: {path or 'no checkpoint'}" for r, (path, host) in enumerate(views))
        raise CheckpointError(
            f"the ranks disagree on the checkpoint to resume ({seen}): the run folder is not shared by every node "
            "(node-local storage?). Put run_dir on a filesystem that every node mounts at the same path"
        )
    return mine
