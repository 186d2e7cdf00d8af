"""The micro-batch and gradient checkpointing that give the shortest optimizer step, the global batch held fixed.

``train.global_batch_size`` is what the optimizer sees; how a rank's share of it is
split (``micro x accumulation``) and whether the frozen LLM is recomputed in backward
are free to choose: they change speed and memory, not the optimisation. Checkpointing
saves memory by running the LLM's forward twice (6 instead of 4 FLOPs per weight and
token), so a smaller micro-batch without it, repeated by accumulation, often finishes the
same global batch sooner than one large checkpointed micro-batch. This module tries every
micro-batch that divides the rank's share, with and without checkpointing, over the
candidate ZeRO settings: the micro-batch's tokens from mmdist.plan.lengths (the shards'
statistics where they exist), its memory from mmdist.plan.memory, its step time (every
micro-batch of the optimizer step) from mmdist.plan.step_time; the fastest that fits wins.

The step-time model has one compute rate per layer width, so it does not see a GPU's
matmuls slowing on very short micro-batches beyond the per-module call cost; the choice
is only as good as that model (benchmarks/step_time_model.py checks it against runs).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Optional

from mmdist.config.run import RunConfig
from mmdist.plan.lengths import BatchTokens, batch_tokens
from mmdist.plan.memory import Setting, estimate
from mmdist.plan.shapes import ModuleShape
from mmdist.plan.speed import TIE, Choice, choose, preference, step_inputs
from mmdist.plan.step_time import Calibration, Interconnect

__all__ = ["Split", "micro_batch_sizes", "fastest_split"]


@dataclasses.dataclass
class Split:
    """One way to run a rank's share of the global batch: ``micro_batch`` samples, ``accumulation`` times, with the
    setting and checkpointing of ``choice`` (whose time is the whole optimizer step)."""

    micro_batch: int
    accumulation: int
    choice: Choice
    tokens: BatchTokens

    @property
    def step_s(self) -> float:
        return self.choice.time.step_s

    @property
    def label(self) -> str:
        return (f"micro-batch {self.micro_batch} x {self.accumulation} accumulation, "
                f"gradient_checkpointing={str(self.choice.checkpointing).lower()}, {self.choice.setting.label}")


def micro_batch_sizes(cfg: RunConfig, world: int) -> list[int]:
    """Every micro-batch that divides a rank's share of the global batch (ascending); empty when ``world`` does not
    divide the global batch (the trainer refuses it, mmdist.training.ds_config.batch_layout)."""
    global_batch = cfg.train.global_batch_size
    if world < 1 or global_batch % world:
        return []
    share = global_batch // world
    return [m for m in range(1, share + 1) if share % m == 0]


def with_micro_batch(cfg: RunConfig, micro_batch: int) -> RunConfig:
    out = copy.copy(cfg)
    out.train = dataclasses.replace(cfg.train, micro_batch_size=micro_batch)
    return out


def fastest_split(cfg: RunConfig, shapes: Sequence[ModuleShape], world: int, gpu: str, interconnect: Interconnect,
                  budget: int, settings: Sequence[Setting], reserve_bytes: int,
                  calibration: Optional[Calibration] = None, shards: Optional[Sequence[str]] = None,
                  checkpointing: Sequence[bool] = (False, True)) -> tuple[Optional[Split], list[Split]]:
    """(the split with the shortest predicted optimizer step that fits ``budget``, or None; the best split of every
    micro-batch size that fits, by micro-batch). Times within :data:`~mmdist.plan.speed.TIE` are a tie, won as
    :func:`~mmdist.plan.speed.choose` breaks it, then by the larger micro-batch (fewer forward passes)."""
    splits = []
    for micro in micro_batch_sizes(cfg, world):
        trial = with_micro_batch(cfg, micro)
        tokens = batch_tokens(trial, shapes, shards)
        estimates = estimate(trial, shapes, world, settings=settings, reserve_bytes=reserve_bytes, tokens=tokens)
        inputs = step_inputs(trial, shapes, world, gpu, tokens=tokens, calibration=calibration)
        best, _ = choose(estimates, inputs, world, interconnect, budget, checkpointing)
        if best.fits:
            splits.append(Split(micro, inputs.micro_batches, best, tokens))
    if not splits:
        return None, []
    fastest = min(s.step_s for s in splits)
    near = [s for s in splits if s.step_s <= fastest * (1 + TIE)]
    best = min(near, key=lambda s: (*preference(s.choice), -s.micro_batch))
    return best, splits
