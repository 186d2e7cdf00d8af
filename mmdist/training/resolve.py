"""One resolve step: the user's config and this machine become the config the run is, once, before anything is built.

What a config may leave to the machine is decided here and nowhere after:
``engine.zero_stage: auto`` (the planner's fastest stage that fits this device's
memory, mmdist.plan.auto: the planner runs only for that setting), ``auto``
dtypes (mmdist.precision, for this node's device) and a micro-batch that the
world size does not divide (mmdist.training.ds_config.fit_micro_batch). Every
decision is rank 0's, broadcast, so all ranks run the same config (where a
CPU's flags cannot be read a matmul probe decides, and two probes may not agree).

The trainer calls :func:`resolve_run` right after joining the process group and
writes its result into config.yaml; the engine, the model, the loaders and the
logs receive that object and none of them changes it
(tests/training/test_resolve.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from mmdist import distributed as dist
from mmdist.config.run import RunConfig
from mmdist.hardware import default_device
from mmdist.precision import PART_KEYS, resolve_precision
from mmdist.settings import ConfigError
from mmdist.training.ds_config import fit_micro_batch

__all__ = ["ResolvedRun", "is_resolved", "resolve_precision_agreed", "resolve_run", "resolve_zero_stage_agreed"]


@dataclass(frozen=True)
class ResolvedRun:
    """The resolved config and why each machine-dependent value is what it is."""

    config: RunConfig
    precision: list = field(default_factory=list)  # [(key, hardware.Resolved)] from resolve_precision
    zero_stage_note: Optional[str] = None  # why `engine.zero_stage: auto` became its stage
    micro_batch_note: Optional[str] = None  # the micro-batch lowered so the world size divides the global batch


def resolve_run(cfg: RunConfig, world_size: int, *, fit_micro_batch_to_world: bool = True) -> ResolvedRun:
    """``cfg`` resolved for ``world_size`` ranks on this machine (a collective when the process group exists).

    ``fit_micro_batch_to_world=False`` leaves the micro-batch to ``batch_layout``'s check (callers that build an
    engine without the trainer's start-up).
    """
    cfg, zero_note = resolve_zero_stage_agreed(cfg, world_size)  # `auto` -> the planner's fastest stage that fits
    cfg, precision = resolve_precision_agreed(cfg)  # `auto` -> concrete dtypes
    fitted = None
    if fit_micro_batch_to_world:
        cfg, fitted = fit_micro_batch(cfg, world_size)  # the global batch stays on any number of ranks
    return ResolvedRun(cfg, precision, zero_note, fitted)


def is_resolved(cfg: RunConfig) -> bool:
    """Whether ``cfg`` leaves nothing to the machine: a concrete ZeRO stage, engine precision and part dtypes."""
    values = [cfg.engine.zero_stage, cfg.engine.precision, *(getattr(cfg.model, name).dtype for name in PART_KEYS)]
    return "auto" not in [str(v) for v in values]


def resolve_precision_agreed(cfg: RunConfig) -> tuple[RunConfig, list]:
    """``cfg`` with concrete dtypes for this node's device (mmdist.precision); rank 0's answer on every rank."""
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

