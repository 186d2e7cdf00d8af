"""Out of device memory during training: a message a person can act on, not a traceback.

The step raises :class:`~mmdist.training.step.StepOutOfMemoryError` (which step,
which micro-batch, the device's allocated/reserved/total memory); the loop turns
it into :class:`OutOfMemoryStop` with :func:`oom_advice`: the planner's largest
micro-batch that fits these settings on this device (mmdist.plan), and the
settings that lower memory. ``mmdist train`` prints it and exits with
:data:`OOM_EXIT`. No checkpoint is written on the way out: the last one is intact.
With several ranks, the rank that ran out exits with OOM_EXIT and the launcher
(``srun --kill-on-bad-exit``, torchrun) ends the others, which wait in the step's
next collective (else the watchdog ends them with 124).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mmdist.config.run import RunConfig
from mmdist.training.step import StepOutOfMemoryError

__all__ = ["OOM_EXIT", "OutOfMemoryStop", "oom_advice", "planner_line"]

#: Exit code of a run that ran out of device memory: distinct from a crash (1), a bad config (2),
#: a preempted run (75, requeued) and the watchdog (124), so scripts never requeue a run that
#: would run out again. 76 is free in sysexits.h's range (EX_PROTOCOL is unused by mmdist).
OOM_EXIT = 76


class OutOfMemoryStop(RuntimeError):
    """The run ran out of device memory; the message says where and what to change."""


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
        f"engine.zero_stage={cfg.engine.zero_stage} -> 3 partitions the frozen weights too" if cfg.engine.zero_stage != 3
        else "engine.zero_stage=3 already: engine.offload_params=true / engine.offload_optimizer=true move states to CPU",
    ]
    if ckpt is False:
        settings.insert(0, "model.llm.gradient_checkpointing=true (activations of one layer at a time; ~1/3 more compute)")
    if cfg.stage.builds("llm"):
        settings.append(f"data.max_len={cfg.data.max_len} -> shorter rows (activation memory grows with it)")
    lines = [
        f"[mmdist] {error}",
        f"[mmdist] last checkpoint: {last_checkpoint or f'none yet in {checkpoint_root}'} (intact: nothing was written after it)",
        f"[mmdist] {planner_line(cfg, world_size, _device_budget(device))}",
        "[mmdist] settings that lower memory: " + "; ".join(settings),
        f"[mmdist] exit code {OOM_EXIT}: change a setting and start the same command again to resume",
    ]
    return "\n".join(lines)
