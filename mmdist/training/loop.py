"""The one training loop, for both stages: a stage changes the config, never the loop.

:func:`train` reads like the job (torchtitan's shape): join the process group, write
the resolved config, build the engine and the loaders, resume, step until the budget
is spent (logging, evaluating, checkpointing), then the last checkpoint, the export
and a clean teardown. Preemption signals only set a flag that all ranks agree on
after each step (docs/operations.md); a watchdog is beaten after every step.
Running out of device memory (building the engine, in a step, an evaluation or the export) ends
the run with :class:`~mmdist.training.oom.OutOfMemoryStop`: where it ran out, the sizes, the
settings to change (``mmdist train`` exits with :data:`~mmdist.training.oom.OOM_EXIT`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from mmdist import distributed as dist
from mmdist.config.run import RunConfig
from mmdist.data.collate import to_device
from mmdist.export import export_trainable
from mmdist.hardware import matmul_probe, peak_flops
from mmdist.models.freeze import param_table
from mmdist.precision import precision_lines
from mmdist.training import cpu_memory, preemption
from mmdist.training.checkpoint import CheckpointManager, CheckpointStorageError, capture_rng
from mmdist.training.engine import build_engine
from mmdist.training.metrics import WARMUP_STEPS, FlopCount, MetricsLogger, Throughput
from mmdist.training.oom import OutOfMemoryStop, evaluation_guard, export_guard, oom_advice
from mmdist.training.resolve import resolve_run
from mmdist.training.run_setup import (
    Run,
    check_run_dir,
    compute_dtype,
    default_loader_builder,
    resume,
    setup,
    write_run_dir,
)
from mmdist.training.step import (
    Batches,
    NonFiniteLossError,
    StepOutOfMemoryError,
    TrainState,
    float_dtype,
    phases,
    train_step,
)
from mmdist.training.watchdog import Watchdog

__all__ = ["train"]


def train(
    cfg: RunConfig,
    *,
    model_builder: Optional[Callable] = None,
    loader_builder: Optional[Callable] = None,
    stop_after: Optional[int] = None,
) -> dict:
    """Train one stage as ``cfg`` says; returns a summary (steps, losses, paths).

    ``model_builder(cfg, gather)`` and ``loader_builder(cfg, processors, split,
    rank, world_size)`` default to ``mmdist.materialize.build_run_model`` and
    ``mmdist.data.loader.build_loader``; tests pass small ones. ``stop_after`` ends the
    run after that many optimizer steps of the configured schedule (with a
    checkpoint), as a job hitting its time limit would.

    SIGUSR1/SIGTERM during the run end it the same way after the current step on
    every rank (the summary says ``preempted``); no final evaluation or export.
    """
    # DeepSpeed 0.19 calls collectives torch 2.13 has renamed; one warning per call would flood the log.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    )
    with contextlib.ExitStack() as teardown:  # undone in reverse order, also on an error
        # 1. setup: the process group, the run directory, the engine, the data
        env = dist.init(backend=cfg.engine.backend)
        teardown.callback(dist.shutdown)
        # a read-only folder or a full disk is refused before any work; a caller's model builder builds a model the
        # config's model section does not describe, so its checkpoint is not sized from it
        check_run_dir(cfg, env.rank, sized_by_config=model_builder is None)
        flag = preemption.install()  # from here on SIGUSR1/SIGTERM only set a flag
        teardown.callback(flag.uninstall)
        dog = Watchdog.from_config(cfg.watchdog, rank=env.rank, run_dir=cfg.run_dir).start()
        teardown.callback(dog.stop)
        resolved = resolve_run(cfg, env.world_size)  # the config the run is, decided once before anything is built
        cfg = resolved.config
        if resolved.zero_stage_note and env.rank == 0:
            print(f"[mmdist] {resolved.zero_stage_note}", flush=True)
        if resolved.micro_batch_note and env.rank == 0:
            print(resolved.micro_batch_note, flush=True)  # a whole line: "[mmdist] train.micro_batch_size: ..."
        notes = [resolved.zero_stage_note] if resolved.zero_stage_note else []
        write_run_dir(cfg, env.rank, resolved.precision, notes)
        with dog.phase("building the engine"):
            bundle = build_engine(cfg, world_size=env.world_size, model_builder=model_builder)
        teardown.callback(bundle.close)  # before dist.shutdown: DeepSpeed's groups, the shm buffer
        run = setup(cfg, env, bundle, loader_builder or default_loader_builder)
        teardown.callback(run.close_loaders)  # the data workers stop at the end, not at a later garbage collection
        run.precision = resolved.precision
        run.watchdog = dog

        # 2. resume, then the logs (they drop records a resumed run will write again)
        with dog.phase("resuming"):
            state = resume(run)
        _open_logs(run, state)
        teardown.callback(run.logger.close)  # the bar and the metrics file are closed on an error too

        # 3. the loop
        end_step = run.total_steps if stop_after is None else min(run.total_steps, stop_after)
        batches = Batches(run.loader)
        started = time.perf_counter()
        bundle.engine.train()
        first_step = state.step + 1
        while state.step < end_step:
            try:
                with dog.phase("the first step") if state.step + 1 == first_step else contextlib.nullcontext():
                    record = train_step(
                        bundle.engine,
                        batches,
                        state,
                        max_nonfinite_steps=cfg.train.max_nonfinite_steps,
                        fingerprint=cfg.log.data_fingerprint,
                        on_skip=run.log_skip,
                    )
            except NonFiniteLossError as exc:
                exc.add_note(f"the last checkpoint is in {run.checkpoints.root}")
                raise
            except StepOutOfMemoryError as exc:
                message = oom_advice(
                    cfg,
                    exc,
                    world_size=env.world_size,
                    last_checkpoint=run.last_checkpoint or run.resumed_from,
                    checkpoint_root=run.checkpoints.root,
                )
                raise OutOfMemoryStop(message) from exc  # mmdist train prints it and exits with OOM_EXIT
            dog.beat(state.step)
            logged = time.perf_counter()
            _log_step(run, state, record, end_step)
            phases.add("logging", time.perf_counter() - logged)  # reported with the next step's phases
            # every rank, every step, unconditionally: the answer is a collective
            if preemption.stop_agreed(flag, bundle.engine.device):
                _stop_on_signal(run, state, flag)
                break
            if _due(cfg.train.eval_every, state.step) and state.step < run.total_steps:
                _evaluate_and_log(run, state.step)
            if _due(cfg.checkpoint.save_every, state.step):
                _save(run, state, may_fail=True)  # a full disk: a warning, and the next save tries again

        # 4. the end: a final checkpoint, the last evaluation, the export, the summary
        return _finish(run, state, time.perf_counter() - started)


def _open_logs(run: Run, state: TrainState) -> None:
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
        f"[mmdist] stage={cfg.stage} world={run.world_size} "
        f"steps={run.total_steps} global_batch={cfg.train.global_batch_size} "
        f"micro={cfg.train.micro_batch_size} accumulation={bundle.ds_config['gradient_accumulation_steps']} "
        f"zero={cfg.engine.zero_stage} precision={cfg.engine.precision}"
    )
    if cpu_memory.process_setting():  # set by the process's entry point, never by the trainer (see the module doc)
        logger.print(f"[mmdist] CPU memory: {cpu_memory.process_setting()} (engine.cpu_keep_freed_memory)")
    for name, numel, lr in bundle.info["optimizer_groups"]:
        logger.print(f"[mmdist] optimizer group {name}: {numel:,} parameters, lr {lr:.3g}")
    flops = bundle.model.flop_count(vision_runs=not cfg.data.feature_cache, text_runs=not _cache_holds_text(cfg))
    peaks, remeasure = _peaks(run, flops)
    run.throughput = Throughput(flops, peaks, run.total_steps, start_step=state.step, warmup_steps=WARMUP_STEPS,
                                remeasure=remeasure)


def _peaks(run: Run, flops: FlopCount) -> tuple[dict[str, float] | float, Optional[Callable[[], dict[str, float]]]]:
    """Peak FLOP/s of all ranks together for each dtype the model's FLOPs compute in (said in the log), or 0 on the
    ranks that report no MFU. ``log.peak_flops`` is one peak for every dtype.

    With them, what measures the peaks again when a window of steps outruns them (see Throughput), or None: only a
    peak measured by a matmul probe (a CPU, a GPU without a datasheet figure) can have been measured low."""
    cfg, logger = run.cfg, run.logger
    if cfg.log.peak_flops:
        logger.print(f"[mmdist] MFU against {float(cfg.log.peak_flops) / 1e12:.3g} TFLOP/s per device x "
                     f"{run.world_size} (log.peak_flops, for every dtype)")
        return float(cfg.log.peak_flops) * run.world_size, None
    if run.rank != 0:  # only rank 0 reports MFU
        return 0.0, None
    device, peaks, probed = run.bundle.engine.device, {}, []
    for dtype in flops.dtypes() or [compute_dtype(cfg)]:
        peak, source = peak_flops(device, dtype or compute_dtype(cfg))
        peaks[dtype] = peak * run.world_size
        if source.startswith("measured"):
            probed.append(dtype)
        logger.print(f"[mmdist] MFU: {dtype or 'the'} FLOPs against {peak / 1e12:.3g} TFLOP/s per device x "
                     f"{run.world_size} ({source})")
    if not probed:
        return peaks, None

    held = dict(peaks)  # the peaks as the meter holds them: the higher of every measurement so far

    def remeasure() -> dict[str, float]:
        for dtype in probed:  # a longer probe than at start, so that a passing slow spell matters less
            try:
                fresh = matmul_probe(dtype or compute_dtype(cfg), device, budget_s=1.0) * run.world_size
            except Exception as exc:  # e.g. no memory left for the probe's matrices mid-run: MFU is not worth a run
                logger.print(f"[mmdist] MFU: measuring the {dtype or 'the'} peak again failed ({exc}); it stays "
                             f"{held[dtype] / run.world_size / 1e12:.3g} TFLOP/s per device")
                continue
            logger.print(f"[mmdist] MFU: steps ran above the {dtype or 'the'} peak of "
                         f"{held[dtype] / run.world_size / 1e12:.3g} TFLOP/s per device; measured again: "
                         f"{fresh / run.world_size / 1e12:.3g}; the higher is kept")
            held[dtype] = max(held[dtype], fresh)
        return dict(held)

    return peaks, remeasure


def _cache_holds_text(cfg: RunConfig) -> bool:
    """True when the run's feature cache stores pooled caption features (stage 1 then never runs the text encoder)."""
    if not cfg.data.feature_cache or not cfg.stage.builds("text"):
        return False
    from mmdist.data.cache import read_cache_key

    root = Path(cfg.data.feature_cache)
    try:  # the folder open_feature_cache reads for the train split
        return "text" in read_cache_key(root / "train" if (root / "train").is_dir() else root).get("parts", {})
    except Exception:  # a missing/unreadable key: the loader reports it; count the encoder (MFU reads low, not high)
        return False


def _log_step(run: Run, state: TrainState, record: dict, end_step: int) -> None:
    """The step's record (train_step's metrics, lr, counters, throughput) to the bar, the history and the log."""
    cfg, scheduler = run.cfg, run.bundle.scheduler
    # the first optimizer group's rate as the scheduler set it last (other groups scale it by train.lr_multipliers)
    lr = scheduler.optimizer.param_groups[0]["lr"] if scheduler is not None else cfg.train.lr
    record.update(lr=lr, samples=state.samples, nonfinite_total=state.nonfinite_total)
    if hasattr(run.loader, "step_report"):  # the global batch's split: per-rank cost max/mean (mmdist/data/balance.py)
        record.update(run.loader.step_report())
    run.balance.add(record)
    # the step's counts stay in the record: what a step held (a packed step's real tokens) is worth logging
    record.update(run.throughput.update(state.step, record["step_samples"], record["step_tokens"],
                                        record.get("step_supervised_tokens", 0), record.get("step_image_tokens", 0),
                                        record.get("step_images", 0)))
    run.history.append(
        {"step": state.step, "loss": record["loss"], "lr": lr, **({"data": record["data"]} if "data" in record else {})}
    )
    run.logger.progress(state.step, record)
    if state.step % max(cfg.log.log_every, 1) == 0 or state.step == end_step or cfg.log.data_fingerprint:
        run.logger.log(state.step, record)


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def _evaluate(run: Run) -> Optional[dict]:
    """Mean loss over the first ``train.eval_batches`` held-out batches of every rank; None without ``data.eval``."""
    if not run.cfg.data.eval:
        return None
    if run.eval_loader is None:
        run.eval_loader = run.loader_builder(run.cfg, run.bundle.model.processors, "eval", run.rank, run.world_size)
    engine = run.bundle.engine
    half = float_dtype(engine)
    engine.eval()
    total, count, batches = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in run.eval_loader:
            if batches >= run.cfg.train.eval_batches:
                break
            loss = engine(to_device(batch, engine.device, half))["loss"].float()
            if torch.isfinite(loss):
                total, count = total + float(loss), count + 1
            batches += 1
    engine.train()
    total, count = dist.all_reduce([total, count], engine.device)
    result = {"loss": total / count if count else float("nan"), "batches": batches}
    if run.cfg.train.eval_metrics:
        result.update(_evaluate_metrics(run))
    return result


def _evaluate_metrics(run: Run) -> dict:
    """Retrieval R@k (align) or answer accuracy (fuse) on data.eval, on
    every rank (mmdist/evaluation/runners.py); the answers go to eval/."""
    from mmdist import evaluation

    cfg, engine, model = run.cfg, run.bundle.engine, run.bundle.model
    if run.metrics_loader is None:
        metrics_cfg = evaluation.eval_config(cfg)
        run.metrics_loader = run.loader_builder(metrics_cfg, model.processors, "eval", run.rank, run.world_size)
    step = run.history[-1]["step"] if run.history else 0
    half = float_dtype(engine)
    engine.eval()
    try:
        metrics = evaluation.evaluate_model(
            model, cfg, run.metrics_loader, max_samples=cfg.train.eval_max_samples,
            prepare=lambda batch: to_device(batch, engine.device, half), synced_gpus=cfg.engine.zero_stage == 3,
            jsonl_path=run.run_dir / "eval" / f"answers_step{step:06d}.jsonl")
    finally:
        engine.train()
    metrics.pop("records", None)
    run.logger.print(f"[mmdist] step {step}: eval {evaluation.summary_line(cfg.stage, metrics)}")
    return metrics


def _phase(run: Run, name: str) -> Any:
    """The watchdog's longer limit around a long phase (nothing when the run has no watchdog)."""
    return run.watchdog.phase(name) if run.watchdog is not None else contextlib.nullcontext()


def _evaluate_guarded(run: Run, step: int) -> Optional[dict]:
    """:func:`_evaluate` under the watchdog's longer limit; out of memory there stops the run with a message."""
    with _phase(run, "evaluation"), evaluation_guard(run.cfg, step, world_size=run.world_size,
                                                     last_checkpoint=run.last_checkpoint or run.resumed_from,
                                                     checkpoint_root=run.checkpoints.root):
        return _evaluate(run)


def _evaluate_and_log(run: Run, step: int) -> None:
    run.last_eval = _evaluate_guarded(run, step)
    if run.last_eval is not None:
        run.logger.log(step, run.last_eval, prefix="eval")
        run.logger.print(f"[mmdist] step {step}: eval loss {run.last_eval['loss']:.4f}")


def _save(run: Run, state: TrainState, *, may_fail: bool = False) -> None:
    """A checkpoint of this step: the engine, the loop state, this rank's RNG and data position (collective).

    With ``may_fail`` (the periodic saves) a storage fault is a warning and training goes on: the previous
    checkpoint is intact and the next save tries again. The saves that end a run (the last step, a signal)
    cannot be skipped: their CheckpointStorageError stops the run with its message.
    """
    client = dict(
        state.state_dict(),
        world_size=run.world_size,
        rng=capture_rng(),
        loader=run.loader.state_dict() if hasattr(run.loader, "state_dict") else None,
    )
    with _phase(run, "saving a checkpoint"):
        try:
            run.last_checkpoint = run.checkpoints.save(run.bundle.engine, state.step, client)
        except CheckpointStorageError as exc:
            if not may_fail:
                raise
            run.logger.print(f"[mmdist] warning: step {state.step}: {exc} Training goes on without this checkpoint "
                             f"(the work since {run.last_checkpoint or run.resumed_from or 'the start'} is not saved "
                             f"yet); the next save, {run.cfg.checkpoint.save_every} steps on, tries again.")
            run.logger.log(state.step, {"checkpoint_failed": 1})
            return
    run.logger.print(f"[mmdist] checkpoint {run.last_checkpoint}")


def _stop_on_signal(run: Run, state: TrainState, flag: preemption.PreemptionFlag) -> None:
    """Some rank got SIGUSR1/SIGTERM and every rank agreed: checkpoint this step, leave the marker for Slurm."""
    if run.last_checkpoint is None or run.last_checkpoint.name != CheckpointManager.tag(state.step):
        _save(run, state)
    preemption.record_stop(run.run_dir, step=state.step, checkpoint=run.last_checkpoint,
                           signal_name=flag.signal_name or "on another rank", rank=run.rank)
    run.preempted = True
    run.logger.print(f"[mmdist] stopped on a signal after step {state.step} with checkpoint {run.last_checkpoint}; "
                     f"exit code {preemption.PREEMPTED_EXIT}: start the same command again to resume")


def _finish(run: Run, state: TrainState, seconds: float) -> dict:
    """A final checkpoint unless this step has one; once the budget is spent, the last evaluation and the export."""
    cfg = run.cfg
    finished = state.step >= run.total_steps and not run.preempted
    resumed = run.resumed_from
    resumed_step = (
        int(resumed.name.split("_")[-1]) if resumed is not None and resumed.name.startswith("step_") else None
    )
    if (
        state.step > 0
        and state.step != resumed_step
        and (run.last_checkpoint is None or not run.last_checkpoint.name.endswith(f"{state.step:06d}"))
    ):
        _save(run, state)
    elif run.last_checkpoint is None and resumed is not None:
        run.last_checkpoint = resumed  # nothing new since the resume: the loaded checkpoint is the last one
    if finished:
        run.last_eval = _evaluate_guarded(run, state.step) or run.last_eval
        if run.last_eval is not None:
            run.logger.log(state.step, run.last_eval, prefix="eval")
        if cfg.checkpoint.export:
            with _phase(run, "export"), export_guard(cfg, run.bundle.model, state.step,
                                                     last_checkpoint=run.last_checkpoint,
                                                     checkpoint_root=run.checkpoints.root):
                export_dir = export_trainable(run.bundle.model, run.bundle.read_gather, run.run_dir / "export",
                                              fp32_master=cfg.engine.precision != "fp32")
            if export_dir is not None:
                run.logger.print(f"[mmdist] exported trainable weights to {export_dir}")
    if run.balance.steps:
        run.logger.print(f"[mmdist] balance: {run.balance.line()}")
    # Leave together: a rank that tears its process group down while another still uses it (rank 0 writing the
    # export) was seen to abort at exit on a loaded machine ("terminate called without an active exception").
    dist.barrier()
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
        "balance": run.balance.summary(),
    }
