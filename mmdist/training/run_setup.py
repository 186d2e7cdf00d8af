"""Everything before the first step: the resolved config and run folder, the run's parts, and the resume.

Split from the loop (``mmdist.training.loop``) so that reads as the job does; the
pieces here decide what a run *is* (concrete dtypes and worker counts written into
``config.yaml``, which checkpoint every rank resumes from) rather than what it does
each step.
"""

from __future__ import annotations

import dataclasses
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mmdist.atomic import write_text_atomic
from mmdist.config import ConfigError, RunConfig, dump_config
from mmdist.hardware import default_device
from mmdist.precision import precision_lines, resolve_precision
from mmdist.training import dist
from mmdist.training.checkpoint import CheckpointError, CheckpointManager, restore_rng
from mmdist.training.engine import EngineBundle
from mmdist.training.launch_env import DistEnv
from mmdist.training.metrics import BalanceSummary, MetricsLogger, Throughput
from mmdist.training.step import TrainState
from mmdist.training.watchdog import Watchdog

__all__ = ["Run", "compute_dtype", "default_loader_builder", "resolve_precision_agreed", "resolve_zero_stage_agreed", "resume",
           "setup", "write_run_dir"]


def default_loader_builder(cfg: RunConfig, processors: Any, split: str, rank: int, world_size: int) -> Iterable:
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
    metrics_loader: Optional[Iterable] = None  # train.eval_metrics: unpacked held-out batches, built at the first evaluation
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

    def log_skip(self, state: TrainState, loss: float) -> None:
        """A non-finite micro-batch was dropped (train_step's ``on_skip``)."""
        self.logger.print(f"[mmdist] step {state.step + 1}: non-finite loss ({loss}) on some rank; batch skipped ({state.nonfinite_in_row} in a row)")
        self.logger.log(state.step, {"nonfinite_loss": 1, "nonfinite_in_row": state.nonfinite_in_row, "nonfinite_total": state.nonfinite_total})


def resolve_precision_agreed(cfg: RunConfig) -> tuple[RunConfig, list]:
    """``cfg`` with concrete dtypes for this node's device (mmdist.precision); rank 0's answer on every rank.

    Ranks must agree: where the CPU's flags cannot be read a matmul probe decides, and two probes may not.
    """
    device = default_device()
    if dist.world_size() == 1:
        return resolve_precision(cfg, device)
    answer: Any = None
    if dist.rank() == 0:
        try:
            answer = resolve_precision(cfg, device)
        except ConfigError as exc:
            answer = exc
    answer = dist.broadcast_object(answer, src=0)
    if isinstance(answer, Exception):
        raise answer
    return answer


def resolve_zero_stage_agreed(cfg: RunConfig, world_size: int) -> tuple[RunConfig, Optional[str]]:
    """``cfg`` with ``engine.zero_stage: auto`` made concrete (mmdist.plan.auto), and the reason; rank 0's answer
    on every rank (ranks must run the same stage). Unchanged, with None, when the stage is not ``auto``."""
    if cfg.engine.zero_stage != "auto":
        return cfg, None
    from mmdist.plan.auto import resolve_zero_stage

    device = default_device()
    if dist.world_size() == 1:
        return resolve_zero_stage(cfg, world_size, device)
    answer: Any = None
    if dist.rank() == 0:
        try:
            answer = resolve_zero_stage(cfg, world_size, device)
        except (ConfigError, ValueError) as exc:
            answer = exc
    answer = dist.broadcast_object(answer, src=0)
    if isinstance(answer, Exception):
        raise answer
    stage, line = answer[0].engine.zero_stage, answer[1]
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, zero_stage=stage)), line


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
