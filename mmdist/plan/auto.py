"""``engine.zero_stage: auto`` at start-up: the planner's fastest ZeRO stage that fits this device's memory.

The budget is the device's memory: ``torch.cuda.get_device_properties(...).total_memory``
on a GPU, the machine's RAM on the CPU (generous on purpose: CPU runs are tests and
demos, and every stage fits there), or ``MMDIST_DEVICE_MEMORY`` (``24GB``, ``512MB``)
when set, which is how a test makes ZeRO-3 the only stage that fits. The step times
come from mmdist.plan.speed (mmdist.plan.step_time); the interconnect is the GPU's
(:func:`mmdist.plan.step_time.interconnect_for`), with ``LOCAL_WORLD_SIZE`` GPUs per node; the rates are the
calibration file ``MMDIST_CALIBRATION`` names (``mmdist plan --calibrate``), else the shipped defaults.

Offload settings stay the config's: with ``engine.offload_optimizer`` only stages
1-3 are candidates, with ``engine.offload_params`` only 3. A bf16/fp16 engine never
gets ZeRO-0 (:data:`ZERO0_HALF_PRECISION`): ZeRO-1 runs at the same predicted speed. Gradient checkpointing
stays as configured (the plan command may recommend changing it; start-up does not).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from mmdist.config.run import RunConfig
from mmdist.plan.calibration import CALIBRATION_ENV, load_calibration
from mmdist.plan.lengths import BatchTokens, batch_tokens
from mmdist.plan.memory import Setting, estimate, parse_bytes
from mmdist.plan.shapes import GiB, model_shapes
from mmdist.plan.speed import Choice, choose, step_inputs
from mmdist.plan.step_time import interconnect_for
from mmdist.settings import ConfigError, Problem

__all__ = ["DEVICE_MEMORY_ENV", "ZERO0_HALF_PRECISION", "auto_candidates", "auto_reason", "calibration_from_env",
           "device_budget", "planned_precision", "resolve_zero_stage"]

DEVICE_MEMORY_ENV = "MMDIST_DEVICE_MEMORY"
"""A memory budget per device for ``engine.zero_stage: auto`` (e.g. ``80GB``), instead of the device's own."""


def device_budget(device: str) -> tuple[int, str, str]:
    """(bytes, device name, where the figure came from) for ``device`` ('cuda' or 'cpu')."""
    forced = os.environ.get(DEVICE_MEMORY_ENV)
    name = "cpu"
    if str(device).startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        name = props.name
        if not forced:
            return int(props.total_memory), name, f"{name}'s memory"
    if forced:
        return parse_bytes(forced), name, f"{DEVICE_MEMORY_ENV}={forced}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram), name, "this machine's RAM"


def calibration_from_env():
    """The calibration :data:`~mmdist.plan.calibration.CALIBRATION_ENV` names (None: the shipped defaults); a file
    that cannot be read is a ConfigError naming it."""
    path = os.environ.get(CALIBRATION_ENV)
    if not path:
        return None
    try:
        return load_calibration(path)
    except ValueError as exc:
        raise ConfigError([Problem("engine.zero_stage", f"auto: {CALIBRATION_ENV}: {exc}")]) from None


ZERO0_HALF_PRECISION = (
    "ZeRO-0 is left out with a bf16/fp16 engine: DeepSpeed 0.19 wraps the optimizer in its FP16_UnfusedOptimizer "
    "there, whose fp32 masters are not linked to the parameters (deepspeed.utils.safe_get_full_fp32_param gives "
    "None), so the export and trainable_state.pt would hold the rounded bf16 weights (measured on the CPU: ZeRO-1/2 "
    "export fp32, ZeRO-0 bf16, and its losses differ)"
)


def auto_candidates(cfg: RunConfig, precision: Optional[str] = None) -> list[Setting]:
    """The settings ``auto`` chooses among: every stage within the configured offload flags, without ZeRO-0 for a
    bf16/fp16 engine (``precision``, default the config's; see :data:`ZERO0_HALF_PRECISION`)."""
    eng = cfg.engine
    if eng.offload_params:
        return [Setting(3, True, True)]
    quantized = any(str(getattr(part, "quantize", "none")) != "none" for part in (cfg.model.llm, cfg.model.vision))
    # ZeRO-3 cannot partition quantized weights (mmdist.config.quantization)
    stages = (1, 2) if quantized else (1, 2, 3)
    if eng.offload_optimizer:
        return [Setting(z, True) for z in stages]
    half = (precision or eng.precision) in ("bf16", "fp16")
    return [Setting(z) for z in (stages if half else (0, *stages))]


def planned_precision(cfg: RunConfig, device: str) -> RunConfig:
    """``cfg`` with the precision the run will have (resolved as if below ZeRO-3), for the memory and time estimate."""
    from mmdist.precision import resolve_precision

    provisional = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, zero_stage=2))
    return resolve_precision(provisional, "cuda" if str(device).startswith("cuda") else "cpu")[0]


def resolve_zero_stage(cfg: RunConfig, world_size: int, device: str = "cpu") -> tuple[RunConfig, Optional[str]]:
    """(``cfg`` with a concrete ``engine.zero_stage``, the line saying why) — ``(cfg, None)`` unless it says ``auto``.

    Among the candidate settings whose predicted memory (mmdist.plan.estimate, with
    the configured micro-batch as mmdist.plan.lengths counts it from the shards'
    statistics of ``data.train``, and the configured checkpointing) fits the budget, the lowest
    predicted step time on ``world_size`` ranks wins; ties go to the lower stage.
    When none fits, the one needing least memory is taken and the line says so.
    """
    if cfg.engine.zero_stage != "auto":
        return cfg, None
    budget, name, source = device_budget(device)
    planned = planned_precision(cfg, device)
    try:
        shapes = model_shapes(planned)
    except ValueError as exc:  # a custom vision encoder without hidden_size, an unreadable model config
        raise ConfigError(
            [
                Problem(
                    "engine.zero_stage",
                    f"auto needs the planner's parameter counts, which failed: {exc}. Name a stage (0-3) instead",
                )
            ]
        ) from None
    tokens = batch_tokens(planned, shapes)
    estimates = estimate(planned, shapes, world_size, settings=auto_candidates(cfg, planned.engine.precision),
                         tokens=tokens)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or min(world_size, 8))
    link = interconnect_for(name, gpus_per_node=max(1, per_node))
    ckpt = bool(cfg.stage.llm_checkpointing(cfg.model))
    inputs = step_inputs(planned, shapes, world_size, name, tokens=tokens, calibration=calibration_from_env())
    best, candidates = choose(estimates, inputs, world_size, link, budget, [ckpt])
    stage = best.setting.zero_stage
    out = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, zero_stage=stage))
    reason = auto_reason(best, candidates, budget, source, world_size, tokens)
    if planned.engine.precision in ("bf16", "fp16") and not cfg.engine.offload_optimizer:
        reason += " (ZeRO-0 is not a candidate with a bf16/fp16 engine: its fp32 masters cannot be exported)"
    return out, reason


def auto_reason(best: Choice, candidates: list[Choice], budget: int, source: str, world: int,
                tokens: BatchTokens) -> str:
    """The line saying which stage ``auto`` takes and why: the fastest that fits, or the least memory when none does."""
    need = best.estimate.total(best.checkpointing)
    batch = f" (micro-batch of {tokens.samples} samples, {tokens.tokens:,.0f} tokens, from the {tokens.source})"
    others = ", ".join(f"ZeRO-{c.setting.zero_stage} {c.time.step_s:.3g} s{'' if c.fits else ' (does not fit)'}"
                       for c in candidates if c is not best)
    head = f"engine.zero_stage = {best.setting.zero_stage} (auto): "
    if not best.fits:
        return (
            head + f"nothing fits {budget / GiB:.1f} GiB ({source}); ZeRO-{best.setting.zero_stage} needs the least "
            f"({need / GiB:.1f} GiB predicted{batch}). Lower train.micro_batch_size or data.max_len, or add GPUs"
        )
    return (head + f"predicted fastest of the stages that fit {budget / GiB:.1f} GiB ({source}) on {world} rank(s): "
            f"{best.time.step_s:.3g} s/step, {need / GiB:.1f} GiB predicted{batch}"
            + (f"; others: {others}" if others else ""))
