"""The one training loop, for both stages, and the ``mmdist train`` command.

A stage changes the config (which model is built, what trains, which data is
read, what is loaded), never the loop. :func:`train` reads like the job:

1. join the process group (``mmdist.training.dist``), write the resolved config;
2. build the engine (model partitioned on load under ZeRO-3) and the loaders;
3. resume from the run directory's latest checkpoint, if any;
4. step until the budget (``train.max_steps`` / ``train.max_samples``) is spent:
   forward, skip non-finite losses, backward, step; log, evaluate, checkpoint;
5. save the last checkpoint, export the trainable weights, leave the group.

A micro-batch whose loss is NaN/inf on any rank is dropped on every rank before
the backward pass: it adds no gradient and causes no optimizer update, and the
step is filled by the next batch. After ``train.max_nonfinite_steps`` of them in
a row the run stops with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

__all__ = ["NonFiniteLossError", "cli_main", "train"]


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row: the run cannot continue meaningfully."""


def default_loader_builder(cfg: Any, processors: Any, split: str, rank: int, world_size: int) -> Iterable:
    from mmdist.data import build_loader

    return build_loader(cfg, processors, split, rank, world_size)


# ---------------------------------------------------------------------------
# small helpers


def _to_device(batch: dict, device: Any, float_dtype: Any) -> dict:
    import torch

    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and float_dtype is not None:
                value = value.to(float_dtype)
        out[key] = value
    return out


if TYPE_CHECKING:
    from mmdist.config.run import RunConfig


def compute_dtype(cfg: RunConfig) -> str:
    """The dtype most of a step's FLOPs run in (the peak MFU is measured against).

    A bf16/fp16 engine casts everything; an fp32 engine leaves the frozen backbones in
    their own dtype, and they carry almost all the FLOPs (the LLM in stage 2, the
    vision encoder in stage 1).
    """
    if cfg.engine.precision != "fp32":
        return cfg.engine.precision
    return cfg.model.llm.dtype if cfg.stage == "fuse" else cfg.model.vision.dtype


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


def _fingerprint(batch: dict) -> str:
    digest = hashlib.sha1()
    for key in sorted(batch):
        value = batch[key]
        if hasattr(value, "detach"):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _all_reduce(values: list[float], device: Any, op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as tdist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(tensor, op={"sum": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN, "max": tdist.ReduceOp.MAX}[op])
    return tensor.tolist()


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _StepStats:
    """What the micro-batches of one optimizer step add up to; summed over ranks when the step ends."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.micro, self.loss, self.samples, self.tokens = 0, 0.0, 0, 0
        self.metrics: dict[str, float] = {}
        self.fingerprints: list[str] = []

    def add(self, loss: Any, batch: dict, out: dict) -> None:
        self.micro += 1
        self.loss += float(loss.detach())
        self.samples += _batch_size(batch)
        self.tokens += _batch_tokens(batch, out)
        for key, value in (out.get("metrics") or {}).items():
            self.metrics[key] = self.metrics.get(key, 0.0) + float(value)

    def reduce(self, device: Any) -> dict:
        """Mean loss and model metrics over every rank's micro-batches, global samples and tokens."""
        keys = sorted(self.metrics)  # the same model on every rank reports the same keys
        total = _all_reduce([self.loss, self.micro, self.samples, self.tokens] + [self.metrics[k] for k in keys], device)
        count = max(total[1], 1)
        out = {"loss": total[0] / count, "step_samples": int(total[2]), "step_tokens": int(total[3])}
        out.update({k: v / count for k, v in zip(keys, total[4:])})
        return out


def _finite_everywhere(loss: Any, device: Any) -> bool:
    """True when the loss is finite on every rank (all ranks must skip the same batch, or ZeRO would hang)."""
    import torch

    local = 1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0
    return _all_reduce([local], device, op="min")[0] > 0


def _evaluate(engine: Any, loader: Iterable, max_batches: int, float_dtype: Any) -> dict:
    """Mean loss over the first ``max_batches`` held-out batches of every rank."""
    import torch

    engine.eval()
    total, count, batches = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in loader:
            if batches >= max_batches:
                break
            loss = engine(_to_device(batch, engine.device, float_dtype))["loss"].float()
            if torch.isfinite(loss):
                total, count = total + float(loss), count + 1
            batches += 1
    engine.train()
    total, count = _all_reduce([total, count], engine.device)
    return {"loss": total / count if count else float("nan"), "batches": batches}


class _Batches:
    """Endless iteration over a loader: a finished pass starts the next epoch (the loader tracks which)."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.iterator = None

    def next(self) -> dict:
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
    """
    import warnings

    from mmdist.training import dist

    # DeepSpeed 0.19 calls collectives torch 2.13 has renamed; one warning per call would flood the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    env = dist.init(backend=cfg.engine.backend)
    try:
        return _train(cfg, env, model_builder, loader_builder or default_loader_builder, stop_after)
    finally:
        _release_deepspeed_groups()
        dist.shutdown()


def _release_deepspeed_groups() -> None:
    """Destroy the group through DeepSpeed so it also drops its cached sub-groups (a later run in
    the same process, e.g. stage 2 after stage 1, would otherwise use groups of a dead process group)."""
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    if hf_deepspeed is not None:
        # The run's HfDeepSpeedConfig must not make a later from_pretrained in this process think ZeRO-3 is on.
        hf_deepspeed.unset_hf_deepspeed_config()
    comm = sys.modules.get("deepspeed.comm")
    if comm is None:
        return
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        try:
            comm.destroy_process_group()
        except Exception as exc:  # teardown after a dead peer may fail; dist.shutdown() still runs
            print(f"[mmdist] releasing DeepSpeed's process groups failed: {exc}", file=sys.stderr)


def _train(cfg: Any, env: Any, model_builder: Optional[Callable], loader_builder: Callable, stop_after: Optional[int]) -> dict:
    import torch

    from mmdist.config import dump_config
    from mmdist.models.freeze import param_table
    from mmdist.training.checkpoint import CheckpointManager, capture_rng, export_trainable, restore_rng
    from mmdist.training.engine import build_engine
    from mmdist.training.metrics import MetricsLogger, Throughput, flops_per_token, measure_peak_flops

    rank, world = env.rank, env.world_size
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    # 2. engine and data
    bundle = build_engine(cfg, world_size=world, model_builder=model_builder)
    engine, model = bundle.engine, bundle.model
    steps_total = bundle.total_steps
    accumulation = bundle.ds_config["gradient_accumulation_steps"]
    float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.precision)
    processors = getattr(model, "processors", None)
    loader = loader_builder(cfg, processors, "train", rank, world)
    eval_loader = None

    # 3. resume
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    checkpoints.clean_stale()
    step, samples_seen, nonfinite_total = 0, 0, 0
    _seed_everything(cfg.train.seed + rank)
    resume_from = checkpoints.resolve_resume(cfg.checkpoint.resume)
    if resume_from is not None:
        state = checkpoints.load(engine, resume_from)
        step, samples_seen = int(state["step"]), int(state.get("samples", 0))
        nonfinite_total = int(state.get("nonfinite_total", 0))
        if state.get("loader") is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["loader"])
        restore_rng(state["rng"])

    logger = MetricsLogger(run_dir, cfg.log, enabled=rank == 0, total_steps=steps_total, initial_step=step, run_name=cfg.name)
    if resume_from is not None:
        logger.print(f"[mmdist] resumed from {resume_from} at step {step} ({samples_seen} samples seen)")
    if cfg.log.param_table:
        logger.print(param_table(model))
    logger.print(
        f"[mmdist] stage={cfg.stage} world={world} steps={steps_total} global_batch={cfg.train.global_batch_size} "
        f"micro={cfg.train.micro_batch_size} accumulation={accumulation} zero={cfg.engine.zero_stage} precision={cfg.engine.precision}"
    )
    for name, numel, lr in bundle.info["optimizer_groups"]:
        logger.print(f"[mmdist] optimizer group {name}: {numel:,} parameters, lr {lr:.3g}")
    peak = cfg.log.peak_flops or (measure_peak_flops(compute_dtype(cfg)) if rank == 0 else 0.0)
    throughput = Throughput(flops_per_token(model, cfg.stage), peak * world, steps_total, start_step=step)

    def evaluate() -> Optional[dict]:
        nonlocal eval_loader
        if not cfg.data.eval:
            return None
        if eval_loader is None:
            eval_loader = loader_builder(cfg, processors, "eval", rank, world)
        return _evaluate(engine, eval_loader, cfg.train.eval_batches, float_dtype)

    def save() -> Path:
        client = {
            "samples": samples_seen,
            "nonfinite_total": nonfinite_total,
            "world_size": world,
            "rng": capture_rng(),
            "loader": loader.state_dict() if hasattr(loader, "state_dict") else None,
        }
        path = checkpoints.save(engine, step, client)
        logger.print(f"[mmdist] checkpoint {path}")
        return path

    try:
        # 4. the loop
        engine.train()
        batches = _Batches(loader)
        stats = _StepStats()
        nonfinite_in_row = 0
        history: list[dict] = []
        last_eval: Optional[dict] = None
        last_checkpoint: Optional[Path] = None
        end_step = steps_total if stop_after is None else min(steps_total, stop_after)
        started = time.perf_counter()
        while step < end_step:
            batch = batches.next()
            if cfg.log.data_fingerprint:
                stats.fingerprints.append(_fingerprint(batch))
            batch = _to_device(batch, engine.device, float_dtype)
            out = engine(batch)
            loss = out["loss"]
            if not _finite_everywhere(loss, engine.device):
                # dropped before backward on every rank: no gradient, no optimizer update
                nonfinite_in_row += 1
                nonfinite_total += 1
                logger.print(f"[mmdist] step {step + 1}: non-finite loss ({float(loss.detach())}) on some rank; batch skipped ({nonfinite_in_row} in a row)")
                logger.log(step, {"nonfinite_loss": 1, "nonfinite_in_row": nonfinite_in_row, "nonfinite_total": nonfinite_total})
                if nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} non-finite losses in a row at step {step + 1} (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}): lower train.lr, check the data (empty answers, bad images) or use "
                        "engine.precision=bf16/fp32; the last checkpoint is in " + str(checkpoints.root)
                    )
                continue
            engine.backward(loss)
            engine.step()
            stats.add(loss, batch, out)
            if stats.micro % accumulation:
                continue

            # an optimizer step happened
            step += 1
            nonfinite_in_row = 0
            record = stats.reduce(engine.device)
            samples_seen += record["step_samples"]
            lr = bundle.scheduler.get_last_lr()[0] if bundle.scheduler is not None else cfg.train.lr
            record.update(lr=lr, samples=samples_seen, nonfinite_total=nonfinite_total)
            grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record.update(throughput.update(step, record.pop("step_samples"), record.pop("step_tokens")))
            if cfg.log.data_fingerprint:
                record["data"] = _gathered_fingerprint(stats.fingerprints, engine.device)
            history.append({"step": step, "loss": record["loss"], "lr": lr, **({"data": record["data"]} if "data" in record else {})})
            logger.progress(step, record)
            if step % max(cfg.log.log_every, 1) == 0 or step == end_step or cfg.log.data_fingerprint:
                logger.log(step, record)
            stats.reset()

            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps_total:
                last_eval = evaluate()
                if last_eval is not None:
                    logger.log(step, last_eval, prefix="eval")
                    logger.print(f"[mmdist] step {step}: eval loss {last_eval['loss']:.4f}")
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0:
                last_checkpoint = save()

        # 5. the end: a final checkpoint, the last evaluation, the export
        finished = step >= steps_total
        resumed_step = int(resume_from.name.split("_")[-1]) if resume_from is not None and resume_from.name.startswith("step_") else None
        if step > 0 and step != resumed_step and (last_checkpoint is None or not last_checkpoint.name.endswith(f"{step:06d}")):
            last_checkpoint = save()
        elif last_checkpoint is None and resume_from is not None:
            last_checkpoint = resume_from  # nothing new since the resume: the loaded checkpoint is the last one
        export_dir = None
        if finished:
            last_eval = evaluate() or last_eval
            if last_eval is not None:
                logger.log(step, last_eval, prefix="eval")
            if cfg.checkpoint.export:
                export_dir = export_trainable(model, bundle.read_gather, run_dir / "export", fp32_master=cfg.engine.precision != "fp32")
                if export_dir is not None:
                    logger.print(f"[mmdist] exported trainable weights to {export_dir}")
    finally:
        logger.close()  # also on an error: the bar and the metrics file are closed
    elapsed = time.perf_counter() - started
    return {
        "step": step,
        "finished": finished,
        "samples": samples_seen,
        "nonfinite_total": nonfinite_total,
        "history": history,
        "eval": last_eval,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "export": str(run_dir / "export") if finished and cfg.checkpoint.export else None,
        "run_dir": str(run_dir),
        "rank": rank,
        "resumed_from": str(resume_from) if resume_from else None,
        "seconds": elapsed,
    }


def _gathered_fingerprint(fingerprints: list[str], device: Any) -> str:
    """One hash of the step's batches on every rank (rank order), identical on all ranks."""
    import torch.distributed as tdist

    local = "|".join(fingerprints)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, local)
        local = "/".join(gathered)
    return hashlib.sha1(local.encode()).hexdigest()[:16]


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
    if summary.get("rank", 0) == 0:  # not os.environ: dist.shutdown() has restored it by now
        loss = summary["history"][-1]["loss"] if summary["history"] else math.nan
        print(f"[mmdist] done: step {summary['step']}, last loss {loss:.4f}, run dir {summary['run_dir']}")
    return 0
