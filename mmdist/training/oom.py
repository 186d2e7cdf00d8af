"""Out of device memory during training: a message a person can act on, not a traceback.

The trainer's phases in the shape of mmdist.oom's message: the engine build
(:func:`engine_build_guard`), the step, the evaluation (:func:`evaluation_guard`) and the
export (:func:`export_guard`). The step raises
:class:`~mmdist.training.step.StepOutOfMemoryError` (which step, which micro-batch, the
device's memory then); the loop turns it into :class:`OutOfMemoryStop` with
:func:`oom_advice`: the planner's largest micro-batch that fits these settings on this
device (mmdist.plan), and the settings that lower memory. ``mmdist train`` prints it
and exits with :data:`OOM_EXIT`. No checkpoint is written on the way out: the last one is intact.
With several ranks, the rank that ran out exits with OOM_EXIT and the launcher
(``srun --kill-on-bad-exit``, torchrun) ends the others, which wait in the step's
next collective (else the watchdog ends them with 124).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional

import torch

from mmdist.config.run import RunConfig
from mmdist.oom import OOM_EXIT, OutOfMemoryStop, human_count, oom_guard, oom_message, parameter_count
from mmdist.training.step import StepOutOfMemoryError

__all__ = ["OOM_EXIT", "OutOfMemoryStop", "engine_build_guard", "evaluation_guard", "export_guard", "oom_advice",
           "planner_line"]

# the planner's module names (mmdist.plan.model_shapes) -> the settings section of that module
_SECTION = {"vision_encoder": "model.vision", "text_encoder": "model.text", "llm": "model.llm"}


def _device_budget(device: torch.device) -> Optional[int]:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def planner_line(cfg: RunConfig, world_size: int, budget: Optional[int]) -> str:
    """The planner's largest micro-batch for these settings within ``budget`` bytes, or how to ask it.

    Uses mmdist.plan's library (model shapes from the config, the configured ZeRO
    stage and offload, with and without gradient checkpointing); anything it cannot
    do (no GPU to read the budget from, a model it cannot size) falls back to the
    command that asks it.
    """
    ask = (f"run `mmdist plan --config {Path(cfg.run_dir) / 'config.yaml'}` for the largest micro-batch and the "
           "ZeRO setting that fit")
    if budget is None:
        return f"planner: no device memory total to plan against here; {ask}"
    try:
        from mmdist.plan import Setting, estimate, model_shapes

        zero = cfg.engine.zero_stage
        if not isinstance(zero, int):  # an unresolved `auto`: the planner's recommendation is the answer
            return f"planner: ZeRO stage {zero!r} is not resolved yet; {ask}"
        setting = Setting(zero, bool(cfg.engine.offload_optimizer), bool(cfg.engine.offload_params))
        (est,) = estimate(cfg, model_shapes(cfg), world_size, settings=[setting])
        ckpt = bool(cfg.stage.llm_checkpointing(cfg.model))
        fits = est.max_micro_batch(budget, ckpt)
        line = (f"planner: largest micro-batch that fits {setting.label} on {budget / 2**30:.0f} GiB: {fits} "
                f"(train.micro_batch_size={cfg.train.micro_batch_size}")
        if cfg.stage.builds("llm") and not ckpt:
            line += f"; with model.llm.gradient_checkpointing=true: {est.max_micro_batch(budget, True)}"
        return line + ")"
    except Exception as exc:  # the planner is advice: never let it hide the out-of-memory report
        return f"planner: could not size this model ({type(exc).__name__}: {exc}); {ask}"


def oom_advice(cfg: RunConfig, error: StepOutOfMemoryError, *, world_size: int, last_checkpoint: Optional[Path],
               checkpoint_root: Path, device: Optional[torch.device] = None) -> str:
    """The whole message: what ran out where, the last checkpoint, the planner's figure, the settings to change."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    ckpt = cfg.stage.llm_checkpointing(cfg.model)
    settings = [
        f"train.micro_batch_size={cfg.train.micro_batch_size} -> smaller (the global batch stays: accumulation grows)",
        f"engine.zero_stage={cfg.engine.zero_stage} -> 3 partitions the frozen weights too"
        if cfg.engine.zero_stage != 3
        else "engine.zero_stage=3 already: engine.offload_params=true "
        "/ engine.offload_optimizer=true move states to CPU",
    ]
    if ckpt is False:
        settings.insert(
            0, "model.llm.gradient_checkpointing=true (activations of one layer at a time; ~1/3 more compute)"
        )
    if cfg.stage.builds("llm"):
        settings.append(f"data.max_len={cfg.data.max_len} -> shorter rows (activation memory grows with it)")
    phase = (f"the training step (step {error.step}, micro-batch {error.micro_batch} of {error.accumulation}, "
             f"in the {error.phase})")
    sizes = {"micro-batch": cfg.train.micro_batch_size, "sequence": cfg.data.max_len,
             "accumulation": error.accumulation, "world size": world_size, "ZeRO stage": cfg.engine.zero_stage}
    notes = [_checkpoint_note(last_checkpoint, checkpoint_root), planner_line(cfg, world_size, _device_budget(device))]
    return oom_message(phase, sizes=sizes, settings=settings, device=device, notes=notes, memory=error.memory)


def _checkpoint_note(last_checkpoint: Optional[Path], checkpoint_root: Path) -> str:
    where = last_checkpoint or f"none yet in {checkpoint_root}"
    return f"last checkpoint: {where} (intact: nothing was written after it)"


def engine_build_guard(cfg: RunConfig, world_size: int) -> AbstractContextManager:
    """Building the model and its DeepSpeed engine: the planned model size, and the settings that shrink what a rank
    holds (asked of mmdist.plan only when memory ran out)."""
    planned: list = []

    def shapes() -> list:
        if not planned:
            from mmdist.plan import model_shapes

            try:
                planned.append(model_shapes(cfg))
            except Exception:  # a model the planner cannot size: the settings below still apply
                planned.append([])
        return planned[0]

    def model() -> Optional[str]:
        parts = shapes()
        if not parts:
            return None
        each = ", ".join(f"{m.name} {human_count(m.params)} {m.dtype}{' trained' if m.trainable else ''}"
                         for m in parts)
        return f"{human_count(sum(m.params for m in parts))} parameters ({each})"

    def settings() -> list[str]:
        zero = cfg.engine.zero_stage
        out = []
        if zero != 3 and world_size > 1:
            out.append(f"engine.zero_stage={zero} -> 3 (each of the {world_size} ranks builds and keeps 1/{world_size} "
                       "of the frozen weights)")
        if not cfg.engine.offload_params:
            out.append("engine.zero_stage=3 with engine.offload_params=true (parameters in CPU memory)")
        for m in shapes():
            section = _SECTION.get(m.name)
            if section is None or m.trainable:
                continue
            if m.dtype == "fp32":
                out.append(f"{section}.dtype=fp32 -> bf16 (half the bytes a frozen weight)")
            quantize = str(getattr(getattr(cfg.model, section.split(".")[1], None), "quantize", "none"))
            if zero != 3 and quantize == "none":
                out.append(f"{section}.quantize=int8 or nf4 (frozen weights in 1 or 1/2 byte; ZeRO 0-2)")
        if not cfg.engine.offload_optimizer:
            out.append("engine.offload_optimizer=true (optimizer states in CPU memory)")
        return out

    sizes = {"model": model, "world size": world_size, "ZeRO stage": cfg.engine.zero_stage,
             "precision": cfg.engine.precision}
    return oom_guard("the engine build (loading the model, wrapping it in DeepSpeed)", sizes=sizes, settings=settings)


def evaluation_guard(cfg: RunConfig, step: int, *, world_size: int, last_checkpoint: Optional[Path],
                     checkpoint_root: Path) -> AbstractContextManager:
    """The trainer's held-out evaluation at ``step``: its batch and sequence, and the settings that shrink them."""
    settings = [f"train.micro_batch_size={cfg.train.micro_batch_size} -> smaller (held-out batches have as many rows; "
                "the global batch stays)",
                f"data.max_len={cfg.data.max_len} -> shorter rows"]
    if cfg.train.eval_metrics:
        settings.append("train.eval_metrics=false (greedy answers keep a KV cache of every row; `mmdist eval` on the "
                        "export measures them after the run)")
    sizes = {"batch": cfg.train.micro_batch_size, "sequence": cfg.data.max_len, "batches": cfg.train.eval_batches,
             "world size": world_size, "ZeRO stage": cfg.engine.zero_stage}
    return oom_guard(f"the evaluation at step {step}", sizes=sizes, settings=settings,
                     notes=[_checkpoint_note(last_checkpoint, checkpoint_root)])


def export_guard(cfg: RunConfig, model: Any, step: int, *, last_checkpoint: Optional[Path],
                 checkpoint_root: Path) -> AbstractContextManager:
    """The export at the end of training: gathering the trainable weights whole (every rank, under ZeRO-3)."""
    sizes = {"trainable": lambda: parameter_count(model, trainable_only=True), "ZeRO stage": cfg.engine.zero_stage}
    notes = [_checkpoint_note(last_checkpoint, checkpoint_root),
             "start the same command again to retry the export from that checkpoint"]
    return oom_guard(f"the export of the trainable weights at step {step}", sizes=sizes, notes=notes,
                     settings=["checkpoint.export=false (finish without the export; the checkpoint holds the weights)"])
